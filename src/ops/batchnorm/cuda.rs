//! Batchnorm launchers: training forward (statistics, then the apply), inference forward, and
//! backward, each with an optional fused ReLU. Two paths (`BnArgs::vec`, from
//! `KernelPaths::bn_vec`):
//! - baseline (kernels/batchnorm.cu): the reductions take two launches each (per-block partials
//!   into `ws`, then a per-channel finalise), so 3 launches forward and 3 backward;
//! - vectorised (kernels/batchnorm_vec.cu): 8 channels per thread with 16-byte accesses, and the
//!   finalise done by the reduction's last block, so 2 launches forward and 2 backward. Layers it
//!   cannot take ([`BnArgs::vec_fits`]) fall back to the baseline kernels.

use anyhow::{Context, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda_launch;
use crate::gpu::traffic::{act_bytes, bn_stat_bytes};
use crate::gpu::{CudaDevice, DevPtr, Launch, Traffic};
use crate::precision::Amp;

/// Rows handled by one block of the BN partial reductions (8 row groups x 64 rows each).
const ROWS_PER_BLOCK: u64 = 512;
const MAX_SPLITS: u64 = 512;

fn splits(m: u64) -> u64 {
    m.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_SPLITS)
}

/// fp32 elements of workspace a BN forward or backward over [m, c] needs.
pub fn bn_workspace(m: usize, c: usize) -> usize {
    splits(m as u64) as usize * c * 2
}

/// Threads per block of the vectorised kernels, and channels per thread.
const VEC_THREADS: usize = 256;
const VEC_C: usize = 8;

/// The vectorised kernels' block: every channel vector of a row (C / 8) by as many row groups
/// as fit in 256 threads.
fn vec_block(c: usize) -> (u32, u32, u32) {
    let vectors = c / VEC_C;
    (vectors as u32, (VEC_THREADS / vectors) as u32, 1)
}

/// The vectorised reductions' grid: one block column, `splits` row blocks (as the baseline's).
fn vec_reduce_grid(m: usize, c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, splits(m as u64) as u32, 1),
        block_dim: vec_block(c),
        shared_mem_bytes: 0,
    }
}

/// The vectorised element-wise kernels' grid: row blocks enough to cover the rows, at most 16
/// per SM (grid-stride beyond).
fn vec_rows_grid(dev: &CudaDevice, m: usize, c: usize) -> LaunchConfig {
    let block = vec_block(c);
    let want = m.div_ceil(block.1 as usize).max(1);
    LaunchConfig {
        grid_dim: (1, want.min(dev.num_sms as usize * 16) as u32, 1),
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// The partial reductions' grid: 32 channels by `splits` row blocks.
fn partial_grid(m: usize, c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(32) as u32, splits(m as u64) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
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
    /// Take the vectorised kernels where they fit (`KernelPaths::bn_vec`).
    pub vec: bool,
    /// The vectorised reductions' ticket counter (one u32, zero between launches: the last
    /// block resets it); 0 where there is none, which keeps the baseline kernels.
    pub counter: DevPtr,
}

impl BnArgs {
    /// Whether the vectorised kernels run this layer over `tensors` (the activations it reads and
    /// writes): asked for, a counter, whole 8-channel vectors of at most 256 per row (one block
    /// column, one counter), strides and offsets in whole vectors, 16-byte aligned tensors.
    pub fn vec_fits(&self, tensors: &[DevPtr]) -> bool {
        self.vec
            && self.counter != 0
            && self.c.is_multiple_of(VEC_C)
            && self.c <= VEC_C * VEC_THREADS
            && self.ldy.is_multiple_of(VEC_C)
            && self.yoff.is_multiple_of(VEC_C)
            && tensors.iter().all(|&p| p.is_multiple_of(16))
    }
}

/// Training forward: batch statistics (saved for backward, running stats updated), then
/// y = BN(x) with optional ReLU. `ws` holds [`bn_workspace`] fp32 elements.
#[derive(Clone, Copy, Debug)]
pub struct BnForwardTrain {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
    pub ws: DevPtr,
}

impl BnForwardTrain {
    /// Whether this call runs the vectorised kernels.
    pub fn uses_vec(&self) -> bool {
        self.a.vec_fits(&[self.x, self.y])
    }

    /// Kernel launches this call queues.
    pub fn launches(&self) -> usize {
        if self.uses_vec() {
            2
        } else {
            3
        }
    }

    /// The vectorised statistics (with their finalise) and normalisation.
    fn launch_vec(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, y, ws, counter) = (self.a, self.x, self.y, self.ws, self.a.counter);
        let (m, c, eps, mom) = (a.m as u64, a.c as i32, a.eps, a.momentum);
        let (sm, si, rm, rv) = (a.save_mean, a.save_inv_std, a.running_mean, a.running_var);
        let name = dev.amp_kernel(["bn_vec_stats_o0", "bn_vec_stats", "bn_vec_stats_o3"]);
        let cfg = vec_reduce_grid(a.m, a.c);
        cuda_launch!(dev, name, cfg, x, m, c, eps, mom, sm, si, rm, rv, ws, counter)?;
        let (relu, ldy, yoff) = (a.relu as i32, a.ldy as i32, a.yoff as i32);
        let (g, b) = (a.gamma, a.beta);
        let name = dev.amp_kernel(["bn_vec_apply_o0", "bn_vec_apply", "bn_vec_apply_o3"]);
        let cfg = vec_rows_grid(dev, a.m, a.c);
        cuda_launch!(dev, name, cfg, x, sm, si, g, b, m, c, relu, y, ldy, yoff)
    }
}

impl Launch for BnForwardTrain {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        if self.uses_vec() {
            return self.launch_vec(dev);
        }
        let (a, x, ws) = (self.a, self.x, self.ws);
        let (m, c) = (a.m as u64, a.c as i32);
        let splits = splits(m) as i32;
        // O3 reads fp16 x into fp32 partials exactly as O2 does.
        let name = dev.amp_kernel([
            "bn_stats_partial_o0",
            "bn_stats_partial",
            "bn_stats_partial",
        ]);
        cuda_launch!(dev, name, partial_grid(a.m, a.c), x, m, c, ws)?;
        let (eps, mom, sm, si, rm, rv) = (
            a.eps,
            a.momentum,
            a.save_mean,
            a.save_inv_std,
            a.running_mean,
            a.running_var,
        );
        let name = dev.amp_kernel([
            "bn_stats_finalize_o0",
            "bn_stats_finalize",
            "bn_stats_finalize_o3",
        ]);
        let cfg = dev.grid_channels(a.c);
        cuda_launch!(dev, name, cfg, ws, splits, x, m, c, eps, mom, sm, si, rm, rv)?;
        apply(dev, &a, x, a.save_mean, a.save_inv_std, self.y)
    }
}

