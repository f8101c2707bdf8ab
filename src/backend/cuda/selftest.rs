//! The GPU self-test harness: runs each kernel on fresh random inputs at the InceptionV4 shapes,
//! with outputs poisoned (NaN) first, and compares against an oracle with fp16 tolerances (fp32
//! ones for the O0 variants).
//!
//! A [`SelfTest`] checks the kernels of its backend's precision level (`CudaDevice::amp`): every
//! kernel at O2, the fp32 `_o0` variants at O0, the fp16-statistics BN variants at O3. Buffers
//! take the level's types ([`AnyBuf`]); checks of a variant are reported as `kernel [O0]`.
//!
//! Two oracles:
//! - the plain FMA convolution kernels, for the tensor-core kernels (always available); a fast
//!   kernel that matches is recorded in the backend's registry of verified shapes;
//! - the CPU reference, through the [`CpuReference`] hook. Every method defaults to `None`
//!   ("not wired"), which the report shows as SKIP; src/ops plugs in by implementing the trait.

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::gpu::device::{CudaDevice, DevPtr};
use super::conv::{self, ConvImpl, ConvMode, ConvOut, ConvShape};
use super::ops::PoolShape;
use crate::backend::Amp;
use crate::plan::{Conv2d, Op, Plan};

/// Outputs of a training-mode BN forward.
pub struct BnForwardRef {
    pub y: Vec<f32>,
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

/// Outputs of a BN backward.
pub struct BnBackwardRef {
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// One BN test problem: activations [m][c] and the BN parameters (host copies).
pub struct BnCase<'a> {
    pub m: usize,
    pub c: usize,
    pub eps: f32,
    pub momentum: f32,
    pub relu: bool,
    pub x: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub running_mean: &'a [f32],
    pub running_var: &'a [f32],
}

/// RMSProp hyper-parameters of the self-test step.
#[derive(Clone, Copy, Debug)]
pub struct RmspropHyper {
    pub lr: f32,
    pub rho: f32,
    pub momentum: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub inv_loss_scale: f32,
}

/// Where the CPU reference (src/ops) plugs in. All tensors are f32 host slices holding exactly the
/// fp16-rounded values the GPU saw; layouts as in the plan (NHWC, [cout][kh][kw][cin]).
/// Returning `None` means "not wired yet": the check is reported as SKIP.
#[allow(unused_variables)]
pub trait CpuReference {
    fn conv_fprop(&self, s: &ConvShape, x: &[f32], w: &[f32]) -> Option<Vec<f32>> {
        None
    }
    fn conv_dgrad(&self, s: &ConvShape, dy: &[f32], w: &[f32]) -> Option<Vec<f32>> {
        None
    }
    fn conv_wgrad(&self, s: &ConvShape, x: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
        None
    }
    fn bn_forward_train(&self, case: &BnCase) -> Option<BnForwardRef> {
        None
    }
    /// Inference forward with the case's running statistics (ReLU applied when `case.relu`).
    fn bn_forward_infer(&self, case: &BnCase) -> Option<Vec<f32>> {
        None
    }
    /// `y` is the forward output (used by the fused ReLU backward); mean/inv_std the saved stats.
    fn bn_backward(
        &self,
        case: &BnCase,
        y: &[f32],
        dy: &[f32],
        mean: &[f32],
        inv_std: &[f32],
    ) -> Option<BnBackwardRef> {
        None
    }
    fn pool_forward(&self, s: &PoolShape, max: bool, x: &[f32]) -> Option<Vec<f32>> {
        None
    }
    fn pool_backward(&self, s: &PoolShape, max: bool, x: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
        None
    }
    fn dropout_forward(&self, p: f32, seed: u64, step: u64, x: &[f32]) -> Option<Vec<f32>> {
        None
    }
    /// Returns (mean loss, dlogits). Labels are class indices stored as f32.
    fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        smoothing: f32,
        grad_scale: f32,
        logits: &[f32],
        labels: &[f32],
    ) -> Option<(f32, Vec<f32>)> {
        None
    }
    /// One RMSProp step in place on (w, ms, mom); decay[i] says whether element i is decayed.
    #[allow(clippy::too_many_arguments)]
    fn rmsprop(
        &self,
        h: &RmspropHyper,
        g: &[f32],
        decay: &[bool],
        w: &mut [f32],
        ms: &mut [f32],
        mom: &mut [f32],
    ) -> Option<()> {
        None
    }
}

