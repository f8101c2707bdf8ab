//! The GPU side of the kernel suite: device buffers, CUDA-event timing, and one prepared
//! benchmark per case with the custom kernel and its reference (cuDNN, cuBLAS, or nothing for the
//! memory-bound kernels, which are compared with the measured copy bandwidth instead).
//!
//! A [`Prepared`] case owns its buffers and holds one closure per implementation, each queueing one
//! launch on the backend's stream; [`Gpu::time`] (the CLI) and [`Gpu::time_iters`] (criterion's
//! `iter_custom`) time those closures with events, so both front ends measure the same thing.

use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result};
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::f16;
use rand::{Rng, SeedableRng};

use super::cases::{BnCase, Cases, ConvCase, PoolCase, RMSPROP_BYTES_PER_PARAM};
use super::cudnn::{Dnn, DnnConv};
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::ops::batchnorm::cuda::{bn_workspace, BnArgs, BnBackward, BnForwardTrain};
use crate::ops::concat::cuda::CopyChannels;
use crate::ops::conv::cuda::{
    choose, wgrad_workspace_elems, ConvDgrad, ConvFprop, ConvMode, ConvOut, ConvWgrad,
};
use crate::ops::conv::ConvShape;
use crate::ops::pool::cuda::{PoolBackward, PoolForward};
use crate::ops::softmax_ce::cuda::{Labels, ScaleArg, SoftmaxCe};
use crate::optim::cuda::{Rmsprop, RmspropParams};

/// Untimed launches before measuring.
const WARMUP: usize = 3;
/// Each timed sample runs enough launches to last about this long.
const SAMPLE_MS: f64 = 1.0;
/// Workspace offered to cuDNN's algorithm search and launches.
const CUDNN_WORKSPACE: usize = 1 << 30;
/// Size of the device-to-device copy that sets the bandwidth reference.
const COPY_BYTES: usize = 1 << 30;

/// A device allocation and its raw address.
pub struct DevBuf {
    _mem: CudaSlice<u8>,
    pub ptr: DevPtr,
}

