//! Data-parallel runs: which process this is among those a launcher started ([`Launch`], from
//! the launcher's environment as the CLI reads it) and the collectives a training step needs
//! ([`Comm`]), over MPI (feature `mpi`, for `mpirun`, `mpiexec` and `srun`) or NCCL (feature
//! `nccl`, for `torchrun`; its unique id travels by [`rendezvous`]). A process started alone is
//! rank 0 of 1 and every collective is a no-op.
//!
//! Sums are reduced to rank 0 and broadcast from there, not all-reduced, so every rank holds
//! the same bits and the ranks' weights never drift apart.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::device::DeviceSpec;
use crate::{Error, Result};
use rendezvous::Endpoint;

/// The program that started this process, as its environment tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: a process on its own.
    Alone,
    /// OpenMPI's `mpirun`/`mpiexec` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// MPICH's or Intel MPI's Hydra (`PMI_RANK`, `PMI_SIZE`).
    Mpich,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`).
    Slurm,
    /// PyTorch's `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
    Torchrun,
}

impl Launcher {
    /// The launcher's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Alone => "none",
            Launcher::OpenMpi => "mpirun (OpenMPI)",
            Launcher::Mpich => "mpiexec (MPICH)",
            Launcher::Slurm => "srun (Slurm)",
            Launcher::Torchrun => "torchrun",
        }
    }
}

/// This process's place among the launched ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Who started the processes.
    pub launcher: Launcher,
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// This process's rank on its node (which GPU it takes).
    pub local_rank: usize,
    /// torchrun's rendezvous address `MASTER_ADDR:MASTER_PORT`, when given.
    pub master: Option<String>,
    /// Where rank 0 hands out NCCL's unique id under torchrun: `MASTER_ADDR` and
    /// `DIFFALIGN_RENDEZVOUS_PORT`, else `MASTER_PORT + 1` (torchrun's own store holds
    /// `MASTER_PORT`).
    pub rendezvous: Option<Endpoint>,
}

impl Launch {
    /// A process on its own.
    pub fn alone() -> Self {
        Launch {
            launcher: Launcher::Alone,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master: None,
            rendezvous: None,
        }
    }

    /// The device this rank computes on: `cuda:N` becomes `cuda:N+local_rank`, so that the
    /// ranks of a node take one GPU each from N on; other devices stay as they are.
    pub fn rank_device(&self, spec: DeviceSpec) -> DeviceSpec {
        match spec {
            DeviceSpec::Cuda(n) => DeviceSpec::Cuda(n + self.local_rank),
            other => other,
        }
    }

    /// Reads the launcher's variables through `var` (the CLI passes `std::env::var`): OpenMPI,
    /// then MPICH's Hydra, then Slurm, then torchrun (with `DIFFALIGN_RENDEZVOUS_PORT`); none of
    /// them is a process on its own. A variable that is present but not a number, or a rank
    /// outside the world, is an error naming it.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::input(
                        format!("environment variable {name}"),
                        format!("must be a non-negative integer, got {v:?}"),
                    )
                }),
            }
        };
        // (launcher, rank, size, local rank): the first launcher whose rank and size are set.
        let candidates: [(Launcher, &str, &[&str], &str); 4] = [
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                &["OMPI_COMM_WORLD_SIZE"],
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            (Launcher::Mpich, "PMI_RANK", &["PMI_SIZE"], "MPI_LOCALRANKID"),
            // A batch script has SLURM_NTASKS for the whole allocation but runs one process;
            // srun sets the step's own task count.
            (
                Launcher::Slurm,
                "SLURM_PROCID",
                &["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"],
                "SLURM_LOCALID",
            ),
            (Launcher::Torchrun, "RANK", &["WORLD_SIZE"], "LOCAL_RANK"),
        ];
        for (launcher, rank_var, size_vars, local_var) in candidates {
            let Some(rank) = number(rank_var)? else {
                continue;
            };
            let mut size = None;
            let mut size_var = size_vars[0];
            for v in size_vars {
                if let Some(n) = number(v)? {
                    size = Some(n);
                    size_var = v;
                    break;
                }
            }
            let Some(world_size) = size else {
                continue;
            };
            if world_size == 0 || rank >= world_size {
                return Err(Error::input(
                    format!("environment variables {rank_var} and {size_var}"),
                    format!("rank {rank} is not in a world of {world_size} processes"),
                ));
            }
            let (master, rendezvous) = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
                (Some(a), Some(p)) if launcher == Launcher::Torchrun => {
                    let port = rendezvous_port(&p, var("DIFFALIGN_RENDEZVOUS_PORT"))?;
                    let at = Endpoint { host: a.clone(), port };
                    (Some(format!("{a}:{p}")), Some(at))
                }
                _ => (None, None),
            };
            return Ok(Launch {
                launcher,
                rank,
                world_size,
                local_rank: number(local_var)?.unwrap_or(0),
                master,
                rendezvous,
            });
        }
        Ok(Launch::alone())
    }
}