/// y = gamma * (x - mean) * inv_std + beta with the batch statistics just computed.
fn apply(
    dev: &CudaDevice,
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
    let name = dev.amp_kernel(["bn_apply_o0", "bn_apply", "bn_apply_o3"]);
    let cfg = dev.grid_1d(m * a.c as u64)?;
    cuda_launch!(dev, name, cfg, x, mean, inv_std, g, b, m, c, relu, y, ldy, yoff)
}

/// Inference forward with the running statistics.
#[derive(Clone, Copy, Debug)]
pub struct BnForwardInfer {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
}

impl BnForwardInfer {
    /// Whether this call runs the vectorised kernel (it needs no counter: no reduction).
    pub fn uses_vec(&self) -> bool {
        let a = BnArgs {
            counter: 1,
            ..self.a
        };
        a.vec_fits(&[self.x, self.y])
    }
}

impl Launch for BnForwardInfer {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, y) = (self.a, self.x, self.y);
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (rm, rv, g, b, eps) = (a.running_mean, a.running_var, a.gamma, a.beta, a.eps);
        if self.uses_vec() {
            let name = dev.amp_kernel(["bn_vec_infer_o0", "bn_vec_infer", "bn_vec_infer_o3"]);
            let cfg = vec_rows_grid(dev, a.m, a.c);
            return cuda_launch!(dev, name, cfg, x, rm, rv, g, b, eps, m, c, relu, y, ldy, yoff);
        }
        let cfg = dev.grid_1d(m * a.c as u64)?;
        let name = dev.amp_kernel(["bn_infer_o0", "bn_infer", "bn_infer_o3"]);
        cuda_launch!(dev, name, cfg, x, rm, rv, g, b, eps, m, c, relu, y, ldy, yoff)
    }
}

/// Backward: dgamma, dbeta (fp32, overwritten) and dx (+)= the input gradient. With `a.relu`,
/// `y` is the BN+ReLU output and the ReLU backward is fused (the vectorised path recomputes the
/// mask from x and does not read `y`).
#[derive(Clone, Copy, Debug)]
pub struct BnBackward {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
    pub dy: DevPtr,
    pub dgamma: DevPtr,
    pub dbeta: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
    pub ws: DevPtr,
}

impl BnBackward {
    /// Whether this call runs the vectorised kernels.
    pub fn uses_vec(&self) -> bool {
        self.a.vec_fits(&[self.x, self.dy, self.dx])
    }

    /// Kernel launches this call queues.
    pub fn launches(&self) -> usize {
        if self.uses_vec() {
            2
        } else {
            3
        }
    }