/// How to fill a buffer: fp16 in [-1, 1], fp32 in [-1, 1], or fp32 in [0.5, 1.5] (variances).
#[derive(Clone, Copy)]
enum Fill {
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
    dnn: Result<Dnn, String>,
    blas: Result<CudaBlas, String>,
    cudnn_ws: Option<DevBuf>,
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
    fn filled(&self, count: usize, fill: Fill) -> Result<DevBuf> {
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

/// Every case of the suite in order, as ids; [`Gpu::prepare`] builds one.
#[derive(Clone, Debug)]
pub enum Case {
    Copy,
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

impl Case {
    /// All cases of `cases`: the copy reference first (the bandwidth rows need it).
    pub fn all(cases: &Cases) -> Vec<Case> {
        let mut v = vec![Case::Copy];
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

impl Gpu {
    /// Allocates and fills the buffers of `case` and returns its runnable implementations.
    pub fn prepare<'a>(&'a self, case: &Case, cases: &Cases) -> Result<Prepared<'a>> {
        match case {
            Case::Copy => self.prep_copy(),
            Case::Conv(c, m) => self.prep_conv(case.id(), c.label(), c.flop(), &c.shape, *m),
            Case::ConvPad8(c) => self.prep_conv_pad8(case.id(), c),
            Case::Fc(m) => self.prep_fc(case.id(), &cases.fc_shape(), *m),
            Case::Bn(b, fwd) => self.prep_bn(case.id(), b, *fwd),
            Case::Pool(p, fwd) => self.prep_pool(case.id(), p, *fwd),
            Case::SoftmaxCe => self.prep_softmax(case.id(), cases.batch, cases.classes),
            Case::Rmsprop => self.prep_rmsprop(case.id(), cases.params),
        }
    }

    fn prep_copy(&self) -> Result<Prepared<'_>> {
        let src = self.filled(COPY_BYTES / 4, Fill::F32)?;
        let dst = self.alloc(COPY_BYTES)?;
        let stream = self.be.stream.cu_stream();
        let run = move || -> Result<()> {
            // SAFETY: both buffers hold COPY_BYTES and live as long as the closure.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, COPY_BYTES, stream)
            }?;
            Ok(())
        };
        Ok(Prepared {
            id: Case::Copy.id(),
            group: "copy",
            shape: format!("{} MiB", COPY_BYTES >> 20),
            work: Work::Bytes(2.0 * COPY_BYTES as f64),
            variants: vec![Variant {
                label: "cuMemcpyDtoD".into(),
                reference: true,
                run: Box::new(run),
            }],
            note: None,
        })
    }

    fn prep_conv(
        &self,
        id: String,
        shape: String,
        flop: f64,
        s: &ConvShape,
        mode: ConvMode,
    ) -> Result<Prepared<'_>> {
        let c = s.conv;
        let x_len = s.n * s.h * s.w * c.cin;
        let y_len = s.n * s.oh() * s.ow() * c.cout;
        let w_len = c.cout * c.kh * c.kw * c.cin;
        // Roles as cuDNN sees them: x (dx for dgrad), w (dw for wgrad), y (dy for the gradients).
        let x = Rc::new(self.filled(x_len, Fill::F16)?);
        let w = Rc::new(self.filled(w_len, Fill::F16)?);
        let y = Rc::new(self.filled(y_len, Fill::F16)?);
        let be = &self.be;
        let s = *s;
        let mut variants = Vec::new();
        let (xc, wc, yc) = (x.clone(), w.clone(), y.clone());
        match mode {
            ConvMode::Fprop => {
                let out = ConvOut::dense(yc.ptr, c.cout);
                let imp = choose(be, &s, mode, Some(&out));
                let call = ConvFprop {
                    s,
                    x: xc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                variants.push(Variant {
                    label: format!("custom {imp:?}"),
                    reference: false,
                    run: Box::new(move || call.launch(be)),
                });
            }
            ConvMode::Dgrad => {
                let out = ConvOut::dense(xc.ptr, c.cin);
                let imp = choose(be, &s, mode, Some(&out));
                let call = ConvDgrad {
                    s,
                    dy: yc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                variants.push(Variant {
                    label: format!("custom {imp:?}"),
                    reference: false,
                    run: Box::new(move || call.launch(be)),
                });
            }
            ConvMode::Wgrad => {
                let imp = choose(be, &s, mode, None);
                let ws_elems = wgrad_workspace_elems(&s, be.num_sms);
                let ws = self.alloc(ws_elems * 4)?;
                let dw = self.alloc(w_len * 4)?;
                let call = wgrad(s, xc.ptr, yc.ptr, dw.ptr, ws.ptr, ws_elems);
                variants.push(Variant {
                    label: format!("custom {imp:?} (fp32 dW)"),
                    reference: false,
                    run: Box::new(move || {
                        let _ = (&ws, &dw);
                        call.launch(be)
                    }),
                });
            }
        }
        let mut note = None;
        match (&self.dnn, &self.cudnn_ws) {
            (Ok(dnn), Some(ws)) => match self.cudnn_conv(dnn, ws, &s, mode, &x, &w, &y) {
                Ok(v) => variants.push(v),
                Err(e) => note = Some(format!("{e:#}")),
            },
            (Err(e), _) => note = Some(e.clone()),
            _ => note = Some("no cuDNN workspace".into()),
        }
        Ok(Prepared {
            id,
            group: "conv",
            shape,
            work: Work::Flop(flop),
            variants,
            note,
        })
    }

    /// pad_channels(x) + the tensor-core forward on the 8-channel shape, against cuDNN's forward on
    /// the original shape. FLOP are those of the original convolution.
    fn prep_conv_pad8(&self, id: String, case: &ConvCase) -> Result<Prepared<'_>> {
        let s = case.shape;
        let c = s.conv;
        let p = pad8(&s);
        let rows = s.n * s.h * s.w;
        let w_rows = c.cout * c.kh * c.kw;
        let x = Rc::new(self.filled(rows * c.cin, Fill::F16)?);
        let w = Rc::new(self.filled(w_rows * c.cin, Fill::F16)?);
        let y = Rc::new(self.filled(s.n * s.oh() * s.ow() * c.cout, Fill::F16)?);
        let x8 = self.alloc(rows * 8 * 2)?;
        let w8 = self.alloc(w_rows * 8 * 2)?;
        let be = &self.be;
        CopyChannels::pad(w_rows, c.cin, 8, w.ptr, w8.ptr).launch(be)?;
        be.synchronize()?;
        let out = ConvOut::dense(y.ptr, c.cout);
        let imp = choose(be, &p, ConvMode::Fprop, Some(&out));
        let pad = CopyChannels::pad(rows, c.cin, 8, x.ptr, x8.ptr);
        let conv = ConvFprop {
            s: p,
            x: x8.ptr,
            w: w8.ptr,
            out,
            imp: None,
        };
        let keep = (x.clone(), x8, w8);
        let mut variants = vec![Variant {
            label: format!("pad_channels + custom {imp:?}"),
            reference: false,
            run: Box::new(move || {
                let _ = &keep;
                pad.launch(be)?;
                conv.launch(be)
            }),
        }];
        let mut note = None;
        match (&self.dnn, &self.cudnn_ws) {
            (Ok(dnn), Some(ws)) => {
                match self.cudnn_conv(dnn, ws, &s, ConvMode::Fprop, &x, &w, &y) {
                    Ok(v) => variants.push(v),
                    Err(e) => note = Some(format!("{e:#}")),
                }
            }
            (Err(e), _) => note = Some(e.clone()),
            _ => note = Some("no cuDNN workspace".into()),
        }
        Ok(Prepared {
            id,
            group: "conv",
            shape: case.label(),
            work: Work::Flop(case.flop()),
            variants,
            note,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn cudnn_conv<'a>(
        &'a self,
        dnn: &'a Dnn,
        ws: &'a DevBuf,
        s: &ConvShape,
        mode: ConvMode,
        x: &Rc<DevBuf>,
        w: &Rc<DevBuf>,
        y: &Rc<DevBuf>,
    ) -> Result<Variant<'a>> {
        let conv = DnnConv::new(s)?;
        let algo = conv.find(dnn, mode, x.ptr, w.ptr, y.ptr, ws.ptr, CUDNN_WORKSPACE)?;
        let (x, w, y) = (x.clone(), w.clone(), y.clone());
        let wsp = ws.ptr;
        Ok(Variant {
            label: algo.describe(),
            reference: true,
            run: Box::new(move || conv.run(dnn, &algo, x.ptr, w.ptr, y.ptr, wsp)),
        })
    }

    /// The classifier y[n][out] = x[n][in] W[out][in]^T as its three GEMMs: ours (the 1x1
    /// convolution launchers the linear layer uses, bias excluded) against cublasGemmEx with fp16
    /// operands and fp32 compute (fp32 output for the weight gradient, like ours).
    fn prep_fc(&self, id: String, s: &ConvShape, mode: ConvMode) -> Result<Prepared<'_>> {
        let s = *s;
        let (n, fin, fout) = (s.n, s.conv.cin, s.conv.cout);
        let be = &self.be;
        let x = Rc::new(self.filled(n * fin, Fill::F16)?);
        let w = Rc::new(self.filled(fout * fin, Fill::F16)?);
        let y = Rc::new(self.filled(n * fout, Fill::F16)?);
        let dw = Rc::new(self.alloc(fout * fin * 4)?);
        let (xc, wc, yc, dwc) = (x.clone(), w.clone(), y.clone(), dw.clone());
        let custom: Box<dyn FnMut() -> Result<()>> = match mode {
            ConvMode::Fprop => {
                let out = ConvOut::dense(yc.ptr, fout);
                let call = ConvFprop {
                    s,
                    x: xc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                Box::new(move || call.launch(be))
            }
            ConvMode::Dgrad => {
                let out = ConvOut::dense(xc.ptr, fin);
                let call = ConvDgrad {
                    s,
                    dy: yc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                Box::new(move || call.launch(be))
            }
            ConvMode::Wgrad => {
                let ws_elems = wgrad_workspace_elems(&s, be.num_sms);
                let ws = self.alloc(ws_elems * 4)?;
                let call = wgrad(s, xc.ptr, yc.ptr, dwc.ptr, ws.ptr, ws_elems);
                Box::new(move || {
                    let _ = (&ws, &xc, &yc, &dwc);
                    call.launch(be)
                })
            }
        };
        let out = (mode != ConvMode::Dgrad).then_some(ConvOut::dense(y.ptr, fout));
        let imp = choose(be, &s, mode, out.as_ref());
        let mut variants = vec![Variant {
            label: format!("custom {imp:?}"),
            reference: false,
            run: custom,
        }];
        let mut note = None;
        match &self.blas {
            Ok(blas) => {
                let handle = *blas.handle();
                variants.push(Variant {
                    label: "cublasGemmEx fp16/fp32".into(),
                    reference: true,
                    run: Box::new(move || {
                        fc_gemm(handle, mode, (n, fin, fout), x.ptr, w.ptr, y.ptr, dw.ptr)
                    }),
                });
            }
            Err(e) => note = Some(e.clone()),
        }
        Ok(Prepared {
            id,
            group: "fc",
            shape: format!("{n}x{fin}->{fout}"),
            work: Work::Flop(2.0 * (n * fin * fout) as f64),
            variants,
            note,
        })
    }

    fn prep_bn(&self, id: String, b: &BnCase, fwd: bool) -> Result<Prepared<'_>> {
        let (m, c) = (b.m, b.c);
        let x = self.filled(m * c, Fill::F16)?;
        let y = self.filled(m * c, Fill::F16)?;
        let dy = self.filled(m * c, Fill::F16)?;
        let dx = self.alloc(m * c * 2)?;
        let gamma = self.filled(c, Fill::F32Positive)?;
        let beta = self.filled(c, Fill::F32)?;
        let mean = self.filled(c, Fill::F32)?;
        let inv_std = self.filled(c, Fill::F32Positive)?;
        let rmean = self.filled(c, Fill::F32)?;
        let rvar = self.filled(c, Fill::F32Positive)?;
        let dgamma = self.alloc(c * 4)?;
        let dbeta = self.alloc(c * 4)?;
        let ws = self.alloc(bn_workspace(m, c) * 4)?;
        let args = BnArgs {
            m,
            c,
            eps: 1e-3,
            momentum: 0.1,
            relu: true,
            gamma: gamma.ptr,
            beta: beta.ptr,
            save_mean: mean.ptr,
            save_inv_std: inv_std.ptr,
            running_mean: rmean.ptr,
            running_var: rvar.ptr,
            ldy: c,
            yoff: 0,
        };
        let be = &self.be;
        // The forward overwrites the saved statistics: the backward case has its own buffers.
        let forward = BnForwardTrain {
            a: args,
            x: x.ptr,
            y: y.ptr,
            ws: ws.ptr,
        };
        let backward = BnBackward {
            a: args,
            x: x.ptr,
            y: y.ptr,
            dy: dy.ptr,
            dgamma: dgamma.ptr,
            dbeta: dbeta.ptr,
            dx: dx.ptr,
            accumulate: false,
            ws: ws.ptr,
        };
        let keep = (
            gamma, beta, mean, inv_std, rmean, rvar, x, y, dy, dx, dgamma, dbeta, ws,
        );
        let run: Box<dyn FnMut() -> Result<()>> = Box::new(move || {
            let _ = &keep;
            match fwd {
                true => forward.launch(be),
                false => backward.launch(be),
            }
        });
        Ok(Prepared {
            id,
            group: "batchnorm",
            shape: format!("[{m}][{c}] +relu"),
            work: Work::Bytes(if fwd { b.fwd_bytes() } else { b.bwd_bytes() }),
            variants: vec![Variant {
                label: if fwd {
                    "bn_forward_train"
                } else {
                    "bn_backward"
                }
                .into(),
                reference: false,
                run,
            }],
            note: None,
        })
    }

    fn prep_pool(&self, id: String, p: &PoolCase, fwd: bool) -> Result<Prepared<'_>> {
        let s = p.shape;
        let x = self.filled(s.n * s.h * s.w * s.c, Fill::F16)?;
        let dx = self.alloc(s.n * s.h * s.w * s.c * 2)?;
        let y = self.filled(s.n * s.oh() * s.ow() * s.c, Fill::F16)?;
        let be = &self.be;
        let max = p.max;
        let (ldy, yoff) = (s.c, 0);
        let forward = PoolForward {
            s,
            max,
            x: x.ptr,
            y: y.ptr,
            ldy,
            yoff,
        };
        let backward = PoolBackward {
            s,
            max,
            x: x.ptr,
            dy: y.ptr,
            ldy,
            yoff,
            dx: dx.ptr,
            accumulate: false,
        };
        let keep = (x, y, dx);
        let run: Box<dyn FnMut() -> Result<()>> = Box::new(move || {
            let _ = &keep;
            match fwd {
                true => forward.launch(be),
                false => backward.launch(be),
            }
        });
        let kind = if max { "maxpool" } else { "avgpool" };
        Ok(Prepared {
            id,
            group: "pool",
            shape: p.label(),
            work: Work::Bytes(if fwd { p.fwd_bytes() } else { p.bwd_bytes() }),
            variants: vec![Variant {
                label: format!("{kind}_{}", if fwd { "fwd" } else { "bwd" }),
                reference: false,
                run,
            }],
            note: None,
        })
    }

    fn prep_softmax(&self, id: String, n: usize, k: usize) -> Result<Prepared<'_>> {
        let logits = self.filled(n * k, Fill::F16)?;
        let dlogits = self.alloc(n * k * 2)?;
        let labels: Vec<i32> = (0..n).map(|i| ((i * 7919) % k) as i32).collect();
        let lab = self.alloc(n * 4)?;
        // SAFETY: `lab` holds n i32 values.
        unsafe { cudarc::driver::result::memcpy_htod_sync(lab.ptr, &labels) }?;
        let row_loss = self.alloc(n * 4)?;
        let loss = self.alloc(4)?;
        let counter = self.alloc(4)?;
        let be = &self.be;
        let call = SoftmaxCe {
            n,
            k,
            smoothing: 0.1,
            grad_scale: ScaleArg::Value(1.0),
            logits: logits.ptr,
            labels: Labels::I32(lab.ptr),
            row_loss: row_loss.ptr,
            loss: loss.ptr,
            counter: counter.ptr,
            dlogits: dlogits.ptr,
        };
        let keep = (logits, lab, row_loss, loss, counter, dlogits);
        let run = move || {
            let _ = &keep;
            call.launch(be)
        };
        Ok(Prepared {
            id,
            group: "softmax_ce",
            shape: format!("{n}x{k}"),
            // Read the logits and the labels, write the logit gradients.
            work: Work::Bytes((2 * n * k * 2 + n * 4) as f64),
            variants: vec![Variant {
                label: "softmax_ce_i32".into(),
                reference: false,
                run: Box::new(run),
            }],
            note: None,
        })
    }

