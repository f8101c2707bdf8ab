//! The GPU side of the kernel suite: device buffers, CUDA-event timing, and one prepared
//! benchmark per case with the custom kernel and its reference (cuDNN, cuBLAS, or nothing for the
//! memory-bound kernels, which are compared with the measured copy bandwidth instead).
//!
//! A [`Prepared`] case owns its buffers and holds one closure per implementation, each queueing one
//! launch on the backend's stream; [`Gpu::time`] (the CLI) and [`Gpu::time_iters`] (criterion's
//! `iter_custom`) time those closures with events, so both front ends measure the same thing.

use std::time::Duration;

use anyhow::{Context, Result};
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::f16;
use rand::{Rng, SeedableRng};

use super::cases::{BnCase, Cases, ConvCase, PoolCase};
use super::cudnn::Dnn;
use crate::gpu::{CudaDevice, DevPtr, KernelPaths};
use crate::ops::conv::cuda::{candidates, needs_pad8, ConvMode, ConvTarget};
use crate::ops::conv::ConvShape;
use crate::precision::Amp;

/// Untimed launches before measuring.
const WARMUP: usize = 3;
/// Each timed sample runs enough launches to last about this long.
const SAMPLE_MS: f64 = 1.0;
/// Workspace offered to cuDNN's algorithm search and launches.
pub(super) const CUDNN_WORKSPACE: usize = 1 << 30;
/// Size of the device-to-device copy that sets the bandwidth reference.
pub(super) const COPY_BYTES: usize = 1 << 30;
/// Side of the square fp16 matrix product that sets the matrix-rate reference.
pub(super) const MATRIX_DIM: usize = 8192;

/// A device allocation and its raw address.
pub struct DevBuf {
    _mem: CudaSlice<u8>,
    pub ptr: DevPtr,
}

/// How to fill a buffer: fp16 in [-1, 1], fp32 in [-1, 1], or fp32 in [0.5, 1.5] (variances).
#[derive(Clone, Copy)]
pub(super) enum Fill {
    F16,
    F32,
    F32Positive,
}

/// One measurement: median and best time of one launch over the samples.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    /// Launches per timed sample.
    pub reps: usize,
}

/// What a case's figure of merit counts.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    Flop(f64),
    Bytes(f64),
}

/// One implementation of a case: its label and a closure that queues one launch.
pub struct Variant<'a> {
    pub label: String,
    /// The reference implementation (cuDNN, cuBLAS, the copy engine) rather than ours.
    pub reference: bool,
    pub run: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// A case ready to time: its id (for --filter), what it counts, and its implementations.
pub struct Prepared<'a> {
    pub id: String,
    pub group: &'static str,
    pub shape: String,
    pub work: Work,
    pub variants: Vec<Variant<'a>>,
    /// Why a reference is missing, when it is.
    pub note: Option<String>,
}

/// The open GPU: backend (with every kernel loaded), cuDNN and cuBLAS when their libraries load.
pub struct Gpu {
    pub be: CudaDevice,
    pub(super) dnn: Result<Dnn, String>,
    pub(super) blas: Result<CudaBlas, String>,
    pub(super) cudnn_ws: Option<DevBuf>,
    pub samples: usize,
    seed: std::cell::Cell<u64>,
}

impl Gpu {
    /// Opens GPU 0. Without a GPU, driver or NVRTC this is an error that says so.
    pub fn open(samples: usize) -> Result<Self> {
        let be = CudaDevice::new(0).context("the kernel benchmarks need an NVIDIA GPU")?;
        let dnn = Dnn::new(&be.stream).map_err(|e| format!("{e:#}"));
        // SAFETY: only tries to dlopen the candidate library names.
        let blas = if unsafe { cublas::sys::is_culib_present() } {
            CudaBlas::new(be.stream.clone()).map_err(|e| format!("cuBLAS: {e}"))
        } else {
            Err("libcublas not found".to_string())
        };
        let mut gpu = Self {
            be,
            dnn,
            blas,
            cudnn_ws: None,
            samples: samples.max(1),
            seed: std::cell::Cell::new(1),
        };
        if gpu.dnn.is_ok() {
            gpu.cudnn_ws = Some(gpu.alloc(CUDNN_WORKSPACE)?);
        }
        Ok(gpu)
    }

