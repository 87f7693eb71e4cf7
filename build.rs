//! Builds the CUDA kernels of `kernels/cuda/`: with the `cuda` feature, each `.cu` file becomes
//! PTX in `OUT_DIR` (nvcc from `NVCC`, `CUDA_HOME/bin` or `PATH`; the virtual architecture from
//! `CUDA_COMPUTE_CAP`, default 80, which the driver compiles for newer GPUs); with `cuda-emu`,
//! the same sources compile as C++ for the CPU emulator the tests use. Other builds need nothing.
//! Where `ptxas` sits beside nvcc, each module is also assembled for `sm_<CUDA_COMPUTE_CAP>`, so
//! that a kernel over the architecture's limits (static shared memory, registers) fails here and
//! not when the driver loads it on a user's GPU.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel files, one PTX module each.
const MODULES: [&str; 5] = ["attention", "conv2d", "mse", "row_norm", "softmax"];

fn main() {
    println!("cargo:rerun-if-changed=kernels/cuda");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_ptx();
    }
    #[cfg(feature = "cuda-emu")]
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("kernels/cuda/emu/emu.cpp")
        .warnings(true)
        .compile("diffalign_cuda_emu");
}

fn build_ptx() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        env::var_os("CUDA_HOME")
            .map(|home| Path::new(&home).join("bin").join("nvcc"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    for module in MODULES {
        let src = format!("kernels/cuda/{module}.cu");
        let ptx = out.join(format!("{module}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} for {src} (set NVCC or CUDA_HOME): {e}", nvcc.display()));
        assert!(status.success(), "{} failed on {src}", nvcc.display());
        let ptxas = nvcc.with_file_name("ptxas");
        if ptxas.exists() {
            let status = Command::new(&ptxas)
                .arg(format!("-arch=sm_{cap}"))
                .arg(&ptx)
                .arg("-o")
                .arg(out.join(format!("{module}.cubin")))
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
            assert!(status.success(), "{} rejects {src} for sm_{cap}", ptxas.display());
        }
    }
}