/// The reference while src/ops is not wired: every CPU comparison is skipped.
pub struct NoReference;
impl CpuReference for NoReference {}

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
    pub(super) be: &'a CudaDevice,
    pub(super) reference: &'a dyn CpuReference,
    pub(super) rng: ChaCha8Rng,
    pub checks: Vec<Check>,
}

/// A device buffer and the raw pointer launchers take.
pub(super) struct Buf<T> {
    pub(super) dev: CudaSlice<T>,
    pub(super) ptr: DevPtr,
}

/// A device tensor whose element type depends on the precision level under test.
pub(super) enum AnyBuf {
    F16(Buf<f16>),
    F32(Buf<f32>),
}

impl AnyBuf {
    pub(super) fn ptr(&self) -> DevPtr {
        match self {
            AnyBuf::F16(b) => b.ptr,
            AnyBuf::F32(b) => b.ptr,
        }
    }
}

impl<'a> SelfTest<'a> {
    pub fn new(be: &'a CudaDevice, reference: &'a dyn CpuReference, seed: u64) -> Self {
        Self {
            be,
            reference,
            rng: ChaCha8Rng::seed_from_u64(seed),
            checks: Vec::new(),
        }
    }

    /// Uniform values in [-scale, scale], rounded to fp16 so host and device see the same numbers.
    pub(super) fn random(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| f16::from_f32(self.rng.random_range(-scale..scale)).to_f32())
            .collect()
    }

    pub(super) fn buf<T: DeviceRepr>(&self, host: &[T]) -> Result<Buf<T>> {
        let dev = self.be.stream.clone_htod(host)?;
        let ptr = dev.device_ptr(&self.be.stream).0;
        Ok(Buf { dev, ptr })
    }

    pub(super) fn f16_buf(&self, host: &[f32]) -> Result<Buf<f16>> {
        self.buf(&host.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
    }

    /// An output buffer filled with NaN, so anything a kernel fails to write shows up.
    pub(super) fn poisoned_f16(&self, len: usize) -> Result<Buf<f16>> {
        self.buf(&vec![f16::NAN; len])
    }

    pub(super) fn poisoned_f32(&self, len: usize) -> Result<Buf<f32>> {
        self.buf(&vec![f32::NAN; len])
    }

    pub(super) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        let dev = self.be.stream.alloc_zeros::<T>(len.max(1))?;
        let ptr = dev.device_ptr(&self.be.stream).0;
        Ok(Buf { dev, ptr })
    }

    pub(super) fn read_f16(&self, b: &Buf<f16>) -> Result<Vec<f32>> {
        Ok(self
            .be
            .stream
            .clone_dtoh(&b.dev)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }

    pub(super) fn read_f32(&self, b: &Buf<f32>) -> Result<Vec<f32>> {
        Ok(self.be.stream.clone_dtoh(&b.dev)?)
    }

    /// `host` on the device as fp16 or fp32.
    fn typed(&self, host: &[f32], f16: bool) -> Result<AnyBuf> {
        Ok(if f16 {
            AnyBuf::F16(self.f16_buf(host)?)
        } else {
            AnyBuf::F32(self.buf(host)?)
        })
    }

    fn poisoned(&self, len: usize, f16: bool) -> Result<AnyBuf> {
        Ok(if f16 {
            AnyBuf::F16(self.poisoned_f16(len)?)
        } else {
            AnyBuf::F32(self.poisoned_f32(len)?)
        })
    }

    /// Activations, their gradients and conv/FC weights: fp32 at O0, fp16 otherwise.
    pub(super) fn act(&self, host: &[f32]) -> Result<AnyBuf> {
        self.typed(host, self.be.amp != Amp::O0)
    }

    pub(super) fn poisoned_act(&self, len: usize) -> Result<AnyBuf> {
        self.poisoned(len, self.be.amp != Amp::O0)
    }

    /// BN gamma/beta: fp16 (the working copy) at O3, fp32 otherwise.
    pub(super) fn bn_param(&self, host: &[f32]) -> Result<AnyBuf> {
        self.typed(host, self.be.amp == Amp::O3)
    }

    /// BN saved mean / inverse std: fp16 at O3, fp32 otherwise.
    pub(super) fn poisoned_bn_stat(&self, len: usize) -> Result<AnyBuf> {
        self.poisoned(len, self.be.amp == Amp::O3)
    }

    pub(super) fn read(&self, t: &AnyBuf) -> Result<Vec<f32>> {
        match t {
            AnyBuf::F16(b) => self.read_f16(b),
            AnyBuf::F32(b) => self.read_f32(b),
        }
    }

    /// Tolerance of elementwise outputs at this precision level.
    pub(super) fn tol(&self) -> f32 {
        if self.be.amp == Amp::O0 {
            TOL_O0
        } else {
            TOL
        }
    }

    /// Tolerance of reductions (statistics, losses, parameter gradients) at this level.
    pub(super) fn tol_reduction(&self) -> f32 {
        if self.be.amp == Amp::O0 {
            TOL_REDUCTION_O0
        } else {
            TOL_REDUCTION
        }
    }

    /// Report name of `kernel` at this level: unchanged at O2, `kernel [O0]` for a variant.
    pub(super) fn at_level(&self, kernel: &str) -> String {
        match self.be.amp {
            Amp::O2 => kernel.to_string(),
            amp => format!("{kernel} [{amp:?}]"),
        }
    }

    pub(super) fn record(
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

/// Distinct convolution shapes of a plan (geometry plus input size), in forward order; the fully
/// connected layer is included as its 1x1-convolution equivalent.
pub fn plan_conv_shapes(plan: &Plan) -> Vec<ConvShape> {
    let mut out: Vec<ConvShape> = Vec::new();
    for node in &plan.nodes {
        let s = plan.shape(node.inputs[0]);
        let shape = match &node.op {
            Op::Conv2d(c) => ConvShape {
                conv: *c,
                n: s[0],
                h: s[1],
                w: s[2],
            },
            Op::Linear {
                in_features,
                out_features,
            } => ConvShape::fc(s[0], *in_features, *out_features),
            _ => continue,
        };
        if !out.contains(&shape) {
            out.push(shape);
        }
    }
    out
}

/// The first convolution of each distinct geometry (kernel, stride, padding) of a plan: the O0
/// check's sample, since the plain kernels' index math depends on nothing else. The fully
/// connected layer is covered by the linear check.
pub fn plan_conv_geometries(plan: &Plan) -> Vec<ConvShape> {
    let geometry = |c: Conv2d| Conv2d {
        cin: 0,
        cout: 0,
        ..c
    };
    let mut out: Vec<ConvShape> = Vec::new();
    for s in plan_conv_shapes(plan) {
        if !out.iter().any(|o| geometry(o.conv) == geometry(s.conv)) {
            out.push(s);
        }
    }
    out
}

fn conv_label(s: &ConvShape) -> String {
    format!("n{} {}", s.n, s.label())
}

impl SelfTest<'_> {
    /// fprop, dgrad and wgrad of one shape: plain kernel vs CPU reference, tensor-core kernel vs
    /// plain kernel (marking the shape verified on a pass). At O0 only the plain fp32 kernels exist.
    pub fn conv(&mut self, s: &ConvShape) -> Result<()> {
        let c = s.conv;
        let (oh, ow) = (s.oh(), s.ow());
        let k = (c.kh * c.kw * c.cin) as f32;
        let x = self.random(s.n * s.h * s.w * c.cin, 1.0);
        let w = self.random(c.cout * c.kh * c.kw * c.cin, 1.0 / k.sqrt());
        let dy = self.random(s.n * oh * ow * c.cout, 1.0);
        let (xb, wb, dyb) = (self.act(&x)?, self.act(&w)?, self.act(&dy)?);
        let label = conv_label(s);
        for mode in [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad] {
            let plain = self.run_conv(s, mode, ConvImpl::Plain, &xb, &wb, &dyb)?;
            let want = match mode {
                ConvMode::Fprop => self.reference.conv_fprop(s, &x, &w),
                ConvMode::Dgrad => self.reference.conv_dgrad(s, &dy, &w),
                ConvMode::Wgrad => self.reference.conv_wgrad(s, &x, &dy),
            };
            let name = self.at_level(&format!("conv_{mode:?}_plain").to_lowercase());
            let tol = self.tol();
            self.record(&name, &label, "cpu", &plain, want.as_deref(), tol);
            if self.be.amp == Amp::O0 || !conv::tc_supported(s, mode, None) {
                continue;
            }
            for tile in conv::TILES {
                let imp = ConvImpl::Tc(tile);
                let got = self.run_conv(s, mode, imp, &xb, &wb, &dyb)?;
                if self.record(&tile.kernel(mode), &label, "plain", &got, Some(&plain), TOL)
                    == Status::Pass
                {
                    self.be.mark_verified(s.key(mode, imp));
                }
            }
        }
        Ok(())
    }

    /// Runs one conv mode into a poisoned output and returns it (wgrad: fp32 gradient).
    fn run_conv(
        &self,
        s: &ConvShape,
        mode: ConvMode,
        imp: ConvImpl,
        x: &AnyBuf,
        w: &AnyBuf,
        dy: &AnyBuf,
    ) -> Result<Vec<f32>> {
        let c = s.conv;
        let (x, w, dy) = (x.ptr(), w.ptr(), dy.ptr());
        let out = match mode {
            ConvMode::Fprop => {
                let y = self.poisoned_act(s.n * s.oh() * s.ow() * c.cout)?;
                self.be
                    .conv_fprop(s, x, w, ConvOut::dense(y.ptr(), c.cout), Some(imp))?;
                self.read(&y)?
            }
            ConvMode::Dgrad => {
                let dx = self.poisoned_act(s.n * s.h * s.w * c.cin)?;
                self.be
                    .conv_dgrad(s, dy, w, ConvOut::dense(dx.ptr(), c.cin), Some(imp))?;
                self.read(&dx)?
            }
            ConvMode::Wgrad => {
                let dw = self.poisoned_f32(c.cout * c.kh * c.kw * c.cin)?;
                let ws_elems = self.be.conv_wgrad_workspace(s);
                let ws = self.poisoned_f32(ws_elems)?;
                self.be
                    .conv_wgrad(s, x, dy, dw.ptr, false, ws.ptr, ws_elems, Some(imp))?;
                self.read_f32(&dw)?
            }
        };
        self.be.synchronize()?;
        Ok(out)
    }

    /// The 3-channel stem on the tensor-core path: input and weights padded to 8 channels on the
    /// device (copy_channels) must give the plain 3-channel result.
    pub fn stem_padding(&mut self, s: &ConvShape) -> Result<()> {
        let c = s.conv;
        let x = self.random(s.n * s.h * s.w * c.cin, 1.0);
        let w = self.random(c.cout * c.kh * c.kw * c.cin, 0.3);
        let (xb, wb) = (self.act(&x)?, self.act(&w)?);
        let dummy = AnyBuf::F16(self.zeros::<f16>(1)?);
        let plain = self.run_conv(s, ConvMode::Fprop, ConvImpl::Plain, &xb, &wb, &dummy)?;
        let p = ConvShape {
            conv: Conv2d { cin: 8, ..c },
            ..*s
        };
        let (xp, wp) = (
            self.poisoned_act(s.n * s.h * s.w * 8)?,
            self.poisoned_act(c.cout * c.kh * c.kw * 8)?,
        );
        self.be
            .pad_channels(s.n * s.h * s.w, c.cin, 8, xb.ptr(), xp.ptr())?;
        self.be
            .pad_channels(c.cout * c.kh * c.kw, c.cin, 8, wb.ptr(), wp.ptr())?;
        let tile = conv::preferred_tile(&p, ConvMode::Fprop, self.be.num_sms);
        let got = self.run_conv(&p, ConvMode::Fprop, ConvImpl::Tc(tile), &xp, &wp, &dummy)?;
        self.record(
            &format!("pad_channels+{}", tile.kernel(ConvMode::Fprop)),
            &conv_label(s),
            "plain",
            &got,
            Some(&plain),
            TOL,
        );
        Ok(())
    }
}

impl SelfTest<'_> {
    /// Every check at the shapes of `plan` for the backend's precision level: everything at O2;
    /// at O0 the fp32 variants (the plain convolutions at one shape per geometry); at O3 the BN
    /// variants, the only kernels O3 does not share with O2.
    pub fn run_plan(&mut self, plan: &Plan) -> Result<()> {
        match self.be.amp {
            Amp::O2 => self.run_plan_o2(plan),
            Amp::O0 => {
                for s in plan_conv_geometries(plan) {
                    self.conv(&s)?;
                }
                self.run_bn(plan, false)?;
                self.run_activation_ops(plan)
            }
            Amp::O3 => self.run_bn(plan, false),
        }
    }

    /// All distinct convolutions (and the stem padded to 8 channels), BN shapes with and without
    /// ReLU, pools, global pool, dropout, softmax-CE, channel copies, the FC layer, RMSProp.
    fn run_plan_o2(&mut self, plan: &Plan) -> Result<()> {
        for s in plan_conv_shapes(plan) {
            self.conv(&s)?;
            if s.conv.cin % 8 != 0 {
                self.stem_padding(&s)?;
            }
        }
        if let Some(s) = plan_conv_shapes(plan)
            .iter()
            .find(|s| conv::tc_supported(s, ConvMode::Dgrad, None))
        {
            self.conv_slice_accumulate(s)?;
        }
        self.casts(1 << 16)?;
        self.run_bn(plan, true)?;
        self.run_activation_ops(plan)?;
        self.rmsprop(1 << 20)?;
        self.fp16_gradients(1 << 14)?;
        Ok(())
    }

    /// BN with the fused ReLU at every distinct shape (`all`) or only the first, then without
    /// ReLU at the last shape.
    fn run_bn(&mut self, plan: &Plan, all: bool) -> Result<()> {
        let bns = super::selftest_ops::plan_bn_shapes(plan);
        let with_relu = if all { bns.len() } else { 1 };
        for &(m, c) in bns.iter().take(with_relu) {
            self.batchnorm(m, c, true)?;
        }
        if let Some(&(m, c)) = bns.last() {
            self.batchnorm(m, c, false)?;
        }
        Ok(())
    }

    /// The kernels that take activations and have fp32 variants, besides convolution and BN.
    fn run_activation_ops(&mut self, plan: &Plan) -> Result<()> {
        for (s, max) in super::selftest_ops::plan_pools(plan) {
            self.pool(&s, max)?;
        }
        let feat = plan.shape(plan.logits);
        let (n, classes) = (feat[0], feat[1]);
        let gap_in = plan
            .nodes
            .iter()
            .find(|nd| nd.op == Op::GlobalAvgPool)
            .map(|nd| plan.shape(nd.inputs[0]).to_vec());
        if let Some(s) = gap_in {
            self.global_avgpool(s[0], s[1] * s[2], s[3])?;
        }
        self.dropout(n * 1536, plan.config.dropout.max(0.2))?;
        self.softmax_ce(n, classes, plan.config.label_smoothing)?;
        self.copy_channels(n * 35 * 35)?; // the rows of an Inception-A concat
        self.relu(1 << 14)?;
        if let Some((in_f, out_f)) = super::selftest_ops::plan_linear(plan) {
            self.linear(n, in_f, out_f)?;
        }
        Ok(())
    }

    /// The pass/fail table, one line per check.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<34} {:<40} {:<12} {:>6} {:>11} {:>10}\n",
            "kernel", "shape", "oracle", "status", "max_abs_err", "rel_err"
        );
        for c in &self.checks {
            out += &format!(
                "{:<34} {:<40} {:<12} {:>6} {:>11.3e} {:>10.3e}\n",
                c.kernel,
                c.shape,
                c.oracle,
                format!("{:?}", c.status).to_uppercase(),
                c.max_abs_err,
                c.rel_err
            );
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        out += &format!(
            "{} checks: {} passed, {} failed, {} skipped (no CPU reference wired)\n",
            self.checks.len(),
            count(Status::Pass),
            count(Status::Fail),
            count(Status::Skip)
        );
        out
    }
}

