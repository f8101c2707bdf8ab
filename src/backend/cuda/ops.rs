//! Launchers of the non-convolution kernels: batchnorm, ReLU, pooling, dropout, softmax
//! cross-entropy, the fully connected layer, RMSProp, the overflow check, casts and channel copies.
//! None allocates: scratch space (`ws`) is passed in, sized by the `*_workspace` functions.
//! Launchers of activation kernels pick the entry point for `self.amp` ([`CudaDevice::amp_kernel`]);
//! RMSProp, the overflow check and the casts take explicit types instead.

use anyhow::{Context, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::gpu::device::{CudaDevice, DevPtr, BLOCK};
use super::conv::{ConvImpl, ConvOut, ConvShape};
use crate::cuda_launch;
use crate::plan::Pool;

/// Rows handled by one block of the BN partial reductions (8 row groups x 64 rows each).
const BN_ROWS_PER_BLOCK: u64 = 512;
const BN_MAX_SPLITS: u64 = 512;

fn bn_splits(m: u64) -> u64 {
    m.div_ceil(BN_ROWS_PER_BLOCK).clamp(1, BN_MAX_SPLITS)
}

/// fp32 elements of workspace a BN forward or backward over [m, c] needs.
pub fn bn_workspace(m: usize, c: usize) -> usize {
    bn_splits(m as u64) as usize * c * 2
}

/// One BN layer over activations viewed as [m = n*h*w][c]. gamma/beta and the saved mean/inverse
/// std are fp32 at O0/O2 and fp16 at O3 (the fp16 working copy of the parameters, fp16 arena
/// tensors); the running statistics are fp32 at every level.
#[derive(Clone, Copy, Debug)]
pub struct BnArgs {
    pub m: usize,
    pub c: usize,
    pub eps: f32,
    pub momentum: f32,
    pub relu: bool,
    pub gamma: DevPtr,
    pub beta: DevPtr,
    pub save_mean: DevPtr,
    pub save_inv_std: DevPtr,
    pub running_mean: DevPtr,
    pub running_var: DevPtr,
    /// Output (and, in backward, output-gradient) row stride and channel offset: a concat slice.
    pub ldy: usize,
    pub yoff: usize,
}

/// Mirrors `struct PoolParams` in kernels/pool.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolParams {
    pub x: u64,
    pub dy: u64,
    pub y: u64,
    pub dx: u64,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub c: i32,
    pub oh: i32,
    pub ow: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
    pub ldy: i32,
    pub yoff: i32,
    pub accumulate: i32,
}
// SAFETY: plain repr(C) data laid out like the CUDA struct.
unsafe impl DeviceRepr for PoolParams {}
const _: () = assert!(std::mem::size_of::<PoolParams>() == 80);

/// A pooling window over an [n, h, w, c] input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub pool: Pool,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl PoolShape {
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pool.pad - self.pool.k) / self.pool.stride + 1
    }
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pool.pad - self.pool.k) / self.pool.stride + 1
    }
    fn params(&self) -> PoolParams {
        PoolParams {
            n: self.n as i32,
            h: self.h as i32,
            w: self.w as i32,
            c: self.c as i32,
            oh: self.oh() as i32,
            ow: self.ow() as i32,
            k: self.pool.k as i32,
            stride: self.pool.stride as i32,
            pad: self.pool.pad as i32,
            ldy: self.c as i32,
            ..Default::default()
        }
    }
}

/// Labels of the softmax cross-entropy: int32 class indices or f32 (the plan's label tensor).
#[derive(Clone, Copy, Debug)]
pub enum Labels {
    I32(DevPtr),
    F32(DevPtr),
}

/// Mirrors `struct RmspropParams` in kernels/optimizer.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RmspropParams {
    pub w: u64,
    pub w16: u64,
    pub ms: u64,
    pub mom: u64,
    pub grad: u64,
    pub decay: u64,
    pub lr_dev: u64,
    pub overflow: u64,
    pub count: u64,
    pub lr: f32,
    pub rho: f32,
    pub momentum: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub inv_loss_scale: f32,
    /// Device address of the loss scale (0: use `inv_loss_scale`).
    pub loss_scale: u64,
}
// SAFETY: plain repr(C) data laid out like the CUDA struct.
unsafe impl DeviceRepr for RmspropParams {}
const _: () = assert!(std::mem::size_of::<RmspropParams>() == 104);

