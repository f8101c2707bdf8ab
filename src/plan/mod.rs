//! The static execution plan: a graph IR of named tensors with fixed shapes and the ops over them.
//!
//! A plan is built once (by a model's builder, listed in [`models::MODELS`]) for a fixed batch
//! size and image size. Every backend executes the same plan: the forward nodes in order, then the
//! backward steps that [`backward::derive`] produces from them. Activations are NHWC
//! (`[n, h, w, c]`); convolution weights are `[cout, kh, kw, cin]`; fully connected weights are
//! `[out, in]` (PyTorch's layout).

pub mod backward;
pub mod builder;
pub mod memory;
pub mod models;
pub mod tiny;
pub mod v4;

use serde::Serialize;

pub use backward::{BackwardPlan, BackwardStep};
pub use builder::{GraphBuilder, PlanConfig};

/// Index of a tensor in [`Plan::tensors`].
pub type TensorId = usize;

/// What a tensor holds, which decides where it lives and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TensorKind {
    /// The image batch fed to the network.
    Input,
    /// Integer class labels, stored as f32 for a uniform tensor type.
    Label,
    /// A trainable parameter (conv/FC weight, FC bias, BN gamma/beta).
    Param,
    /// Persistent non-trainable state (BN running mean and variance).
    State,
    /// Produced by one forward node and consumed by later nodes or by backward steps.
    Activation,
    /// Side output a forward node keeps for its backward (BN batch mean and inverse std).
    Saved,
}

/// A named tensor with a fixed shape.
#[derive(Clone, Debug, Serialize)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Geometry of a 2-D convolution (no bias). Padding is per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Conv2d {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_bottom: usize,
    pub pad_left: usize,
    pub pad_right: usize,
}

/// Window of a max or average pool. Padding is symmetric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Pool {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

/// The ops of the IR. Inputs, parameters and outputs are listed on the [`Node`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Op {
    /// inputs [x]; params [weight]; outputs [y].
    Conv2d(Conv2d),
    /// inputs [x]; params [gamma, beta]; state [running_mean, running_var];
    /// outputs [y]; saved [batch_mean, batch_inv_std]. `momentum` is PyTorch's convention:
    /// running = (1 - momentum) * running + momentum * batch (unbiased variance).
    BatchNorm { eps: f32, momentum: f32 },
    /// inputs [x]; outputs [y].
    Relu,
    /// inputs [x]; outputs [y].
    MaxPool(Pool),
    /// inputs [x]; outputs [y]. Padding is excluded from the divisor.
    AvgPool(Pool),
    /// inputs [x: n,h,w,c]; outputs [y: n,c].
    GlobalAvgPool,
    /// inputs [x0, x1, ...] concatenated along channels; outputs [y].
    Concat,
    /// inputs [x]; outputs [y]. Drops with probability `p` in training, scales kept values by
    /// 1/(1-p); identity in inference. The mask comes from a counter-based RNG (seed, step,
    /// element index), so backward recomputes it and no mask tensor exists.
    Dropout { p: f32, seed: u64 },
    /// inputs [x: n,in]; params [weight: out,in, bias: out]; outputs [y: n,out].
    Linear {
        in_features: usize,
        out_features: usize,
    },
    /// inputs [logits: n,k, labels: n]; outputs [loss: 1] (mean over the batch).
    SoftmaxCrossEntropy { smoothing: f32 },
}

impl Op {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "conv2d",
            Op::BatchNorm { .. } => "batchnorm",
            Op::Relu => "relu",
            Op::MaxPool(_) => "maxpool",
            Op::AvgPool(_) => "avgpool",
            Op::GlobalAvgPool => "global_avgpool",
            Op::Concat => "concat",
            Op::Dropout { .. } => "dropout",
            Op::Linear { .. } => "linear",
            Op::SoftmaxCrossEntropy { .. } => "softmax_ce",
        }
    }
}

/// One forward step of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub params: Vec<TensorId>,
    pub state: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub saved: Vec<TensorId>,
}

/// A complete forward plan with fixed shapes.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub name: String,
    pub config: PlanConfig,
    pub tensors: Vec<Tensor>,
    pub nodes: Vec<Node>,
    pub input: TensorId,
    pub labels: TensorId,
    pub logits: TensorId,
    pub loss: TensorId,
}

impl Plan {
    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id]
    }

    pub fn shape(&self, id: TensorId) -> &[usize] {
        &self.tensors[id].shape
    }

    pub fn batch(&self) -> usize {
        self.config.batch
    }

    /// Trainable parameters in node order: the order of the flat parameter buffer.
    pub fn params(&self) -> Vec<TensorId> {
        self.nodes
            .iter()
            .flat_map(|n| n.params.iter().copied())
            .collect()
    }

    /// Persistent state tensors (BN running statistics) in node order.
    pub fn states(&self) -> Vec<TensorId> {
        self.nodes
            .iter()
            .flat_map(|n| n.state.iter().copied())
            .collect()
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.params().iter().map(|&t| self.tensors[t].numel()).sum()
    }

    /// Forward multiply-accumulates of the convolutions and fully connected layers, per image.
    pub fn macs_per_image(&self) -> u64 {
        self.nodes.iter().map(|n| self.node_macs(n)).sum()
    }

    /// Forward multiply-accumulates of one node, per image (zero for non-GEMM ops).
    pub fn node_macs(&self, node: &Node) -> u64 {
        match &node.op {
            Op::Conv2d(c) => {
                let y = self.shape(node.outputs[0]);
                (y[1] * y[2] * c.cout * c.kh * c.kw * c.cin) as u64
            }
            Op::Linear {
                in_features,
                out_features,
            } => (in_features * out_features) as u64,
            _ => 0,
        }
    }

    /// Parameters owned by one node.
    pub fn node_params(&self, node: &Node) -> usize {
        node.params.iter().map(|&t| self.tensors[t].numel()).sum()
    }

    /// Whether a parameter should receive weight decay by default: conv and FC weights do,
    /// BN gamma/beta and biases do not.
    pub fn is_decayed(&self, param: TensorId) -> bool {
        self.nodes.iter().any(|n| match n.op {
            Op::Conv2d(_) | Op::Linear { .. } => n.params.first() == Some(&param),
            _ => false,
        })
    }

    /// Forward consumers of each tensor, as node indices.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.tensors.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &t in &n.inputs {
                out[t].push(i);
            }
        }
        out
    }

    /// Look up a tensor by name.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors.iter().position(|t| t.name == name)
    }
}

/// Build the plan of the model named `name` in [`models::MODELS`].
pub fn build(name: &str, config: PlanConfig) -> anyhow::Result<Plan> {
    (models::find(name)?.build)(config)
}

/// Output size of a window op along one axis, or None if the window does not fit.
pub fn out_size(
    input: usize,
    k: usize,
    stride: usize,
    pad_lo: usize,
    pad_hi: usize,
) -> Option<usize> {
    let padded = input + pad_lo + pad_hi;
    if padded < k || stride == 0 {
        return None;
    }
    Some((padded - k) / stride + 1)
}
