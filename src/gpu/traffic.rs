//! A model of the device memory a kernel call moves: the bytes of every tensor each of its
//! launches reads and writes, each counted once per launch that touches it (as if re-reads within
//! a launch, such as overlapping pooling windows, hit the cache). The BN and pool launchers give
//! theirs (`traffic`), and `bench train` prints the step's sums. No time is measured here: the
//! model is for comparing paths on the host.

use serde::Serialize;

use crate::precision::Amp;

/// Bytes read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub read: u64,
    pub written: u64,
}

impl Traffic {
    pub fn new(read: usize, written: usize) -> Self {
        Traffic {
            read: read as u64,
            written: written as u64,
        }
    }

    pub fn total(&self) -> u64 {
        self.read + self.written
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            read: self.read + o.read,
            written: self.written + o.written,
        }
    }
}

impl std::iter::Sum for Traffic {
    fn sum<I: Iterator<Item = Traffic>>(iter: I) -> Traffic {
        iter.fold(Traffic::default(), |a, b| a + b)
    }
}

/// Bytes of an activation (or activation gradient) element at a level: fp32 at O0, else fp16.
pub fn act_bytes(amp: Amp) -> usize {
    if amp == Amp::O0 {
        4
    } else {
        2
    }
}

/// Bytes of a BN parameter or saved statistic at a level: fp16 at O3, else fp32.
pub fn bn_stat_bytes(amp: Amp) -> usize {
    if amp == Amp::O3 {
        2
    } else {
        4
    }
}
