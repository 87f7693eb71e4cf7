//! `--device`, shared by every command that computes: parsed once, by clap, into a
//! [`DeviceSpec`]; `cli::run` builds the process's kernel choice from it.

use candle_core::Device;
use clap::Args;
use diffalign::device::DeviceSpec;

/// The `--device` flag.
#[derive(Debug, Clone, Copy, Args)]
pub struct DeviceArg {
    /// Device: cpu, cuda[:N] (builds with the `cuda` feature), or wgpu (builds with the `wgpu`
    /// feature: tensors on the CPU, the hot ops as WGSL shaders on a GPU adapter).
    #[arg(long = "device", default_value = "cpu")]
    pub spec: DeviceSpec,
}

impl DeviceArg {
    /// Opens the device.
    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(self.spec.device()?)
    }
}
