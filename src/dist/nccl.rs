//! The NCCL backend of [`super::Comm`], on the cudarc bindings candle re-exports (as candle's
//! multi-GPU examples use them): one communicator per process, on the GPU the process computes
//! on, its collectives queued on that device's candle stream so that they follow the step's
//! kernels in order. The unique id goes from rank 0 to the others by [`super::rendezvous`].
//!
//! Sums are reduced to rank 0 and broadcast from there, as on MPI: NCCL documents no promise
//! that an all-reduce leaves the same bits on every rank (its tree and ring algorithms add in
//! different orders), and the ranks' weights must never drift apart.

use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};

use super::rendezvous::{self, Endpoint, Server};
use crate::{Error, Result};

/// How long rank 0 waits for the others to fetch the id, and they for rank 0 to serve it.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// Bytes of NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
const ID_BYTES: usize = 128;

/// An NCCL communicator and the CUDA device it serves.
pub(super) struct Nccl {
    comm: Comm,
    device: CudaDevice,
}

fn nccl_error(what: &str, e: NcclError) -> Error {
    Error::input("NCCL", format!("{what}: {:?}", e.0))
}

/// A failed collective ends this process with the error (MPI's default handler does the same);
/// the collectives that return nothing have no caller to hand it to, and torchrun stops the
/// other ranks once one exits with an error.
fn fatal(rank: usize, what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("error (rank {rank}): NCCL {what}: {e}");
    std::process::exit(1)
}

impl Nccl {
    /// Joins the world of `world_size` as `rank` on `device`, which must be a CUDA device: rank 0
    /// makes the unique id and serves it on `at`'s port, the others fetch it from `at`.
    pub(super) fn connect(rank: usize, world_size: usize, device: &Device, at: &Endpoint) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::input(
                "NCCL",
                format!("rank {rank} of {world_size} runs on {device:?}: NCCL needs --device cuda"),
            ));
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            if world_size > 1 {
                Server::bind(at.port)?.serve(&bytes, world_size, RENDEZVOUS_TIMEOUT)?;
            }
            id
        } else {
            let bytes = rendezvous::fetch(at, rank, world_size, ID_BYTES, RENDEZVOUS_TIMEOUT)?;
            let mut internal = [0; ID_BYTES];
            for (d, b) in internal.iter_mut().zip(bytes) {
                *d = b as _;
            }
            Id::uninit(internal)
        };
        let stream = cuda.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::input("NCCL", format!("rank {rank}: binding the CUDA context: {e}")))?;
        let comm = Comm::from_rank(stream, rank, world_size, id).map_err(|e| {
            nccl_error(
                &format!("ncclCommInitRank (rank {rank} of {world_size}, id from {at})"),
                e,
            )
        })?;
        Ok(Nccl {
            comm,
            device: cuda.clone(),
        })
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Sums `buf` over the ranks in place: reduced into rank 0's `buf`, then broadcast.
    fn sum_in_place(&self, buf: &mut CudaSlice<f64>) -> std::result::Result<(), NcclError> {
        self.comm.reduce_in_place(buf, &ReduceOp::Sum, 0)?;
        self.comm.broadcast_in_place(buf, 0)?;
        Ok(())
    }

    /// Copies `values` to the device, runs `op` on them there and copies the result back.
    fn through_device<T: DeviceRepr>(
        &self,
        values: &mut [T],
        what: &str,
        op: impl FnOnce(&mut CudaSlice<T>) -> std::result::Result<(), NcclError>,
    ) {
        let stream = self.device.cuda_stream();
        let mut buf = stream
            .clone_htod(&*values)
            .unwrap_or_else(|e| fatal(self.rank(), what, e));
        op(&mut buf).unwrap_or_else(|e| fatal(self.rank(), what, format!("{:?}", e.0)));
        stream
            .memcpy_dtoh(&buf, values)
            .and_then(|()| stream.synchronize())
            .unwrap_or_else(|e| fatal(self.rank(), what, e));
    }

    pub(super) fn sum(&self, values: &mut [f64]) {
        self.through_device(values, "sum", |buf| self.sum_in_place(buf));
    }

    pub(super) fn broadcast(&self, values: &mut [f32]) {
        self.through_device(values, "broadcast", |buf| {
            self.comm.broadcast_in_place(buf, 0).map(|_| ())
        });
    }

    /// NCCL has no barrier: a collective whose result is waited for is one.
    pub(super) fn barrier(&self) {
        self.sum(&mut [0.0]);
    }

    /// Every rank's bytes, in rank order: the lengths first, then the bytes padded to the
    /// longest.
    pub(super) fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let lens = self.all_gather(&[bytes.len() as u64], "all_gather of lengths");
        super::gather_padded(bytes, &lens, |mine| self.all_gather(mine, "all_gather of bytes"))
    }

    /// Every rank's `mine` (equal lengths), concatenated in rank order.
    fn all_gather<T: DeviceRepr + ValidAsZeroBits + NcclType>(&self, mine: &[T], what: &str) -> Vec<T> {
        let stream = self.device.cuda_stream();
        let rank = self.rank();
        let send = stream.clone_htod(mine).unwrap_or_else(|e| fatal(rank, what, e));
        let mut recv = stream
            .alloc_zeros::<T>(mine.len() * self.comm.world_size())
            .unwrap_or_else(|e| fatal(rank, what, e));
        self.comm
            .all_gather(&send, &mut recv)
            .unwrap_or_else(|e| fatal(rank, what, format!("{:?}", e.0)));
        stream.clone_dtoh(&recv).unwrap_or_else(|e| fatal(rank, what, e))
    }

    /// Whether `t` lives on this backend's GPU, so that its sums can stay there.
    pub(super) fn holds(&self, t: &Tensor) -> bool {
        t.device().same_device(&Device::Cuda(self.device.clone()))
    }

    /// Sums each tensor of `bucket` (all on this GPU, see [`Nccl::holds`]) over the ranks in f64,
    /// on the device: concatenated, summed in one collective, split again; the tensors keep
    /// their dtype.
    pub(super) fn sum_tensors(&self, bucket: &mut [Tensor]) -> Result<()> {
        let flat = bucket
            .iter()
            .map(|t| t.flatten_all()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = self.sum_flat(&Tensor::cat(&flat, 0)?)?;
        drop(flat);
        let mut offset = 0;
        for t in bucket.iter_mut() {
            let n = t.elem_count();
            *t = summed.narrow(0, offset, n)?.reshape(t.shape())?.to_dtype(t.dtype())?;
            offset += n;
        }
        Ok(())
    }

    /// `flat` (one dimension, f64, on this GPU) summed over the ranks, as a new tensor.
    fn sum_flat(&self, flat: &Tensor) -> Result<Tensor> {
        let n = flat.elem_count();
        let rank = self.rank();
        let mut total = {
            let (storage, layout) = flat.storage_and_layout();
            let (Storage::Cuda(cuda), true) = (&*storage, layout.is_contiguous()) else {
                return Err(Error::input(
                    "NCCL",
                    format!("rank {rank}: a gradient bucket that is not contiguous on the GPU"),
                ));
            };
            let start = layout.start_offset();
            let values = cuda.as_cuda_slice::<f64>()?.slice(start..start + n);
            let copy = self.device.cuda_stream().clone_dtod(&values);
            copy.map_err(|e| Error::input("NCCL", format!("rank {rank}: copying a gradient bucket: {e}")))?
        };
        self.sum_in_place(&mut total)
            .map_err(|e| nccl_error(&format!("rank {rank}: summing {n} gradient values"), e))?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(total, self.device.clone()));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }
}
