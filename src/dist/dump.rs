//! Test hook (`INCEPTION_DIST_DUMP=<dir>`): what the tests cannot see from outside a job. The
//! first gradient all-reduce writes this rank's gradients before and after the reduction as raw
//! little-endian f32 (`grads-local-rank<r>.f32`, `grads-reduced-rank<r>.f32`), and the trainer
//! writes each rank's final state, so a test can check that the sum is exact and the ranks agree.

use super::{Comm, GradReducer};
use anyhow::{Context, Result};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The folder `INCEPTION_DIST_DUMP` names, if set.
pub fn dir() -> Option<PathBuf> {
    std::env::var_os("INCEPTION_DIST_DUMP").map(PathBuf::from)
}

/// A reducer that records its first call.
pub struct DumpFirst {
    inner: Rc<dyn Comm>,
    dir: PathBuf,
    done: Cell<bool>,
}

impl DumpFirst {
    pub fn new(inner: Rc<dyn Comm>, dir: PathBuf) -> Self {
        DumpFirst {
            inner,
            dir,
            done: Cell::new(false),
        }
    }
}

fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

impl GradReducer for DumpFirst {
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let first = !self.done.replace(true);
        let rank = self.inner.rank();
        if first {
            std::fs::create_dir_all(&self.dir)?;
            write_f32(&self.dir.join(format!("grads-local-rank{rank}.f32")), buf)?;
        }
        self.inner.all_reduce_sum(buf)?;
        if first {
            write_f32(&self.dir.join(format!("grads-reduced-rank{rank}.f32")), buf)?;
        }
        Ok(())
    }

    fn world(&self) -> usize {
        self.inner.world()
    }
}