/// The loss scale a kernel applies: a value known when the launch is queued, or the address of
/// the device-resident dynamic scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleArg {
    Value(f32),
    Device(DevPtr),
}

impl ScaleArg {
    /// (value, address) as the kernels take them: the address wins when it is not 0.
    fn split(self) -> (f32, DevPtr) {
        match self {
            ScaleArg::Value(v) => (v, 0),
            ScaleArg::Device(p) => (1.0, p),
        }
    }
}

impl CudaDevice {
    fn bn_grid(&self, m: usize, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, bn_splits(m as u64) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_channel(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c.div_ceil(BLOCK as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Training forward: batch statistics (saved for backward, running stats updated), then
    /// y = BN(x) with optional ReLU. `ws` holds [`bn_workspace`] fp32 elements.
    pub fn bn_forward_train(&self, a: &BnArgs, x: DevPtr, y: DevPtr, ws: DevPtr) -> Result<()> {
        let (m, c) = (a.m as u64, a.c as i32);
        let splits = bn_splits(m) as i32;
        // O3 reads fp16 x into fp32 partials exactly as O2 does.
        let name = self.amp_kernel([
            "bn_stats_partial_o0",
            "bn_stats_partial",
            "bn_stats_partial",
        ]);
        cuda_launch!(self, name, self.bn_grid(a.m, a.c), x, m, c, ws)?;
        let (eps, mom, sm, si, rm, rv) = (
            a.eps,
            a.momentum,
            a.save_mean,
            a.save_inv_std,
            a.running_mean,
            a.running_var,
        );
        let name = self.amp_kernel([
            "bn_stats_finalize_o0",
            "bn_stats_finalize",
            "bn_stats_finalize_o3",
        ]);
        cuda_launch!(
            self,
            name,
            self.per_channel(a.c),
            ws,
            splits,
            x,
            m,
            c,
            eps,
            mom,
            sm,
            si,
            rm,
            rv
        )?;
        self.bn_apply(a, x, a.save_mean, a.save_inv_std, y)
    }

    fn bn_apply(
        &self,
        a: &BnArgs,
        x: DevPtr,
        mean: DevPtr,
        inv_std: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (g, b) = (a.gamma, a.beta);
        let name = self.amp_kernel(["bn_apply_o0", "bn_apply", "bn_apply_o3"]);
        cuda_launch!(
            self,
            name,
            self.grid_1d(m * a.c as u64)?,
            x,
            mean,
            inv_std,
            g,
            b,
            m,
            c,
            relu,
            y,
            ldy,
            yoff
        )
    }

    /// Inference forward with the running statistics.
    pub fn bn_forward_infer(&self, a: &BnArgs, x: DevPtr, y: DevPtr) -> Result<()> {
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (rm, rv, g, b, eps) = (a.running_mean, a.running_var, a.gamma, a.beta, a.eps);
        let cfg = self.grid_1d(m * a.c as u64)?;
        let name = self.amp_kernel(["bn_infer_o0", "bn_infer", "bn_infer_o3"]);
        cuda_launch!(self, name, cfg, x, rm, rv, g, b, eps, m, c, relu, y, ldy, yoff)
    }

    /// Backward: dgamma, dbeta (fp32, overwritten) and dx (+)= the input gradient. With `a.relu`,
    /// `y` is the BN+ReLU output and the ReLU backward is fused.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_backward(
        &self,
        a: &BnArgs,
        x: DevPtr,
        y: DevPtr,
        dy: DevPtr,
        dgamma: DevPtr,
        dbeta: DevPtr,
        dx: DevPtr,
        accumulate: bool,
        ws: DevPtr,
    ) -> Result<()> {
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (mean, is, g) = (a.save_mean, a.save_inv_std, a.gamma);
        let splits = bn_splits(m) as i32;
        let name = self.amp_kernel(["bn_bwd_partial_o0", "bn_bwd_partial", "bn_bwd_partial_o3"]);
        cuda_launch!(
            self,
            name,
            self.bn_grid(a.m, a.c),
            x,
            y,
            dy,
            mean,
            is,
            m,
            c,
            relu,
            ldy,
            yoff,
            ws
        )?;
        cuda_launch!(
            self,
            "bn_bwd_finalize",
            self.per_channel(a.c),
            ws,
            splits,
            c,
            dgamma,
            dbeta
        )?;
        let acc = accumulate as i32;
        let cfg = self.grid_1d(m * a.c as u64)?;
        let name = self.amp_kernel(["bn_bwd_dx_o0", "bn_bwd_dx", "bn_bwd_dx_o3"]);
        cuda_launch!(
            self, name, cfg, x, y, dy, mean, is, g, dgamma, dbeta, m, c, relu, ldy, yoff, dx, acc
        )
    }

    /// Standalone ReLU forward over `count` activations (plans that do not fuse it into BN).
    pub fn relu_forward(&self, count: usize, x: DevPtr, y: DevPtr) -> Result<()> {
        let n = count as u64;
        let name = self.amp_kernel(["relu_fwd_o0", "relu_fwd", "relu_fwd"]);
        cuda_launch!(self, name, self.grid_1d(n)?, x, n, y)
    }

    /// Standalone ReLU backward: dx (+)= dy where the forward output y is positive.
    pub fn relu_backward(
        &self,
        count: usize,
        y: DevPtr,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        let (n, acc) = (count as u64, accumulate as i32);
        let name = self.amp_kernel(["relu_bwd_o0", "relu_bwd", "relu_bwd"]);
        cuda_launch!(self, name, self.grid_1d(n)?, y, dy, n, dx, acc)
    }

    /// Max (`max = true`) or average pool forward into y (row stride `ldy`, channel offset `yoff`).
    pub fn pool_forward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        y: DevPtr,
        ldy: usize,
        yoff: usize,
    ) -> Result<()> {
        let p = PoolParams {
            x,
            y,
            ldy: ldy as i32,
            yoff: yoff as i32,
            ..s.params()
        };
        let name = if max {
            self.amp_kernel(["maxpool_fwd_o0", "maxpool_fwd", "maxpool_fwd"])
        } else {
            self.amp_kernel(["avgpool_fwd_o0", "avgpool_fwd", "avgpool_fwd"])
        };
        cuda_launch!(
            self,
            name,
            self.grid_1d((s.n * s.oh() * s.ow() * s.c) as u64)?,
            p
        )
    }

    /// Pool backward: dx (+)= gradient; max pool needs the forward input x to find each window's
    /// first maximum.
    #[allow(clippy::too_many_arguments)]
    pub fn pool_backward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        dy: DevPtr,
        ldy: usize,
        yoff: usize,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        let p = PoolParams {
            x,
            dy,
            dx,
            ldy: ldy as i32,
            yoff: yoff as i32,
            accumulate: accumulate as i32,
            ..s.params()
        };
        let name = if max {
            self.amp_kernel(["maxpool_bwd_o0", "maxpool_bwd", "maxpool_bwd"])
        } else {
            self.amp_kernel(["avgpool_bwd_o0", "avgpool_bwd", "avgpool_bwd"])
        };
        cuda_launch!(self, name, self.grid_1d((s.n * s.h * s.w * s.c) as u64)?, p)
    }