    /// Card name, compute capability and library versions, for the report.
    pub fn describe(&self) -> String {
        let name = self.be.ctx.name().unwrap_or_else(|_| "?".into());
        let dnn = match &self.dnn {
            Ok(_) => format!("cuDNN {}", Dnn::version()),
            Err(e) => format!("no cuDNN ({e})"),
        };
        let blas = match &self.blas {
            Ok(_) => "cuBLAS".to_string(),
            Err(e) => format!("no cuBLAS ({e})"),
        };
        format!(
            "{name} ({}, {} SMs), {dnn}, {blas}",
            self.be.arch, self.be.num_sms
        )
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let mem = self.be.stream.alloc_zeros::<u8>(bytes.max(16))?;
        let ptr = mem.device_ptr(&self.be.stream).0;
        Ok(DevBuf { _mem: mem, ptr })
    }

    /// A buffer of `count` elements filled with random values of `fill`'s type and range: a random
    /// chunk is uploaded, then doubled on the device until it covers the buffer.
    pub(super) fn filled(&self, count: usize, fill: Fill) -> Result<DevBuf> {
        let elem = if matches!(fill, Fill::F16) { 2 } else { 4 };
        let bytes = count.max(1) * elem;
        let buf = self.alloc(bytes)?;
        let seed = self.seed.get();
        self.seed.set(seed + 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = count.clamp(1, 1 << 18);
        let chunk: Vec<u8> = match fill {
            Fill::F16 => (0..n)
                .flat_map(|_| f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
                .collect(),
            Fill::F32 => (0..n)
                .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
                .collect(),
            Fill::F32Positive => (0..n)
                .flat_map(|_| rng.random_range(0.5f32..1.5).to_le_bytes())
                .collect(),
        };
        // SAFETY: the destination range lies inside `buf`, which outlives the synchronous copy.
        unsafe { cudarc::driver::result::memcpy_htod_sync(buf.ptr, &chunk) }?;
        let mut done = chunk.len();
        while done < bytes {
            let len = done.min(bytes - done);
            // SAFETY: source [0, len) and destination [done, done + len) lie inside `buf` and do
            // not overlap; the copies are ordered on the stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    buf.ptr + done as u64,
                    buf.ptr,
                    len,
                    self.be.stream.cu_stream(),
                )
            }?;
            done += len;
        }
        self.be.synchronize()?;
        Ok(buf)
    }

    /// Milliseconds `reps` launches of `f` take on the stream, between two events.
    fn events(&self, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.be.stream.record_event(flags)?;
        for _ in 0..reps {
            f()?;
        }
        let end = self.be.stream.record_event(flags)?;
        Ok(start.elapsed_ms(&end)? as f64)
    }

    /// Warm-up, then `samples` timed samples of enough launches to last about a millisecond each;
    /// the median and the best per-launch time.
    pub fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Timing> {
        for _ in 0..WARMUP {
            f()?;
        }
        let one = self.events(1, f)?;
        let reps = ((SAMPLE_MS / one.max(1e-4)).ceil() as usize).clamp(1, 1000);
        let mut per: Vec<f64> = (0..self.samples)
            .map(|_| self.events(reps, f).map(|ms| ms / reps as f64))
            .collect::<Result<_>>()?;
        per.sort_by(f64::total_cmp);
        Ok(Timing {
            median_ms: per[per.len() / 2],
            min_ms: per[0],
            reps,
        })
    }

    /// `iters` launches timed with events: criterion's `iter_custom`.
    pub fn time_iters(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        let ms = self.events(iters as usize, f)?;
        Ok(Duration::from_secs_f64(ms / 1000.0))
    }

    /// Marks the tensor-core kernels of these shapes verified where they match the plain kernels
    /// (what the executor does at start-up), so the launchers pick what training would run.
    pub fn verify(&self, shapes: &[ConvShape]) -> Result<usize> {
        let checks = crate::backend::cuda::verify::verify_conv_shapes(&self.be, shapes)?;
        Ok(checks
            .iter()
            .filter(|c| c.status == crate::gpu::check::Status::Fail)
            .count())
    }
}

