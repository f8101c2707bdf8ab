//! [`Comm`] over MPI (rsmpi): the launcher's rendezvous, and the collectives on the host.
//!
//! rsmpi has no in-place all-reduce, so a gradient buffer is reduced in buckets through a
//! scratch buffer of one bucket and copied back: the extra memory is one bucket, not a second
//! gradient buffer, and `bench allreduce` measures what the bucket size costs.

use super::watchdog;
use super::{Comm, GradReducer};
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::cell::{Cell, RefCell};

pub struct MpiComm {
    // Dropped before `universe`, whose drop finalises MPI.
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local: (usize, usize),
    bucket: Cell<usize>,
    scratch: RefCell<Vec<f32>>,
    _universe: Universe,
}

impl MpiComm {
    /// Initialises MPI (thread level multiple, so the watchdog thread may abort) and finds this
    /// process's place in the job and on its node.
    pub fn init() -> Result<Self> {
        let Some((universe, _level)) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        else {
            bail!("MPI was already initialised in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let node = world.split_shared(world.rank());
        let local = (node.rank() as usize, node.size() as usize);
        drop(node);
        Ok(MpiComm {
            world,
            rank,
            size,
            local,
            bucket: Cell::new(super::DEFAULT_BUCKET_ELEMS),
            scratch: RefCell::new(Vec::new()),
            _universe: universe,
        })
    }
}

/// Aborts every rank of the job (the watchdog and the panic hook, on any thread).
pub fn abort_world(code: i32) -> ! {
    // SAFETY: MPI is initialised whenever the world has more than one rank (the only caller's
    // condition); MPI_Abort does not return.
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

impl GradReducer for MpiComm {
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let _waiting = watchdog::enter("gradient all-reduce");
        let bucket = self.bucket.get().max(1);
        let mut scratch = self.scratch.borrow_mut();
        scratch.resize(bucket.min(buf.len()), 0.0);
        for chunk in buf.chunks_mut(bucket) {
            let out = &mut scratch[..chunk.len()];
            self.world
                .all_reduce_into(&*chunk, &mut *out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
        Ok(())
    }

    fn world(&self) -> usize {
        self.size
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn local_rank(&self) -> usize {
        self.local.0
    }

    fn local_size(&self) -> usize {
        self.local.1
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _waiting = watchdog::enter("metrics all-reduce");
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _waiting = watchdog::enter("broadcast from rank 0");
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let _waiting = watchdog::enter("broadcast from rank 0");
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn transport(&self) -> String {
        let (major, minor) = mpi::environment::version();
        let library = mpi::environment::library_version().unwrap_or_default();
        // "Open MPI v4.1.4, package: ...": the name and version are enough.
        let library = library.split(',').next().unwrap_or("").trim().to_string();
        format!("MPI {major}.{minor} ({library})")
    }

    fn set_bucket_elems(&self, elems: usize) {
        self.bucket.set(elems.max(1));
    }
}
