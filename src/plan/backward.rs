//! Derivation of the backward plan from the forward plan.
//!
//! Every activation that depends on a parameter gets a gradient tensor. The backward steps visit the
//! forward nodes in reverse; a gradient written by several steps (a tensor feeding several branches)
//! is overwritten by the first and accumulated by the rest, so no step needs a zeroed buffer.

use super::{Op, Plan, Tensor, TensorId, TensorKind};
use serde::Serialize;

/// The backward of one forward node.
#[derive(Clone, Debug, Serialize)]
pub struct BackwardStep {
    /// Index of the forward node in [`Plan::nodes`].
    pub node: usize,
    /// Gradient of the node's output (None for the loss, whose gradient is the seed).
    pub grad_output: Option<TensorId>,
    /// Gradient of each input, aligned with the node's inputs; None where none is needed.
    pub grad_inputs: Vec<Option<TensorId>>,
    /// For each input gradient: add into it (true) or overwrite it (false).
    pub accumulate: Vec<bool>,
}

/// The backward plan: the steps in execution order, and where every gradient lives.
#[derive(Clone, Debug, Serialize)]
pub struct BackwardPlan {
    pub steps: Vec<BackwardStep>,
    /// Gradient tensor of each forward tensor, indexed by forward tensor id.
    pub grad_of: Vec<Option<TensorId>>,
    /// Gradient tensors, indexed from `first_grad` in the combined tensor list.
    pub grads: Vec<Tensor>,
    pub first_grad: TensorId,
}

impl BackwardPlan {
    /// A gradient tensor's description (ids at or after `first_grad`).
    pub fn grad_tensor(&self, id: TensorId) -> &Tensor {
        &self.grads[id - self.first_grad]
    }
}

/// Derive the backward plan. Gradient tensor ids follow the forward tensor ids.
pub fn derive(plan: &Plan) -> BackwardPlan {
    let needs_grad = requires_grad(plan);
    let mut grads = Vec::new();
    let mut grad_of = vec![None; plan.tensors.len()];
    let first_grad = plan.tensors.len();
    for (id, t) in plan.tensors.iter().enumerate() {
        if needs_grad[id] && id != plan.loss {
            grad_of[id] = Some(first_grad + grads.len());
            grads.push(Tensor {
                name: format!("{}.grad", t.name),
                shape: t.shape.clone(),
                kind: TensorKind::Activation,
            });
        }
    }
    let mut written = vec![false; first_grad + grads.len()];
    let mut steps = Vec::new();
    for (i, node) in plan.nodes.iter().enumerate().rev() {
        let out = node.outputs[0];
        let is_loss = matches!(node.op, Op::SoftmaxCrossEntropy { .. });
        if !needs_grad[out] || (!is_loss && !written[grad_of[out].unwrap()]) {
            // The output does not reach the loss: nothing flows back through this node.
            continue;
        }
        let grad_inputs: Vec<Option<TensorId>> = node.inputs.iter().map(|&x| grad_of[x]).collect();
        let accumulate = grad_inputs
            .iter()
            .map(|g| match g {
                Some(g) => std::mem::replace(&mut written[*g], true),
                None => false,
            })
            .collect();
        steps.push(BackwardStep {
            node: i,
            grad_output: if is_loss { None } else { grad_of[out] },
            grad_inputs,
            accumulate,
        });
    }
    BackwardPlan {
        steps,
        grad_of,
        grads,
        first_grad,
    }
}

/// Which forward tensors depend on a trainable parameter (and so need a gradient).
fn requires_grad(plan: &Plan) -> Vec<bool> {
    let mut needs = vec![false; plan.tensors.len()];
    for node in &plan.nodes {
        let any = !node.params.is_empty() || node.inputs.iter().any(|&x| needs[x]);
        for &y in &node.outputs {
            needs[y] = any;
        }
    }
    needs
}

/// The forward tensors a node's backward reads: (inputs, outputs, saved).
pub fn backward_reads(op: &Op) -> (bool, bool, bool) {
    match op {
        Op::Conv2d(_) | Op::Linear { .. } | Op::MaxPool(_) => (true, false, false),
        Op::BatchNorm { .. } => (true, false, true),
        Op::Relu => (false, true, false),
        Op::SoftmaxCrossEntropy { .. } => (true, false, false),
        Op::AvgPool(_) | Op::GlobalAvgPool | Op::Concat | Op::Dropout { .. } => {
            (false, false, false)
        }
    }
}