    fn prep_rmsprop(&self, id: String, count: usize) -> Result<Prepared<'_>> {
        let w = self.filled(count, Fill::F32)?;
        let w16 = self.alloc(count * 2)?;
        let ms = self.filled(count, Fill::F32Positive)?;
        let mom = self.filled(count, Fill::F32)?;
        let grad = self.filled(count, Fill::F32)?;
        let p = RmspropParams {
            w: w.ptr,
            w16: w16.ptr,
            ms: ms.ptr,
            mom: mom.ptr,
            grad: grad.ptr,
            count: count as u64,
            lr: 1e-6,
            rho: 0.9,
            momentum: 0.9,
            eps: 1.0,
            weight_decay: 4e-5,
            inv_loss_scale: 1.0,
            ..Default::default()
        };
        let be = &self.be;
        let keep = (w, w16, ms, mom, grad);
        let run = move || {
            let _ = &keep;
            Rmsprop {
                params: p,
                grad_f16: false,
            }
            .launch(be)
        };
        Ok(Prepared {
            id,
            group: "rmsprop",
            shape: format!("{count} params, fp32 grads"),
            work: Work::Bytes(RMSPROP_BYTES_PER_PARAM * count as f64),
            variants: vec![Variant {
                label: "rmsprop_f32".into(),
                reference: false,
                run: Box::new(run),
            }],
            note: None,
        })
    }
}