/// Checks the tensor-core kernels against the plain kernels at `shapes` (batch capped at 4: the
/// registry key ignores the batch) and records the passes, persisting them. The executor calls this
/// at start-up for its plan so the fast path is used only where it was checked; it needs no CPU
/// reference. Returns the checks that ran (failures mean those shapes stay on the plain kernels).
pub fn verify_conv_shapes(be: &CudaDevice, shapes: &[ConvShape]) -> Result<Vec<Check>> {
    if be.amp == Amp::O0 {
        return Ok(Vec::new()); // O0 never runs the tensor-core kernels
    }
    let mut test = SelfTest::new(be, &NoReference, 0x5eed);
    for s in shapes {
        let small = ConvShape {
            n: s.n.min(4),
            ..*s
        };
        let fast = [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad]
            .iter()
            .all(|&m| {
                let t = conv::preferred_tile(s, m, be.num_sms);
                !conv::tc_supported(s, m, None) || be.is_verified(&small.key(m, ConvImpl::Tc(t)))
            });
        if !fast {
            test.conv(&small)?;
        }
    }
    be.save_verified()?;
    Ok(test
        .checks
        .into_iter()
        .filter(|c| c.status != Status::Skip)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanConfig;

    #[test]
    fn v4_has_38_distinct_conv_shapes_plus_the_fc() {
        let plan = crate::plan::build(
            "v4",
            PlanConfig {
                batch: 2,
                ..PlanConfig::default()
            },
        )
        .unwrap();
        let shapes = plan_conv_shapes(&plan);
        assert_eq!(shapes.len(), 39);
        let fast = shapes
            .iter()
            .filter(|s| conv::tc_supported(s, ConvMode::Fprop, None))
            .count();
        assert_eq!(
            fast, 38,
            "every shape but the 3-channel stem takes the tensor-core path"
        );
    }

    #[test]
    fn the_o0_conv_sample_has_one_shape_per_geometry() {
        let plan = crate::plan::build(
            "v4",
            PlanConfig {
                batch: 2,
                ..PlanConfig::default()
            },
        )
        .unwrap();
        let sample = plan_conv_geometries(&plan);
        let geometry = |s: &ConvShape| Conv2d {
            cin: 0,
            cout: 0,
            ..s.conv
        };
        for s in plan_conv_shapes(&plan) {
            let reps = sample.iter().filter(|g| geometry(g) == geometry(&s));
            assert_eq!(reps.count(), 1, "{s:?}");
        }
        // 3x3 s2, 3x3 s1 unpadded and padded, 1x1, 1x7, 7x1, 1x3, 3x1.
        assert_eq!(sample.len(), 8);
    }

    #[test]
    fn compare_flags_nan_and_scale() {
        assert_eq!(compare(&[1.0, f32::NAN], &[1.0, 2.0], 1.0).0, Status::Fail);
        assert_eq!(compare(&[100.5, 0.0], &[100.0, 0.0], TOL).0, Status::Pass);
        assert_eq!(compare(&[102.0, 0.0], &[100.0, 0.0], TOL).0, Status::Fail);
    }
}
