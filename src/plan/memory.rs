//! The memory planner: places every activation, saved tensor and gradient of a training step at an
//! offset in one arena, so that tensors alive at the same time never overlap.
//!
//! Time runs over the forward nodes and then the backward steps. A tensor lives from the step that
//! writes it first to the last step that reads it. Placement is greedy, largest tensor first, at the
//! lowest offset that clears every already placed tensor whose lifetime overlaps.

use super::backward::{backward_reads, BackwardPlan};
use super::{Plan, TensorId, TensorKind};
use serde::Serialize;

/// Alignment of every offset, in bytes (enough for 128-bit vector loads and cp.async).
pub const ALIGN: usize = 256;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Interval {
    /// First step that writes the tensor.
    pub start: usize,
    /// Last step that reads it (inclusive).
    pub end: usize,
}

impl Interval {
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    pub tensor: TensorId,
    pub offset: usize,
    pub bytes: usize,
    pub life: Interval,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    /// Placed tensors (activations, saved tensors, inputs, gradients), in tensor id order.
    pub placements: Vec<Placement>,
    /// Arena size: the highest end of any placement.
    pub peak_bytes: usize,
    /// Sum of all placed tensors' sizes: what the arena would need without reuse.
    pub total_bytes: usize,
}

/// Lifetimes of the arena's tensors over a training step (forward then backward).
/// Parameters and state live outside the arena and get no interval.
pub fn lifetimes(plan: &Plan, bwd: &BackwardPlan) -> Vec<Option<Interval>> {
    let n_total = bwd.first_grad + bwd.grads.len();
    let mut life: Vec<Option<Interval>> = vec![None; n_total];
    let mut touch = |t: TensorId, step: usize| {
        let e = life[t].get_or_insert(Interval {
            start: step,
            end: step,
        });
        e.start = e.start.min(step);
        e.end = e.end.max(step);
    };
    for (i, node) in plan.nodes.iter().enumerate() {
        for &t in node.inputs.iter().chain(&node.outputs).chain(&node.saved) {
            touch(t, i);
        }
    }
    let f = plan.nodes.len();
    for (j, step) in bwd.steps.iter().enumerate() {
        let time = f + j;
        let node = &plan.nodes[step.node];
        let (reads_in, reads_out, reads_saved) = backward_reads(&node.op);
        let mut reads: Vec<TensorId> = Vec::new();
        if reads_in {
            reads.extend(&node.inputs);
        }
        if reads_out {
            reads.extend(&node.outputs);
        }
        if reads_saved {
            reads.extend(&node.saved);
        }
        reads.extend(step.grad_output);
        reads.extend(step.grad_inputs.iter().flatten());
        for t in reads {
            touch(t, time);
        }
    }
    // The batch, labels, logits and loss are read by the host after the step: keep them to the end.
    let last = f + bwd.steps.len();
    for t in [plan.input, plan.labels, plan.logits, plan.loss] {
        touch(t, last);
    }
    for (id, t) in plan.tensors.iter().enumerate() {
        if matches!(t.kind, TensorKind::Param | TensorKind::State) {
            life[id] = None;
        }
    }
    life
}

/// Place every tensor of a training step; `elem_bytes` gives each tensor's element size.
pub fn plan_memory(
    plan: &Plan,
    bwd: &BackwardPlan,
    elem_bytes: impl Fn(TensorId) -> usize,
) -> MemoryPlan {
    let numel = |id: TensorId| -> usize {
        if id < bwd.first_grad {
            plan.tensors[id].numel()
        } else {
            bwd.grad_tensor(id).numel()
        }
    };
    place(&lifetimes(plan, bwd), |t| numel(t) * elem_bytes(t))
}

/// Place every tensor that has a lifetime, `bytes(t)` long, so that tensors alive at the same
/// time never overlap.
pub fn place(life: &[Option<Interval>], bytes: impl Fn(TensorId) -> usize) -> MemoryPlan {
    let mut order: Vec<TensorId> = (0..life.len()).filter(|&t| life[t].is_some()).collect();
    order.sort_by_key(|&t| (std::cmp::Reverse(bytes(t)), t));
    let mut placed: Vec<Placement> = Vec::with_capacity(order.len());
    for t in order {
        let bytes = bytes(t);
        let l = life[t].unwrap();
        let offset = lowest_fit(&placed, l, bytes);
        placed.push(Placement {
            tensor: t,
            offset,
            bytes,
            life: l,
        });
    }
    placed.sort_by_key(|p| p.tensor);
    let peak_bytes = placed.iter().map(|p| p.offset + p.bytes).max().unwrap_or(0);
    let total_bytes = placed.iter().map(|p| p.bytes).sum();
    MemoryPlan {
        placements: placed,
        peak_bytes,
        total_bytes,
    }
}

/// The lowest aligned offset where `bytes` fit between the tensors alive during `life`.
fn lowest_fit(placed: &[Placement], life: Interval, bytes: usize) -> usize {
    let mut busy: Vec<(usize, usize)> = placed
        .iter()
        .filter(|p| p.life.overlaps(&life))
        .map(|p| (p.offset, p.offset + p.bytes))
        .collect();
    busy.sort_unstable();
    let mut offset = 0;
    for (lo, hi) in busy {
        if offset + bytes <= lo {
            break;
        }
        offset = offset.max(align_up(hi));
    }
    offset
}

pub fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}