/// The weight-gradient call of a benchmark case (fp32 dW, overwritten).
fn wgrad(
    s: ConvShape,
    x: DevPtr,
    dy: DevPtr,
    dw: DevPtr,
    ws: DevPtr,
    ws_elems: usize,
) -> ConvWgrad {
    ConvWgrad {
        s,
        x,
        dy,
        dw,
        accumulate: false,
        ws,
        ws_elems,
        imp: None,
    }
}

/// `s` with its input channels padded to 8 (what [`Case::ConvPad8`] runs).
pub fn pad8(s: &ConvShape) -> ConvShape {
    let mut p = *s;
    p.conv.cin = 8;
    p
}

/// One cublasGemmEx of the classifier (column-major view of row-major tensors):
/// fprop Y^T = W^T^T X^T; dgrad dX^T = W^T dY^T; wgrad dW^T = X^T dY (fp32 output).
fn fc_gemm(
    handle: cublas::sys::cublasHandle_t,
    mode: ConvMode,
    (n, fin, fout): (usize, usize, usize),
    x: DevPtr,
    w: DevPtr,
    y: DevPtr,
    dw: DevPtr,
) -> Result<()> {
    use cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType,
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (n, fin, fout) = (n as i32, fin as i32, fout as i32);
    let h = cudaDataType::CUDA_R_16F;
    // (transa, transb, m, n, k, A, lda, B, ldb, C, C type, ldc)
    let (ta, tb, m, nn, k, a, lda, b, ldb, c, ct, ldc) = match mode {
        ConvMode::Fprop => (
            Op::CUBLAS_OP_T,
            Op::CUBLAS_OP_N,
            fout,
            n,
            fin,
            w,
            fin,
            x,
            fin,
            y,
            h,
            fout,
        ),
        ConvMode::Dgrad => (
            Op::CUBLAS_OP_N,
            Op::CUBLAS_OP_N,
            fin,
            n,
            fout,
            w,
            fin,
            y,
            fout,
            x,
            h,
            fin,
        ),
        ConvMode::Wgrad => (
            Op::CUBLAS_OP_N,
            Op::CUBLAS_OP_T,
            fin,
            fout,
            n,
            x,
            fin,
            y,
            fout,
            dw,
            cudaDataType::CUDA_R_32F,
            fin,
        ),
    };
    // SAFETY: the buffers hold the matrices these dimensions describe (allocated in prep_fc) and
    // alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cublas::result::gemm_ex(
            handle,
            ta,
            tb,
            m,
            nn,
            k,
            &alpha as *const f32 as *const _,
            a as *const _,
            h,
            lda,
            b as *const _,
            h,
            ldb,
            &beta as *const f32 as *const _,
            c as *mut _,
            ct,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| anyhow::anyhow!("cublasGemmEx: {e:?}"))
}
