//! The MPI backend of [`super::Comm`], on the rsmpi bindings: `MPI_COMM_WORLD`, used from the
//! main thread only.

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use crate::{Error, Result};

/// MPI, initialised; finalised when dropped.
pub(super) struct Mpi {
    world: SimpleCommunicator,
    /// Kept for its drop, which calls `MPI_Finalize`.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI (once per process).
    pub(super) fn init() -> Result<Self> {
        let universe =
            mpi::initialize().ok_or_else(|| Error::input("MPI", "MPI_Init failed or MPI was already initialised"))?;
        Ok(Mpi {
            world: universe.world(),
            _universe: universe,
        })
    }

    pub(super) fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    pub(super) fn size(&self) -> usize {
        self.world.size() as usize
    }

    pub(super) fn barrier(&self) {
        self.world.barrier();
    }

    /// Sums `values` on rank 0 and broadcasts the result, so all ranks hold the same bits
    /// (an all-reduce may add in a different order on each rank).
    pub(super) fn sum<T: Equivalence + Copy + Default>(&self, values: &mut [T]) {
        let root = self.world.process_at_rank(0);
        if self.world.rank() == 0 {
            let mut total = vec![T::default(); values.len()];
            root.reduce_into_root(&values[..], &mut total[..], SystemOperation::sum());
            values.copy_from_slice(&total);
        } else {
            root.reduce_into(&values[..], SystemOperation::sum());
        }
        root.broadcast_into(values);
    }

    pub(super) fn broadcast<T: Equivalence>(&self, values: &mut [T]) {
        self.world.process_at_rank(0).broadcast_into(values);
    }

    /// Every rank's bytes, in rank order: the lengths first, then the bytes padded to the
    /// longest.
    pub(super) fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let n = self.size();
        let mut lens = vec![0u64; n];
        self.world.all_gather_into(&(bytes.len() as u64), &mut lens[..]);
        super::gather_padded(bytes, &lens, |mine| {
            let mut all = vec![0u8; mine.len() * n];
            self.world.all_gather_into(mine, &mut all[..]);
            all
        })
    }

    pub(super) fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
