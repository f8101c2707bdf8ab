//! Host-side layout of the CUDA training step's device memory: element sizes per AMP level, the
//! activation/gradient arena (the memory planner's offsets), the padded parameter slots and the
//! memory estimate quoted when the device runs out. Nothing here touches a GPU, so it is tested on
//! the CPU (tests/cuda_executor.rs).

use super::fusion::Fusion;
use super::program::{program_lifetimes, Stage};
use crate::ops::batchnorm::cuda::bn_workspace;
use crate::ops::conv::cuda::wgrad_workspace_elems;
use crate::ops::conv::ConvShape;
use crate::params::ParamEntry;
use crate::plan::backward::BackwardPlan;
use crate::plan::memory::{place, MemoryPlan, ALIGN};
use crate::plan::{Op, Plan, TensorId, TensorKind};
use crate::precision::Amp;

/// Parameter slots start on multiples of this many elements (256 bytes in fp32, 128 in fp16), so
/// every fp16 weight satisfies the tensor-core path's 16-byte rule and fp32 ones stay aligned.
pub const SLOT_ALIGN: usize = 64;

/// Channels the 3-channel stem is padded to, so its forward convolution can use tensor cores.
pub const STEM_CHANNELS: usize = 8;

/// Bytes per element of a plan tensor in the arena (forward ids, then gradient ids from
/// `bwd.first_grad`; see [`id_elem_bytes`] for the argmax ids after them). Labels and the loss are
/// always fp32; BN saved statistics are fp32 except in O3.
pub fn elem_bytes(plan: &Plan, amp: Amp, t: TensorId) -> usize {
    let half = if amp == Amp::O0 { 4 } else { 2 };
    if t >= plan.tensors.len() {
        return half;
    }
    match plan.tensors[t].kind {
        TensorKind::Label => 4,
        TensorKind::Saved if amp != Amp::O3 => 4,
        _ if t == plan.loss => 4,
        _ => half,
    }
}

/// Elements of an arena tensor: a forward or gradient tensor, or a max pool's saved argmax (one
/// per pool output).
pub fn numel(plan: &Plan, bwd: &BackwardPlan, fusion: &Fusion, t: TensorId) -> usize {
    if let Some(node) = fusion.argmax_node(t) {
        plan.tensor(plan.nodes[node].outputs[0]).numel()
    } else if t < bwd.first_grad {
        plan.tensors[t].numel()
    } else {
        bwd.grad_tensor(t).numel()
    }
}

/// Bytes per element of any arena id: [`elem_bytes`], and one for a saved argmax.
pub fn id_elem_bytes(plan: &Plan, fusion: &Fusion, amp: Amp, t: TensorId) -> usize {
    match fusion.argmax_node(t) {
        Some(_) => 1,
        None => elem_bytes(plan, amp, t),
    }
}

/// The arena of a program (a training step, or with `train` false an inference pass) at an AMP
/// level: every tensor with storage of its own placed over the lifetimes of the fused program
/// (slices live inside their roots).
pub fn arena_plan(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    program: &[Stage],
    amp: Amp,
    train: bool,
) -> MemoryPlan {
    let life = program_lifetimes(plan, bwd, fusion, program, train);
    place(&life, |t| {
        numel(plan, bwd, fusion, t) * id_elem_bytes(plan, fusion, amp, t)
    })
}

/// Byte offset of every arena tensor, indexed by tensor id: its placement, or for a slice its
/// root's placement plus the slice's first channel. None for parameters, state and tensors that
/// are never materialised.
pub fn offsets(plan: &Plan, mem: &MemoryPlan, fusion: &Fusion, amp: Amp) -> Vec<Option<usize>> {
    let mut out = vec![None; fusion.view.len()];
    for p in &mem.placements {
        out[p.tensor] = Some(p.offset);
    }
    for (t, v) in fusion.view.iter().enumerate() {
        if let Some(v) = v {
            out[t] = out[v.root].map(|o| o + v.channel * elem_bytes(plan, amp, t));
        }
    }
    out
}

/// Where each entry of a flat host buffer (`Plan::params()` or `Plan::states()` order) lives on the
/// device: the same order, each entry moved up to a multiple of [`SLOT_ALIGN`] elements. The gaps
/// hold zeros, which the optimizer leaves at zero (zero gradient, zero weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSlots {
    /// (host offset, device offset, length) per entry, in elements.
    pub slots: Vec<(usize, usize, usize)>,
    /// Tensor id of each slot.
    pub tensors: Vec<TensorId>,
    /// Device buffer length in elements.
    pub len: usize,
}

impl ParamSlots {
    pub fn new(entries: &[ParamEntry]) -> Self {
        let mut dev = 0;
        let mut slots = Vec::with_capacity(entries.len());
        for e in entries {
            slots.push((e.offset, dev, e.len));
            dev = (dev + e.len).next_multiple_of(SLOT_ALIGN);
        }
        ParamSlots {
            slots,
            tensors: entries.iter().map(|e| e.tensor).collect(),
            len: dev.max(SLOT_ALIGN),
        }
    }

    /// Device element offset of a tensor's slot.
    pub fn device_offset(&self, t: TensorId) -> Option<usize> {
        let i = self.tensors.iter().position(|&x| x == t)?;
        Some(self.slots[i].1)
    }

    /// The device image of a flat host buffer; gaps get `fill`.
    pub fn scatter<T: Copy>(&self, host: &[T], fill: T) -> Vec<T> {
        let mut out = vec![fill; self.len];
        for &(h, d, n) in &self.slots {
            out[d..d + n].copy_from_slice(&host[h..h + n]);
        }
        out
    }

