//! What the device program fuses away, decided once from the plan:
//! - **BN + ReLU**: a batchnorm whose only consumer is a ReLU writes the ReLU's output directly
//!   (the BN kernels clip in place), and its backward masks the gradient with that output. The BN
//!   output and its gradient are never materialised, and the ReLU launches disappear.
//! - **Zero-copy concatenation**: a tensor consumed only by a concatenation, and produced by an op
//!   whose kernel takes an output row stride (BN, pools, a nested concatenation), is stored as its
//!   channel slice of the concatenation's output; its gradient likewise lives in the slice of the
//!   output's gradient. Branches write straight into the block output and the concat launches
//!   disappear.
//!
//! One storage decision goes the other way and adds tensors: with `KernelPaths::pool_argmax`
//! each max pool's training forward saves its argmax (one byte per output, the window position
//! of the first maximum) for its backward, which then reads that instead of the pool's input
//! ([`Fusion::with_pool_argmax`]). The argmax is device storage only, not a plan tensor: it is a
//! detail of one kernel path, the CPU reference recomputes the maximum, the plan's tensors are
//! f32 on the host side, and a plan tensor would exist on both paths. It gets an arena id after
//! the gradients' (no view, never elided), so the program's accesses, the lifetimes, the
//! placement and `check_program` treat it like any other arena tensor.
//!
//! Everything here is host-side and tested on the CPU (tests/cuda_executor.rs).

use crate::ops::pool::cuda::ARGMAX_MAX_K;
use crate::plan::backward::BackwardPlan;
use crate::plan::{Op, Plan, TensorId, TensorKind};

/// Where a tensor that shares storage lives: channels `[channel, channel + c)` of every row of
/// `root`, whose rows are `ld` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub root: TensorId,
    pub channel: usize,
    pub ld: usize,
}

#[derive(Clone, Debug)]
pub struct Fusion {
    /// For each node: the ReLU node a batchnorm absorbs.
    pub relu_after: Vec<Option<usize>>,
    /// For each node: a ReLU absorbed by the batchnorm before it (it has no launches).
    pub absorbed: Vec<bool>,
    /// For each tensor (forward ids, then gradient ids): its slice of a root, if it has one.
    pub view: Vec<Option<View>>,
    /// For each tensor: never materialised (a fused BN's own output and that output's gradient).
    pub elided: Vec<bool>,
    /// For each node: the arena id of the argmax a max pool saves (the `pool_argmax` path).
    pub argmax: Vec<Option<TensorId>>,
    /// The first argmax id: ids from here on are argmax tensors, in node order.
    pub first_argmax: TensorId,
}

impl Fusion {
    /// No fusion at all: every node launches and every tensor has its own storage.
    pub fn none(plan: &Plan, bwd: &BackwardPlan) -> Self {
        let n_tensors = bwd.first_grad + bwd.grads.len();
        Fusion {
            relu_after: vec![None; plan.nodes.len()],
            absorbed: vec![false; plan.nodes.len()],
            view: vec![None; n_tensors],
            elided: vec![false; n_tensors],
            argmax: vec![None; plan.nodes.len()],
            first_argmax: n_tensors,
        }
    }

    /// Adds a saved argmax to every max pool whose input has a gradient and whose window
    /// positions fit a byte (the others keep recomputing the maximum).
    pub fn with_pool_argmax(mut self, plan: &Plan, bwd: &BackwardPlan) -> Self {
        let has_grad = |x: TensorId| bwd.grad_of[x].is_some();
        for (i, node) in plan.nodes.iter().enumerate() {
            if let Op::MaxPool(p) = node.op {
                if has_grad(node.inputs[0]) && p.k <= ARGMAX_MAX_K {
                    self.argmax[i] = Some(self.view.len());
                    self.view.push(None);
                    self.elided.push(false);
                }
            }
        }
        self
    }

    /// The max-pool node whose saved argmax `t` is, if `t` is one.
    pub fn argmax_node(&self, t: TensorId) -> Option<usize> {
        if t < self.first_argmax {
            return None;
        }
        self.argmax.iter().position(|&a| a == Some(t))
    }

