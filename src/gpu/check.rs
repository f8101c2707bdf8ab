//! The GPU check harness every op's self-test case uses: fresh random inputs (fp16-rounded, so
//! host and device see the same numbers), outputs poisoned with NaN first, and comparison against
//! an oracle with fp16 tolerances (fp32 ones for the O0 variants).
//!
//! A [`SelfTest`] checks the kernels of its device's precision level (`CudaDevice::amp`): every
//! kernel at O2, the fp32 `_o0` variants at O0, the fp16-statistics BN variants at O3. Buffers
//! take the level's types ([`AnyBuf`]); checks of a variant are reported as `kernel [O0]`.
//!
//! The oracles are the ops' CPU references (src/ops/<op>/mod.rs, called directly by each case in
//! src/ops/<op>/check.rs) and, for the tensor-core convolutions, the plain FMA kernels. The CPU
//! convolution at the real shapes is slow, so [`SelfTest::cpu_conv`] can switch it off (the start-up
//! check of the fast kernels needs only the plain-kernel oracle).

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{CudaDevice, DevPtr};
use crate::precision::Amp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub kernel: String,
    pub shape: String,
    pub oracle: String,
    pub status: Status,
    /// Largest |gpu - oracle|.
    pub max_abs_err: f32,
    /// max_abs_err divided by the largest |oracle| value: the figure compared with the tolerance.
    pub rel_err: f32,
}

/// Tolerances on `rel_err`: fp16 outputs carry ~5e-4 relative rounding and long fp32 sums differ in
/// order, so 1e-2 of the output's scale; reductions into statistics get 2e-2.
pub const TOL: f32 = 1e-2;
pub const TOL_REDUCTION: f32 = 2e-2;
/// The O0 variants see the same fp16-representable inputs in fp32 and store fp32: what is left is
/// summation order (~1e-6 of the output's scale at these sizes) and fast-math exp/rsqrt.
pub const TOL_O0: f32 = 1e-4;
pub const TOL_REDUCTION_O0: f32 = 2e-4;

/// Compares `got` against `want`: NaN anywhere in `got` (a poisoned value never written) fails.
pub fn compare(got: &[f32], want: &[f32], tol: f32) -> (Status, f32, f32) {
    if got.len() != want.len() {
        return (Status::Fail, f32::INFINITY, f32::INFINITY);
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut err = 0f32;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        if !d.is_finite() {
            return (Status::Fail, f32::INFINITY, f32::INFINITY);
        }
        err = err.max(d);
    }
    let rel = err / scale;
    (
        if rel <= tol {
            Status::Pass
        } else {
            Status::Fail
        },
        err,
        rel,
    )
}

/// The self-test driver: owns the random source and the report.
pub struct SelfTest<'a> {
    pub dev: &'a CudaDevice,
    /// Whether the convolution cases compare the plain kernels with the CPU reference too.
    pub cpu_conv: bool,
    pub rng: ChaCha8Rng,
    pub checks: Vec<Check>,
}

/// A device buffer and the raw pointer launchers take.
pub struct Buf<T> {
    pub dev: CudaSlice<T>,
    pub ptr: DevPtr,
}

/// A device tensor whose element type depends on the precision level under test.
pub enum AnyBuf {
    F16(Buf<f16>),
    F32(Buf<f32>),
}

impl AnyBuf {
    pub fn ptr(&self) -> DevPtr {
        match self {
            AnyBuf::F16(b) => b.ptr,
            AnyBuf::F32(b) => b.ptr,
        }
    }
}

impl<'a> SelfTest<'a> {
    pub fn new(dev: &'a CudaDevice, seed: u64) -> Self {
        Self {
            dev,
            cpu_conv: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
            checks: Vec::new(),
        }
    }