    /// The vectorised reduction (with its finalise into dgamma, dbeta) and dx.
    fn launch_vec(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, dy, dx, ws, counter) =
            (self.a, self.x, self.dy, self.dx, self.ws, self.a.counter);
        let (dgamma, dbeta) = (self.dgamma, self.dbeta);
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (mean, is, g, b) = (a.save_mean, a.save_inv_std, a.gamma, a.beta);
        let name = dev.amp_kernel([
            "bn_vec_bwd_reduce_o0",
            "bn_vec_bwd_reduce",
            "bn_vec_bwd_reduce_o3",
        ]);
        let cfg = vec_reduce_grid(a.m, a.c);
        cuda_launch!(
            dev, name, cfg, x, dy, mean, is, g, b, m, c, relu, ldy, yoff, dgamma, dbeta, ws,
            counter
        )?;
        let acc = self.accumulate as i32;
        let name = dev.amp_kernel(["bn_vec_bwd_dx_o0", "bn_vec_bwd_dx", "bn_vec_bwd_dx_o3"]);
        let cfg = vec_rows_grid(dev, a.m, a.c);
        cuda_launch!(
            dev, name, cfg, x, dy, mean, is, g, b, dgamma, dbeta, m, c, relu, ldy, yoff, dx, acc
        )
    }
}

impl Launch for BnBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        if self.uses_vec() {
            return self.launch_vec(dev);
        }
        let (a, x, y, dy, ws) = (self.a, self.x, self.y, self.dy, self.ws);
        let (dgamma, dbeta, dx) = (self.dgamma, self.dbeta, self.dx);
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (mean, is, g) = (a.save_mean, a.save_inv_std, a.gamma);
        let splits = splits(m) as i32;
        let name = dev.amp_kernel(["bn_bwd_partial_o0", "bn_bwd_partial", "bn_bwd_partial_o3"]);
        let cfg = partial_grid(a.m, a.c);
        cuda_launch!(dev, name, cfg, x, y, dy, mean, is, m, c, relu, ldy, yoff, ws)?;
        let cfg = dev.grid_channels(a.c);
        cuda_launch!(dev, "bn_bwd_finalize", cfg, ws, splits, c, dgamma, dbeta)?;
        let acc = self.accumulate as i32;
        let cfg = dev.grid_1d(m * a.c as u64)?;
        let name = dev.amp_kernel(["bn_bwd_dx_o0", "bn_bwd_dx", "bn_bwd_dx_o3"]);
        cuda_launch!(
            dev, name, cfg, x, y, dy, mean, is, g, dgamma, dbeta, m, c, relu, ldy, yoff, dx, acc
        )
    }
}

/// The byte model of BN's calls (see [`Traffic`]), per path. Activations are [m][c] at the
/// level's element size; the small per-channel arrays are counted too.
struct BnBytes {
    /// One pass over the activations.
    pass: usize,
    /// gamma and beta, or the saved mean and inverse std.
    pair: usize,
    /// The running statistics, or dgamma and dbeta (fp32).
    pair32: usize,
    /// The split partials (fp32 pairs).
    ws: usize,
    row: usize,
}

impl BnBytes {
    fn of(a: &BnArgs, amp: Amp) -> Self {
        BnBytes {
            pass: a.m * a.c * act_bytes(amp),
            pair: 2 * a.c * bn_stat_bytes(amp),
            pair32: 2 * a.c * 4,
            ws: bn_workspace(a.m, a.c) * 4,
            row: a.c * act_bytes(amp),
        }
    }
}

impl BnForwardTrain {
    /// Bytes moved: the statistics read x (and its first row, the shift) and write the partials,
    /// the finalise reads those and writes the statistics (the vectorised path's last block does
    /// the same); the normalisation reads x, the statistics and gamma/beta and writes y. The
    /// paths differ in launches and accesses, not in bytes.
    pub fn traffic(&self, amp: Amp) -> Traffic {
        let b = BnBytes::of(&self.a, amp);
        let stats = Traffic::new(b.pass + b.row + b.ws + b.pair32, b.ws + b.pair + b.pair32);
        let apply = Traffic::new(b.pass + 2 * b.pair, b.pass);
        stats + apply
    }
}

impl BnForwardInfer {
    /// Bytes moved: x, the running statistics and gamma/beta read, y written.
    pub fn traffic(&self, amp: Amp) -> Traffic {
        let b = BnBytes::of(&self.a, amp);
        Traffic::new(b.pass + b.pair32 + b.pair, b.pass)
    }
}

impl BnBackward {
    /// Bytes moved: the reduction and dx each read x and dy, and on the baseline path also y
    /// (the fused ReLU's mask, which the vectorised path recomputes from x); the partials go
    /// through the workspace; dx is written (and read too when accumulating).
    pub fn traffic(&self, amp: Amp) -> Traffic {
        let (a, b) = (&self.a, BnBytes::of(&self.a, amp));
        let vec = self.uses_vec();
        let inputs = b.pass * (2 + (a.relu && !vec) as usize);
        // Saved statistics, and on the vectorised path gamma/beta for the mask.
        let per_channel = b.pair * (1 + vec as usize);
        let reduce = Traffic::new(inputs + per_channel + b.ws, b.ws + b.pair32);
        let old_dx = b.pass * self.accumulate as usize;
        let dx = Traffic::new(inputs + 2 * b.pair + b.pair32 + old_dx, b.pass);
        reduce + dx
    }
}