/// The port of the NCCL id exchange: `DIFFALIGN_RENDEZVOUS_PORT` when set, else `MASTER_PORT + 1`.
fn rendezvous_port(master_port: &str, chosen: Option<String>) -> Result<u16> {
    let parse = |name: &str, v: &str| {
        v.trim().parse::<u16>().map_err(|_| {
            Error::input(
                format!("environment variable {name}"),
                format!("must be a TCP port (0 to 65535), got {v:?}"),
            )
        })
    };
    if let Some(v) = chosen {
        return parse("DIFFALIGN_RENDEZVOUS_PORT", &v);
    }
    parse("MASTER_PORT", master_port)?.checked_add(1).ok_or_else(|| {
        Error::input(
            "environment variable MASTER_PORT",
            "65535 leaves no port above it for the NCCL id: set DIFFALIGN_RENDEZVOUS_PORT",
        )
    })
}

/// Every rank's `bytes`, given every rank's length `lens` and `gather`, an all-gather of pieces
/// of equal length: each rank's bytes padded to the longest, gathered, cut back.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn gather_padded(bytes: &[u8], lens: &[u64], gather: impl FnOnce(&[u8]) -> Vec<u8>) -> Vec<Vec<u8>> {
    let longest = lens.iter().copied().max().unwrap_or(0) as usize;
    if longest == 0 {
        return vec![Vec::new(); lens.len()];
    }
    let mut mine = bytes.to_vec();
    mine.resize(longest, 0);
    gather(&mine)
        .chunks(longest)
        .zip(lens)
        .map(|(c, &l)| c[..l as usize].to_vec())
        .collect()
}

/// The communicator of a run: rank, world size and the collectives, identical in effect on
/// every backend.
pub struct Comm {
    rank: usize,
    size: usize,
    backend: Backend,
}

enum Backend {
    Alone,
    #[cfg(feature = "mpi")]
    Mpi(mpi::Mpi),
    #[cfg(feature = "nccl")]
    Nccl(nccl::Nccl),
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

/// Elements per reduction: gradients are summed in buckets of this many f64 (64 MiB), so the
/// scratch memory of a step stays small whatever the model.
const BUCKET: usize = 8 << 20;

impl Comm {
    /// A process on its own.
    pub fn alone() -> Self {
        Comm {
            rank: 0,
            size: 1,
            backend: Backend::Alone,
        }
    }

    /// Joins the world `launch` describes, computing on `device`: MPI for `mpirun`, `mpiexec`
    /// and `srun`, NCCL for `torchrun`. A world of one needs no library, except under torchrun
    /// on a GPU in a build with `nccl`, which goes through NCCL all the same so that one GPU
    /// exercises the path that eight take. A launcher this build cannot serve is an error saying
    /// which feature to build with, never N unconnected copies of the run.
    pub fn connect(launch: &Launch, device: &Device) -> Result<Self> {
        let started = format!(
            "started by {} as rank {} of {}",
            launch.launcher.name(),
            launch.rank,
            launch.world_size
        );
        if launch.launcher == Launcher::Torchrun && (launch.world_size > 1 || device.is_cuda()) {
            #[cfg(feature = "nccl")]
            {
                let at = launch.rendezvous.as_ref().ok_or_else(|| {
                    Error::input(
                        "launch",
                        format!("{started}, but MASTER_ADDR and MASTER_PORT are not both set"),
                    )
                })?;
                let n = nccl::Nccl::connect(launch.rank, launch.world_size, device, at)?;
                return Ok(Comm {
                    rank: launch.rank,
                    size: launch.world_size,
                    backend: Backend::Nccl(n),
                });
            }
            #[cfg(not(feature = "nccl"))]
            if launch.world_size > 1 {
                return Err(Error::input(
                    "launch",
                    format!(
                        "{started}, but this build has no `nccl` feature: build with `cargo build --release \
                         --features nccl` (CUDA and NCCL) for GPUs, or start CPU runs with mpirun or srun"
                    ),
                ));
            }
        }
        if launch.world_size == 1 {
            return Ok(Comm::alone());
        }
        #[cfg(feature = "mpi")]
        {
            let m = mpi::Mpi::init()?;
            let (rank, size) = (m.rank(), m.size());
            if (rank, size) != (launch.rank, launch.world_size) {
                return Err(Error::input(
                    "MPI",
                    format!("{started}, but MPI says rank {rank} of {size}"),
                ));
            }
            Ok(Comm {
                rank,
                size,
                backend: Backend::Mpi(m),
            })
        }
        #[cfg(not(feature = "mpi"))]
        Err(Error::input(
            "launch",
            format!(
                "{started}, but this build has no `mpi` feature: build with `cargo build --release --features mpi`"
            ),
        ))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this is rank 0, the one that writes files and prints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Waits until every rank has arrived.
    pub fn barrier(&self) {
        match &self.backend {
            Backend::Alone => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.barrier(),
            #[cfg(feature = "nccl")]
            Backend::Nccl(n) => n.barrier(),
        }
    }

    /// Runs `f` on rank 0 first and on the others once it is done: for steps that create
    /// shared files (the output folder's state, the latent cache's identity).
    pub fn rank0_first<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.is_main() {
            let r = f();
            self.barrier();
            r
        } else {
            self.barrier();
            f()
        }
    }