    /// The flat host buffer back from its device image.
    pub fn gather<T: Copy + Default>(&self, dev: &[T]) -> Vec<T> {
        let host_len = self.slots.iter().map(|s| s.0 + s.2).max().unwrap_or(0);
        let mut out = vec![T::default(); host_len];
        for &(h, d, n) in &self.slots {
            out[h..h + n].copy_from_slice(&dev[d..d + n]);
        }
        out
    }
}

/// fp32 scratch elements shared by every launch of a step (one launch at a time on one stream):
/// the largest split-K weight-gradient or BN reduction workspace of the plan.
pub fn workspace_elems(plan: &Plan, num_sms: u32) -> usize {
    let per_node = plan.nodes.iter().enumerate().map(|(i, n)| match n.op {
        Op::Conv2d(_) => wgrad_workspace_elems(&ConvShape::of_node(plan, i).unwrap(), num_sms),
        Op::Linear {
            in_features,
            out_features,
        } => wgrad_workspace_elems(
            &ConvShape::fc(plan.batch(), in_features, out_features),
            num_sms,
        ),
        Op::BatchNorm { .. } => {
            let s = plan.shape(n.inputs[0]);
            let c = *s.last().unwrap();
            bn_workspace(s.iter().product::<usize>() / c, c)
        }
        _ => 0,
    });
    per_node.max().unwrap_or(0).max(1)
}

/// What a training step needs on the device, in bytes, before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Activations, saved statistics and gradients (the planner's peak).
    pub arena: usize,
    /// fp32 master weights, gradients, RMSProp ms and mom, the fp16 working copy and the decay
    /// mask (one byte per element), over the padded slots.
    pub params: usize,
    /// BN running statistics.
    pub states: usize,
    /// Split-K / BN scratch.
    pub workspace: usize,
    /// The fp32 input batch, the padded stem tensors, per-sample losses and the step report.
    pub staging: usize,
}

impl MemoryEstimate {
    pub fn total(&self) -> usize {
        self.arena + self.params + self.states + self.workspace + self.staging
    }

    /// One line for error messages and logs.
    pub fn describe(&self) -> String {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        format!(
            "{:.0} MiB (activations and gradients {:.0}, parameters and optimizer {:.0}, BN state {:.1}, workspace {:.0}, staging {:.0})",
            mib(self.total()),
            mib(self.arena),
            mib(self.params),
            mib(self.states),
            mib(self.workspace),
            mib(self.staging)
        )
    }
}

/// Bytes per padded parameter element: master, gradient, ms, mom (fp32), working copy (fp16),
/// decay mask (u8).
pub const PARAM_ELEM_BYTES: usize = 4 * 4 + 2 + 1;

/// Bytes per padded parameter element for inference: master (fp32) and working copy (fp16).
pub const INFER_PARAM_ELEM_BYTES: usize = 4 + 2;

/// The device memory `plan` needs at `amp` on a GPU with `num_sms` SMs: for a training step, or
/// with `train` false for inference only (no gradients, optimizer state or workspace).
pub fn estimate(
    plan: &Plan,
    mem: &MemoryPlan,
    params: &ParamSlots,
    states: &ParamSlots,
    num_sms: u32,
    train: bool,
) -> MemoryEstimate {
    let input = plan.tensor(plan.input).numel();
    let stem = stem_padded_elems(plan).map_or(0, |(x, w)| 2 * (x + w));
    let align = |b: usize| b.next_multiple_of(ALIGN);
    let (per_param, workspace) = match train {
        true => (PARAM_ELEM_BYTES, workspace_elems(plan, num_sms)),
        false => (INFER_PARAM_ELEM_BYTES, 1),
    };
    MemoryEstimate {
        arena: mem.peak_bytes,
        params: align(params.len * per_param),
        states: align(states.len * 4),
        workspace: align(workspace * 4),
        staging: align(input * 4) + align(stem) + align(plan.batch() * 8) + ALIGN,
    }
}

/// The padded stem's fp16 element counts (input, weights) when the first convolution reads the
/// image with a channel count the tensor-core path refuses.
pub fn stem_padded_elems(plan: &Plan) -> Option<(usize, usize)> {
    let i = stem_conv(plan)?;
    let s = ConvShape::of_node(plan, i)?;
    let c = s.conv;
    Some((
        s.n * s.h * s.w * STEM_CHANNELS,
        c.cout * c.kh * c.kw * STEM_CHANNELS,
    ))
}

/// The convolution reading the input image, when its channel count is not a multiple of 8.
pub fn stem_conv(plan: &Plan) -> Option<usize> {
    plan.nodes.iter().position(|n| {
        matches!(n.op, Op::Conv2d(c) if c.cin % 8 != 0 && c.cin < STEM_CHANNELS)
            && n.inputs[0] == plan.input
    })
}

/// SMs of an H200 SXM (as of an H100): the card `inspect` quotes device memory for (only the split-K workspace
/// depends on it).
pub const H200_SMS: u32 = 132;

/// The device memory of `plan` at `amp`, worked out on the host exactly as the trainer sizes its
/// buffers: a training step, or with `train` false an inference-only trainer, with the kernel
/// paths of `INCEPTION_KERNELS`.
pub fn plan_estimate(
    plan: &Plan,
    amp: Amp,
    train: bool,
    num_sms: u32,
) -> anyhow::Result<MemoryEstimate> {
    let optim = crate::optim::RmsPropConfig::default();
    let paths = crate::gpu::KernelPaths::from_env()?;
    let (step, mem) =
        super::layout::StepLayout::new(plan.clone(), amp, train, num_sms, optim, paths)?;
    Ok(estimate(
        &step.plan,
        &mem,
        &step.params,
        &step.states,
        num_sms,
        train,
    ))
}
