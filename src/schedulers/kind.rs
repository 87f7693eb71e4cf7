//! `SchedulerKind`: the diffusers scheduler classes diffalign samples with, their command-line
//! names (`--scheduler`) and the per-class constructor defaults that `from_config` fills in.

use std::fmt;
use std::str::FromStr;

use super::config::TimestepSpacing;
use crate::{Error, Result};

/// The scheduler classes diffalign can sample with (`--scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `DDIMInverseScheduler` (`ddim-inverse`): runs from a clean sample towards noise.
    DdimInverse,
    /// `EulerDiscreteScheduler` (`euler`).
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`, `euler_ancestral`).
    EulerAncestralDiscrete,
    /// `PNDMScheduler` (`pndm`, also `plms`): the Stable Diffusion 1.x default.
    Pndm,
    /// `DPMSolverMultistepScheduler` (`dpm++`, also `dpm-solver`, `dpmsolver-multistep`).
    DpmSolverMultistep,
    /// `LMSDiscreteScheduler` (`lms`).
    LmsDiscrete,
    /// `UniPCMultistepScheduler` (`unipc`).
    UniPcMultistep,
    /// `DDPMScheduler` (`ddpm`): ancestral sampling of the DDPM paper.
    Ddpm,
}

impl SchedulerKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [SchedulerKind; 9] = [
        SchedulerKind::Ddim,
        SchedulerKind::DdimInverse,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
        SchedulerKind::Pndm,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::LmsDiscrete,
        SchedulerKind::UniPcMultistep,
        SchedulerKind::Ddpm,
    ];

    /// The diffusers class name (`"DDIMScheduler"`, ...).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DdimInverse => "DDIMInverseScheduler",
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::LmsDiscrete => "LMSDiscreteScheduler",
            SchedulerKind::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
        }
    }

    /// The command-line name (`"ddim"`, `"ddim-inverse"`, `"euler"`, `"euler-a"`, `"pndm"`,
    /// `"dpm++"`, `"lms"`, `"unipc"`, `"ddpm"`).
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DdimInverse => "ddim-inverse",
            SchedulerKind::EulerDiscrete => "euler",
            SchedulerKind::EulerAncestralDiscrete => "euler-a",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::DpmSolverMultistep => "dpm++",
            SchedulerKind::LmsDiscrete => "lms",
            SchedulerKind::UniPcMultistep => "unipc",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    /// The kind of a diffusers `_class_name`, if it is one diffalign can sample with.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// The timestep spacing diffusers' constructor of this class defaults to.
    pub fn default_timestep_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerKind::Ddim | SchedulerKind::DdimInverse | SchedulerKind::Pndm | SchedulerKind::Ddpm => {
                TimestepSpacing::Leading
            }
            SchedulerKind::EulerDiscrete
            | SchedulerKind::EulerAncestralDiscrete
            | SchedulerKind::DpmSolverMultistep
            | SchedulerKind::LmsDiscrete
            | SchedulerKind::UniPcMultistep => TimestepSpacing::Linspace,
        }
    }

    /// `set_alpha_to_one` of diffusers' constructor (DDIM: true, PNDM: false; unused elsewhere).
    pub fn default_set_alpha_to_one(self) -> bool {
        self != SchedulerKind::Pndm
    }

    pub(super) fn supported_classes() -> String {
        Self::ALL.map(|k| k.class_name()).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a command-line name (with `_` or `-`; also `euler-ancestral`, `plms`,
    /// `dpm-solver`, `dpmsolver++`, `dpmsolver-multistep`, `lms-discrete`,
    /// `unipc-multistep`) or a diffusers class name.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase().replace('_', "-");
        let kind = match lower.as_str() {
            "ddim" => Some(SchedulerKind::Ddim),
            "ddim-inverse" => Some(SchedulerKind::DdimInverse),
            "euler" => Some(SchedulerKind::EulerDiscrete),
            "euler-a" | "euler-ancestral" => Some(SchedulerKind::EulerAncestralDiscrete),
            "pndm" | "plms" => Some(SchedulerKind::Pndm),
            "dpm++" | "dpm-solver" | "dpmsolver++" | "dpmsolver-multistep" | "dpm-solver-multistep" => {
                Some(SchedulerKind::DpmSolverMultistep)
            }
            "lms" | "lms-discrete" => Some(SchedulerKind::LmsDiscrete),
            "unipc" | "unipc-multistep" => Some(SchedulerKind::UniPcMultistep),
            "ddpm" => Some(SchedulerKind::Ddpm),
            _ => SchedulerKind::from_class_name(s.trim()),
        };
        kind.ok_or_else(|| {
            let valid = Self::ALL.map(|k| k.cli_name()).join(", ");
            Error::input(
                "--scheduler",
                format!("unknown scheduler {s:?}, expected one of {valid}"),
            )
        })
    }
}