    /// y[n][c] = mean of x[n] over h*w.
    pub fn global_avgpool_forward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        let (ni, hwi, ci) = (n as i32, hw as i32, c as i32);
        let name = self.amp_kernel([
            "global_avgpool_fwd_o0",
            "global_avgpool_fwd",
            "global_avgpool_fwd",
        ]);
        cuda_launch!(self, name, self.grid_1d((n * c) as u64)?, x, ni, hwi, ci, y)
    }

    pub fn global_avgpool_backward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        let (ni, hwi, ci, acc) = (n as i32, hw as i32, c as i32, accumulate as i32);
        let name = self.amp_kernel([
            "global_avgpool_bwd_o0",
            "global_avgpool_bwd",
            "global_avgpool_bwd",
        ]);
        cuda_launch!(
            self,
            name,
            self.grid_1d((n * hw * c) as u64)?,
            dy,
            ni,
            hwi,
            ci,
            dx,
            acc
        )
    }

    /// Dropout forward with the counter-based mask of (seed, step, element index).
    pub fn dropout_forward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        let n = count as u64;
        let name = self.amp_kernel(["dropout_fwd_o0", "dropout_fwd", "dropout_fwd"]);
        cuda_launch!(self, name, self.grid_1d(n)?, x, n, p, seed, step, y)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dropout_backward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        let (n, acc) = (count as u64, accumulate as i32);
        let name = self.amp_kernel(["dropout_bwd_o0", "dropout_bwd", "dropout_bwd"]);
        cuda_launch!(self, name, self.grid_1d(n)?, dy, n, p, seed, step, dx, acc)
    }

    /// Fused softmax cross-entropy forward + backward over logits [n][k]: per-sample losses in
    /// `row_loss` (n fp32), their mean in `loss` (1 fp32), dlogits scaled by `grad_scale / n`.
    /// `counter` is one u32 of device memory that starts at 0 (the kernel leaves it at 0).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        smoothing: f32,
        scale: ScaleArg,
        logits: DevPtr,
        labels: Labels,
        row_loss: DevPtr,
        loss: DevPtr,
        counter: DevPtr,
        dlogits: DevPtr,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki) = (n as i32, k as i32);
        let (grad_scale, scale_dev): (f32, DevPtr) = scale.split();
        let (name, lab): (&str, DevPtr) = match labels {
            Labels::I32(p) => (
                self.amp_kernel(["softmax_ce_i32_o0", "softmax_ce_i32", "softmax_ce_i32"]),
                p,
            ),
            Labels::F32(p) => (
                self.amp_kernel(["softmax_ce_f32_o0", "softmax_ce_f32", "softmax_ce_f32"]),
                p,
            ),
        };
        cuda_launch!(
            self, name, cfg, logits, lab, ni, ki, smoothing, grad_scale, scale_dev, row_loss, loss,
            counter, dlogits
        )
    }

    /// y = x W^T + b; x [n][in], W [out][in] fp16 (fp32 masters at O0), b fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        w: DevPtr,
        b: DevPtr,
        y: DevPtr,
        imp: Option<ConvImpl>,
    ) -> Result<()> {
        let s = ConvShape::fc(n, in_f, out_f);
        self.conv_fprop(&s, x, w, ConvOut::dense(y, out_f), imp)?;
        let (ni, oi) = (n as i32, out_f as i32);
        let name = self.amp_kernel(["bias_add_o0", "bias_add", "bias_add"]);
        cuda_launch!(self, name, self.grid_1d((n * out_f) as u64)?, y, b, ni, oi)
    }

    /// dx (+)= dy W.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward_data(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        dy: DevPtr,
        w: DevPtr,
        dx: DevPtr,
        accumulate: bool,
        imp: Option<ConvImpl>,
    ) -> Result<()> {
        let s = ConvShape::fc(n, in_f, out_f);
        let out = ConvOut {
            accumulate,
            ..ConvOut::dense(dx, in_f)
        };
        self.conv_dgrad(&s, dy, w, out, imp).map(|_| ())
    }

    /// dW = dy^T x and db = sum_rows dy, into the fp32 gradient buffer (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward_weight(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        db: DevPtr,
        ws: DevPtr,
        ws_elems: usize,
        imp: Option<ConvImpl>,
    ) -> Result<()> {
        let s = ConvShape::fc(n, in_f, out_f);
        self.conv_wgrad(&s, x, dy, dw, false, ws, ws_elems, imp)?;
        let (ni, oi, acc) = (n as i32, out_f as i32, 0i32);
        let name = self.amp_kernel(["bias_grad_o0", "bias_grad", "bias_grad"]);
        cuda_launch!(self, name, self.per_channel(out_f), dy, ni, oi, db, acc)
    }

    /// Workspace (fp32 elements) of [`Self::linear_backward_weight`].
    pub fn linear_workspace(&self, n: usize, in_f: usize, out_f: usize) -> usize {
        self.conv_wgrad_workspace(&ConvShape::fc(n, in_f, out_f))
    }

    /// One fused RMSProp step over the flat parameter buffer; `grad_f16` picks the gradient type.
    pub fn rmsprop(&self, p: RmspropParams, grad_f16: bool) -> Result<()> {
        let name = if grad_f16 {
            "rmsprop_f16"
        } else {
            "rmsprop_f32"
        };
        cuda_launch!(self, name, self.grid_1d(p.count)?, p)
    }

    /// *flag = 1 when any of `count` gradients is inf/NaN (the caller zeroes the flag first).
    pub fn overflow_check(
        &self,
        grads: DevPtr,
        count: usize,
        f16: bool,
        flag: DevPtr,
    ) -> Result<()> {
        let n = count as u64;
        let name = if f16 {
            "overflow_check_f16"
        } else {
            "overflow_check_f32"
        };
        cuda_launch!(self, name, self.grid_1d(n)?, grads, n, flag)
    }

    /// The device loss scaler's step (see `loss_scale_update` in kernels/optimizer.cu): reads
    /// the overflow flag, updates the fp32 scale and the u32 clean-step count in place.
    pub fn loss_scale_update(
        &self,
        flag: DevPtr,
        scale: DevPtr,
        clean: DevPtr,
        growth_interval: u32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        cuda_launch!(
            self,
            "loss_scale_update",
            cfg,
            flag,
            scale,
            clean,
            growth_interval
        )
    }

    pub fn cast_f32_to_f16(&self, src: DevPtr, count: usize, dst: DevPtr) -> Result<()> {
        let n = count as u64;
        cuda_launch!(self, "cast_f32_to_f16", self.grid_1d(n)?, src, n, dst)
    }

    pub fn cast_f16_to_f32(&self, src: DevPtr, count: usize, dst: DevPtr) -> Result<()> {
        let n = count as u64;
        cuda_launch!(self, "cast_f16_to_f32", self.grid_1d(n)?, src, n, dst)
    }

    /// Copies `c` channels of `rows` rows between row-strided activation tensors (fp16, fp32 at
    /// O0): concat slices, stem channel padding (destination channels [c, zero_to) are zeroed).
    #[allow(clippy::too_many_arguments)]
    pub fn copy_channels(
        &self,
        rows: usize,
        c: usize,
        src: DevPtr,
        src_ld: usize,
        src_off: usize,
        dst: DevPtr,
        dst_ld: usize,
        dst_off: usize,
        zero_to: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (r, ci, sl, so, dl, d_o, z, acc) = (
            rows as u64,
            c as i32,
            src_ld as i32,
            src_off as i32,
            dst_ld as i32,
            dst_off as i32,
            zero_to as i32,
            accumulate as i32,
        );
        let name = self.amp_kernel(["copy_channels_o0", "copy_channels", "copy_channels"]);
        cuda_launch!(
            self,
            name,
            self.grid_1d(r * c.max(zero_to) as u64)?,
            src,
            sl,
            so,
            dst,
            dl,
            d_o,
            r,
            ci,
            z,
            acc
        )
    }

    /// Pads NHWC rows of `c` channels to `c_pad` (zeros): the 3-channel stem input and its weights
    /// ([cout][kh][kw][3] rows) become 8-channel tensors the tensor-core path accepts.
    pub fn pad_channels(
        &self,
        rows: usize,
        c: usize,
        c_pad: usize,
        src: DevPtr,
        dst: DevPtr,
    ) -> Result<()> {
        self.copy_channels(rows, c, src, c, 0, dst, c_pad, 0, c_pad, false)
    }
}