    /// Uniform values in [-scale, scale], rounded to fp16 so host and device see the same numbers.
    pub fn random(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| f16::from_f32(self.rng.random_range(-scale..scale)).to_f32())
            .collect()
    }

    pub fn buf<T: DeviceRepr>(&self, host: &[T]) -> Result<Buf<T>> {
        let dev = self.dev.stream.clone_htod(host)?;
        let ptr = dev.device_ptr(&self.dev.stream).0;
        Ok(Buf { dev, ptr })
    }

    pub fn f16_buf(&self, host: &[f32]) -> Result<Buf<f16>> {
        self.buf(&host.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
    }

    /// An output buffer filled with NaN, so anything a kernel fails to write shows up.
    pub fn poisoned_f16(&self, len: usize) -> Result<Buf<f16>> {
        self.buf(&vec![f16::NAN; len])
    }

    pub fn poisoned_f32(&self, len: usize) -> Result<Buf<f32>> {
        self.buf(&vec![f32::NAN; len])
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        let dev = self.dev.stream.alloc_zeros::<T>(len.max(1))?;
        let ptr = dev.device_ptr(&self.dev.stream).0;
        Ok(Buf { dev, ptr })
    }

    pub fn read_f16(&self, b: &Buf<f16>) -> Result<Vec<f32>> {
        Ok(self
            .dev
            .stream
            .clone_dtoh(&b.dev)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }

    pub fn read_f32(&self, b: &Buf<f32>) -> Result<Vec<f32>> {
        Ok(self.dev.stream.clone_dtoh(&b.dev)?)
    }

    /// `host` on the device as fp16 or fp32.
    pub fn typed(&self, host: &[f32], f16: bool) -> Result<AnyBuf> {
        Ok(if f16 {
            AnyBuf::F16(self.f16_buf(host)?)
        } else {
            AnyBuf::F32(self.buf(host)?)
        })
    }

    pub fn poisoned(&self, len: usize, f16: bool) -> Result<AnyBuf> {
        Ok(if f16 {
            AnyBuf::F16(self.poisoned_f16(len)?)
        } else {
            AnyBuf::F32(self.poisoned_f32(len)?)
        })
    }

    /// Activations, their gradients and conv/FC weights: fp32 at O0, fp16 otherwise.
    pub fn act(&self, host: &[f32]) -> Result<AnyBuf> {
        self.typed(host, self.dev.amp != Amp::O0)
    }

    pub fn poisoned_act(&self, len: usize) -> Result<AnyBuf> {
        self.poisoned(len, self.dev.amp != Amp::O0)
    }

    /// BN gamma/beta: fp16 (the working copy) at O3, fp32 otherwise.
    pub fn bn_param(&self, host: &[f32]) -> Result<AnyBuf> {
        self.typed(host, self.dev.amp == Amp::O3)
    }

    /// BN saved mean / inverse std: fp16 at O3, fp32 otherwise.
    pub fn poisoned_bn_stat(&self, len: usize) -> Result<AnyBuf> {
        self.poisoned(len, self.dev.amp == Amp::O3)
    }

    pub fn read(&self, t: &AnyBuf) -> Result<Vec<f32>> {
        match t {
            AnyBuf::F16(b) => self.read_f16(b),
            AnyBuf::F32(b) => self.read_f32(b),
        }
    }

    /// Tolerance of elementwise outputs at this precision level.
    pub fn tol(&self) -> f32 {
        if self.dev.amp == Amp::O0 {
            TOL_O0
        } else {
            TOL
        }
    }

    /// Tolerance of reductions (statistics, losses, parameter gradients) at this level.
    pub fn tol_reduction(&self) -> f32 {
        if self.dev.amp == Amp::O0 {
            TOL_REDUCTION_O0
        } else {
            TOL_REDUCTION
        }
    }

    /// Report name of `kernel` at this level: unchanged at O2, `kernel [O0]` for a variant.
    pub fn at_level(&self, kernel: &str) -> String {
        match self.dev.amp {
            Amp::O2 => kernel.to_string(),
            amp => format!("{kernel} [{amp:?}]"),
        }
    }

    pub fn record(
        &mut self,
        kernel: &str,
        shape: &str,
        oracle: &str,
        got: &[f32],
        want: Option<&[f32]>,
        tol: f32,
    ) -> Status {
        let (status, max_abs_err, rel_err) = match want {
            Some(w) => compare(got, w, tol),
            None => (Status::Skip, 0.0, 0.0),
        };
        let check = Check {
            kernel: kernel.into(),
            shape: shape.into(),
            oracle: oracle.into(),
            status,
            max_abs_err,
            rel_err,
        };
        self.checks.push(check);
        status
    }

    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }
}