/// The card's matrix rate (TFLOP/s) and copy bandwidth (GB/s), measured as the suite's two
/// reference rows measure them (`bench train` prints the step's limit at these rates).
pub fn measure_rates(samples: usize) -> Result<crate::backend::cuda::cost::Rates> {
    let gpu = Gpu::open(samples)?;
    let rate = |prep: Result<Prepared>| -> Result<f64> {
        let mut prep = prep?;
        let amount = match prep.work {
            Work::Flop(f) => f / 1e12,
            Work::Bytes(b) => b / 1e9,
        };
        let t = gpu.time(&mut prep.variants[0].run)?;
        Ok(amount / (t.median_ms / 1e3))
    };
    let copy_gbps = rate(gpu.prep_copy())?;
    // Without cuBLAS the matrix rate stays unknown (the step's limit then too).
    let matrix_tflops = rate(gpu.prep_matrix()).ok();
    Ok(crate::backend::cuda::cost::Rates {
        matrix_tflops,
        copy_gbps: Some(copy_gbps),
    })
}

/// Every case of the suite in order, as ids; [`Gpu::prepare`] builds one.
#[derive(Clone, Debug)]
pub enum Case {
    Copy,
    /// The matrix-rate reference: a large cuBLAS fp16 product.
    Matrix,
    Conv(ConvCase, ConvMode),
    /// A forward whose input channels are not a multiple of 8 (the 3-channel stem) on the
    /// tensor-core path: input padded to 8 channels on the device (timed), weights padded once.
    ConvPad8(ConvCase),
    Fc(ConvMode),
    Bn(BnCase, bool),
    Pool(PoolCase, bool),
    SoftmaxCe,
    Rmsprop,
}

const MODES: [ConvMode; 3] = [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad];

fn mode_name(m: ConvMode) -> &'static str {
    match m {
        ConvMode::Fprop => "fprop",
        ConvMode::Dgrad => "dgrad",
        ConvMode::Wgrad => "wgrad",
    }
}

/// Whether the lean kernel paths prefer another implementation than the baseline for `mode` of
/// `s` (at O2 on a 132-SM GPU, the lent H100/H200; the tile rule's SM threshold does not decide
/// any of the changes): the conv cases `bench kernels --kernels baseline --kernels lean` times
/// differently.
pub fn lean_differs(s: &ConvShape, mode: ConvMode) -> bool {
    let target = |paths| ConvTarget {
        amp: Amp::O2,
        num_sms: 132,
        paths,
    };
    let first = |paths| {
        let padded = needs_pad8(s);
        candidates(&target(paths), s, mode, None, padded)
            .first()
            .copied()
    };
    first(KernelPaths::LEAN) != first(KernelPaths::BASELINE)
}

impl Case {
    /// All cases of `cases`: the copy and matrix references first (the other rows' limits
    /// need them).
    pub fn all(cases: &Cases) -> Vec<Case> {
        let mut v = vec![Case::Copy, Case::Matrix];
        for c in &cases.convs {
            v.extend(MODES.iter().map(|&m| Case::Conv(c.clone(), m)));
            if c.shape.conv.cin % 8 != 0 {
                v.push(Case::ConvPad8(c.clone()));
            }
        }
        v.extend(MODES.iter().map(|&m| Case::Fc(m)));
        for b in &cases.bns {
            v.push(Case::Bn(b.clone(), true));
            v.push(Case::Bn(b.clone(), false));
        }
        for p in &cases.pools {
            v.push(Case::Pool(p.clone(), true));
            v.push(Case::Pool(p.clone(), false));
        }
        v.push(Case::SoftmaxCe);
        v.push(Case::Rmsprop);
        v
    }

    /// `group/name/direction`, what `--filter` matches.
    pub fn id(&self) -> String {
        let dir = |fwd: bool| if fwd { "fwd" } else { "bwd" };
        match self {
            Case::Copy => "copy/dtod".into(),
            Case::Matrix => format!("matrix/cublas/{MATRIX_DIM}"),
            Case::Conv(c, m) => format!("conv/{}/{}", c.name, mode_name(*m)),
            Case::ConvPad8(c) => format!("conv/{}/fprop_pad8", c.name),
            Case::Fc(m) => format!("fc/classifier/{}", mode_name(*m)),
            Case::Bn(b, f) => format!("bn/{}/{}", b.name, dir(*f)),
            Case::Pool(p, f) => format!("pool/{}/{}", p.name, dir(*f)),
            Case::SoftmaxCe => "softmax_ce/loss/fwd+bwd".into(),
            Case::Rmsprop => "rmsprop/params/step".into(),
        }
    }
}