    /// BN+ReLU fusion and zero-copy concatenation wherever the rules above allow.
    pub fn new(plan: &Plan, bwd: &BackwardPlan) -> Self {
        let mut f = Fusion::none(plan, bwd);
        let consumers = plan.consumers();
        for (i, node) in plan.nodes.iter().enumerate() {
            let Op::BatchNorm { .. } = node.op else {
                continue;
            };
            let y = node.outputs[0];
            if let [r] = consumers[y][..] {
                if plan.nodes[r].op == Op::Relu && y != plan.logits {
                    f.relu_after[i] = Some(r);
                    f.absorbed[r] = true;
                    f.elided[y] = true;
                    if let Some(g) = bwd.grad_of[y] {
                        f.elided[g] = true;
                    }
                }
            }
        }
        let parent = f.slice_parents(plan, bwd, &consumers);
        for t in 0..parent.len() {
            f.view[t] = resolve(&parent, t).map(|(root, channel)| View {
                root,
                channel,
                ld: channels(plan, bwd, root),
            });
        }
        f
    }

    /// The concatenation each eligible tensor (and its gradient) is a direct slice of, with the
    /// slice's first channel there.
    fn slice_parents(
        &self,
        plan: &Plan,
        bwd: &BackwardPlan,
        consumers: &[Vec<usize>],
    ) -> Vec<Option<(TensorId, usize)>> {
        let producer = producers(plan);
        let mut parent = vec![None; self.view.len()];
        for (c, node) in plan.nodes.iter().enumerate() {
            if node.op != Op::Concat {
                continue;
            }
            let y = node.outputs[0];
            let mut channel = 0;
            for &x in &node.inputs {
                let only_here = consumers[x] == [c];
                let writer = producer[x].map(|p| self.strided_writer(plan, p));
                if only_here
                    && writer == Some(true)
                    && plan.tensors[x].kind == TensorKind::Activation
                {
                    parent[x] = Some((y, channel));
                    if let (Some(gx), Some(gy)) = (bwd.grad_of[x], bwd.grad_of[y]) {
                        parent[gx] = Some((gy, channel));
                    }
                }
                channel += channels(plan, bwd, x);
            }
        }
        parent
    }

    /// Whether node `p`'s output kernel (and its backward's read of the output gradient) takes a
    /// row stride: BN (alone or with its absorbed ReLU), the window pools, and concatenations.
    fn strided_writer(&self, plan: &Plan, p: usize) -> bool {
        match plan.nodes[p].op {
            Op::BatchNorm { .. } => self.relu_after[p].is_none(),
            Op::Relu => self.absorbed[p],
            Op::MaxPool(_) | Op::AvgPool(_) | Op::Concat => true,
            _ => false,
        }
    }

    /// Row stride of a tensor in elements: its root's channel count for a slice, else its own
    /// (an argmax's is its pool output's).
    pub fn ld(&self, plan: &Plan, bwd: &BackwardPlan, t: TensorId) -> usize {
        if let Some(node) = self.argmax_node(t) {
            return channels(plan, bwd, plan.nodes[node].outputs[0]);
        }
        self.view[t].map_or_else(|| channels(plan, bwd, t), |v| v.ld)
    }

    /// The tensor whose storage holds `t` (itself unless it is a slice).
    pub fn root(&self, t: TensorId) -> TensorId {
        self.view[t].map_or(t, |v| v.root)
    }

    /// The output a node's kernel really writes: an absorbing BN writes its ReLU's output.
    pub fn effective_output(&self, plan: &Plan, node: usize) -> TensorId {
        match self.relu_after[node] {
            Some(r) => plan.nodes[r].outputs[0],
            None => plan.nodes[node].outputs[0],
        }
    }

    /// Whether a concat node needs a launch (some input or input gradient is not a slice).
    pub fn concat_copies(&self, plan: &Plan, bwd: &BackwardPlan, node: usize) -> bool {
        plan.nodes[node].inputs.iter().any(|&x| {
            self.view[x].is_none() || bwd.grad_of[x].is_some_and(|g| self.view[g].is_none())
        })
    }
}

/// Channel count (last dimension) of a forward or gradient tensor.
pub fn channels(plan: &Plan, bwd: &BackwardPlan, t: TensorId) -> usize {
    let shape = if t < bwd.first_grad {
        plan.shape(t)
    } else {
        &bwd.grad_tensor(t).shape
    };
    *shape.last().expect("tensors have a shape")
}

/// The node writing each forward tensor.
fn producers(plan: &Plan) -> Vec<Option<usize>> {
    let mut out = vec![None; plan.tensors.len()];
    for (i, n) in plan.nodes.iter().enumerate() {
        for &t in &n.outputs {
            out[t] = Some(i);
        }
    }
    out
}

/// Follows direct slices up to the root, summing channel offsets (nested concatenations).
fn resolve(parent: &[Option<(TensorId, usize)>], t: TensorId) -> Option<(TensorId, usize)> {
    let (mut root, mut channel) = parent[t]?;
    while let Some((up, off)) = parent[root] {
        root = up;
        channel += off;
    }
    Some((root, channel))
}