    /// Sums `values` over the ranks, in place; every rank ends with the same bits.
    #[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(unused_variables))]
    pub fn sum_f64(&self, values: &mut [f64]) {
        match &self.backend {
            Backend::Alone => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.sum(values),
            #[cfg(feature = "nccl")]
            Backend::Nccl(n) => n.sum(values),
        }
    }

    /// Rank 0's `values` on every rank.
    #[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(unused_variables))]
    pub fn broadcast_f32(&self, values: &mut [f32]) {
        match &self.backend {
            Backend::Alone => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.broadcast(values),
            #[cfg(feature = "nccl")]
            Backend::Nccl(n) => n.broadcast(values),
        }
    }

    /// Every rank's `bytes`, in rank order.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match &self.backend {
            Backend::Alone => vec![bytes.to_vec()],
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.all_gather_bytes(bytes),
            #[cfg(feature = "nccl")]
            Backend::Nccl(n) => n.all_gather_bytes(bytes),
        }
    }

    /// Every rank's `value`, in rank order (through JSON).
    pub fn all_gather<T: Serialize + DeserializeOwned>(&self, value: &T) -> Result<Vec<T>> {
        let wire = |e: serde_json::Error| Error::input("a value gathered from every rank", e.to_string());
        let json = serde_json::to_vec(value).map_err(wire)?;
        self.all_gather_bytes(&json)
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(wire))
            .collect()
    }

    /// Sums each tensor of `tensors` over the ranks, in f64, through one bucket of at most
    /// [`BUCKET`] elements at a time; the tensors keep their dtype. On NCCL a bucket of tensors on
    /// the GPU is summed there; others go through the host. Does nothing for a process alone.
    pub fn sum_tensors(&self, tensors: &mut [Tensor]) -> Result<()> {
        if matches!(self.backend, Backend::Alone) {
            return Ok(());
        }
        let mut start = 0;
        while start < tensors.len() {
            // Tensors [start, end) fill this bucket; a tensor larger than a bucket goes alone.
            let mut end = start;
            let mut len = 0;
            while end < tensors.len() && (end == start || len + tensors[end].elem_count() <= BUCKET) {
                len += tensors[end].elem_count();
                end += 1;
            }
            self.sum_bucket(&mut tensors[start..end], len)?;
            start = end;
        }
        Ok(())
    }

    /// Sums the `len` elements of `bucket` over the ranks.
    fn sum_bucket(&self, bucket: &mut [Tensor], len: usize) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Backend::Nccl(n) = &self.backend {
            if bucket.iter().all(|t| n.holds(t)) {
                return n.sum_tensors(bucket);
            }
        }
        let mut values = Vec::with_capacity(len);
        for t in bucket.iter() {
            values.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        self.sum_f64(&mut values);
        let mut offset = 0;
        for t in bucket.iter_mut() {
            let n = t.elem_count();
            *t = Tensor::from_slice(&values[offset..offset + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
            offset += n;
        }
        Ok(())
    }

    /// Rank 0's values of each tensor of `tensors` on every rank (f32 on the wire; the
    /// tensors keep their dtype). Does nothing for a process alone.
    pub fn broadcast_tensors(&self, tensors: &mut [Tensor]) -> Result<()> {
        if matches!(self.backend, Backend::Alone) {
            return Ok(());
        }
        for t in tensors.iter_mut() {
            let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.broadcast_f32(&mut values);
            *t = Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
        }
        Ok(())
    }

    /// Ends every process of the run with `code` (an error on one rank would leave the others
    /// waiting in a collective).
    pub fn abort(&self, code: i32) -> ! {
        match &self.backend {
            Backend::Alone => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.abort(code),
            // torchrun stops the other workers once one exits with an error.
            #[cfg(feature = "nccl")]
            Backend::Nccl(_) => std::process::exit(code),
        }
    }
}
