//! The CPU executor: runs a plan's forward nodes and derived backward steps in f32.
//!
//! Each arena tensor gets its own buffer when it is first written and gives it back to a size-keyed
//! pool after its last use (the memory planner's lifetimes), so a step needs about the planner's
//! peak, and buffers are reused from step to step without page faults. Parameters, their
//! gradients and the BN running statistics live in flat buffers owned by the caller, in
//! `Plan::params()` / `Plan::states()` order.

use crate::ops::{self, batchnorm::BnParams, conv::ConvShape, pool::PoolShape};
use crate::params::{ParamEntry, ParamLayout};
use crate::plan::backward::{derive, BackwardPlan, BackwardStep};
use crate::plan::memory::lifetimes;
use crate::plan::{Node, Op, Plan, TensorId};
use std::collections::HashMap;

/// Whether a forward pass trains (batch statistics, dropout) or infers (running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

pub struct CpuExecutor {
    plan: Plan,
    bwd: BackwardPlan,
    bufs: Vec<Vec<f32>>,
    pool: HashMap<usize, Vec<Vec<f32>>>,
    params: HashMap<TensorId, (usize, usize)>,
    states: HashMap<TensorId, (usize, usize)>,
    /// Tensors whose last use is each step, for training (forward then backward) and inference.
    release_train: Vec<Vec<TensorId>>,
    release_eval: Vec<Vec<TensorId>>,
    step: u64,
    /// Seconds spent per (op, direction), when profiling is on.
    profile: Option<HashMap<(&'static str, &'static str), f64>>,
}

impl CpuExecutor {
    pub fn new(plan: Plan) -> Self {
        let bwd = derive(&plan);
        let n_tensors = bwd.first_grad + bwd.grads.len();
        let release_train = release_lists(
            lifetimes(&plan, &bwd).iter().map(|l| l.map(|l| l.end)),
            plan.nodes.len() + bwd.steps.len() + 1,
        );
        let release_eval = release_lists(eval_last_use(&plan).into_iter(), plan.nodes.len() + 1);
        let layout = ParamLayout::new(&plan);
        let offsets = |entries: &[ParamEntry]| {
            entries
                .iter()
                .map(|e| (e.tensor, (e.offset, e.len)))
                .collect()
        };
        let (params, states) = (offsets(&layout.params), offsets(&layout.states));
        CpuExecutor {
            plan,
            bwd,
            bufs: vec![Vec::new(); n_tensors],
            pool: HashMap::new(),
            params,
            states,
            release_train,
            release_eval,
            step: 0,
            profile: None,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Number of trainable scalars (the length of the flat parameter and gradient buffers).
    pub fn param_len(&self) -> usize {
        self.params.values().map(|v| v.1).sum()
    }

    /// Number of state scalars (BN running statistics).
    pub fn state_len(&self) -> usize {
        self.states.values().map(|v| v.1).sum()
    }

    /// The logits of the last forward pass, `[batch, classes]`.
    pub fn logits(&self) -> &[f32] {
        &self.bufs[self.plan.logits]
    }

    /// A tensor's buffer (empty if not alive), for tests and tools.
    pub fn buffer(&self, t: TensorId) -> &[f32] {
        &self.bufs[t]
    }

    /// Run the forward pass; returns the mean loss. `step` seeds dropout.
    pub fn forward(
        &mut self,
        params: &[f32],
        states: &mut [f32],
        images: &[f32],
        labels: &[u32],
        mode: Mode,
        step: u64,
    ) -> f32 {
        let (input, label_t) = (self.plan.input, self.plan.labels);
        assert_eq!(
            images.len(),
            self.plan.tensor(input).numel(),
            "image batch has the wrong size"
        );
        assert_eq!(
            labels.len(),
            self.plan.batch(),
            "label batch has the wrong size"
        );
        self.step = step;
        let mut x = self.acquire(input);
        x.copy_from_slice(images);
        self.bufs[input] = x;
        let mut l = self.acquire(label_t);
        l.iter_mut().zip(labels).for_each(|(d, &s)| *d = s as f32);
        self.bufs[label_t] = l;
        for i in 0..self.plan.nodes.len() {
            let t = std::time::Instant::now();
            self.forward_node(i, params, states, mode);
            self.record(self.plan.nodes[i].op.kind_name(), "forward", t);
            self.release(i, mode == Mode::Train);
        }
        self.bufs[self.plan.loss][0]
    }

    /// Run the backward pass after a training forward, writing every parameter gradient into
    /// `grads` (flat, `Plan::params()` order). The loss gradient is seeded with `loss_scale`.
    pub fn backward(&mut self, params: &[f32], grads: &mut [f32], loss_scale: f32) {
        assert_eq!(
            grads.len(),
            self.param_len(),
            "gradient buffer has the wrong size"
        );
        let f = self.plan.nodes.len();
        for j in 0..self.bwd.steps.len() {
            let step = self.bwd.steps[j].clone();
            let t = std::time::Instant::now();
            self.backward_step(&step, params, grads, loss_scale);
            self.record(self.plan.nodes[step.node].op.kind_name(), "backward", t);
            self.release(f + j, true);
        }
    }

    /// Start timing each op (see [`CpuExecutor::profile`]).
    pub fn enable_profile(&mut self) {
        self.profile = Some(HashMap::new());
    }

    /// Seconds spent per (op kind, "forward" | "backward") since profiling was enabled.
    pub fn profile(&self) -> Option<&HashMap<(&'static str, &'static str), f64>> {
        self.profile.as_ref()
    }

    fn record(&mut self, op: &'static str, dir: &'static str, start: std::time::Instant) {
        if let Some(p) = &mut self.profile {
            *p.entry((op, dir)).or_default() += start.elapsed().as_secs_f64();
        }
    }

    fn acquire(&mut self, t: TensorId) -> Vec<f32> {
        let n = if t < self.bwd.first_grad {
            self.plan.tensors[t].numel()
        } else {
            self.bwd.grad_tensor(t).numel()
        };
        if self.bufs[t].len() == n {
            return std::mem::take(&mut self.bufs[t]);
        }
        self.pool
            .get_mut(&n)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| vec![0.0; n])
    }

    fn release(&mut self, step: usize, train: bool) {
        let list = if train {
            &self.release_train[step]
        } else {
            &self.release_eval[step]
        };
        for &t in list {
            let buf = std::mem::take(&mut self.bufs[t]);
            if !buf.is_empty() {
                self.pool.entry(buf.len()).or_default().push(buf);
            }
        }
    }

    fn param<'a>(&self, params: &'a [f32], t: TensorId) -> &'a [f32] {
        let (o, l) = self.params[&t];
        &params[o..o + l]
    }

    fn forward_node(&mut self, i: usize, params: &[f32], states: &mut [f32], mode: Mode) {
        let node = self.plan.nodes[i].clone();
        let mut y = self.acquire(node.outputs[0]);
        let train_bn = mode == Mode::Train && !node.saved.is_empty();
        let mut saved: Vec<Vec<f32>> = if train_bn {
            node.saved.iter().map(|&t| self.acquire(t)).collect()
        } else {
            Vec::new()
        };
        let x = &self.bufs[node.inputs[0]];
        let xs = self.plan.shape(node.inputs[0]).to_vec();
        match &node.op {
            Op::Conv2d(g) => ops::conv::forward(
                &ConvShape::new(*g, xs[0], xs[1], xs[2]),
                x,
                self.param(params, node.params[0]),
                &mut y,
            ),
            Op::BatchNorm { eps, momentum } => {
                let p = BnParams {
                    gamma: self.param(params, node.params[0]),
                    beta: self.param(params, node.params[1]),
                    eps: *eps,
                };
                let c = *xs.last().unwrap();
                let (rm, rv) = two_mut(
                    states,
                    self.states[&node.state[0]],
                    self.states[&node.state[1]],
                );
                if let [mean, inv] = saved.as_mut_slice() {
                    ops::batchnorm::forward_train(x, &p, *momentum, c, &mut y, mean, inv, rm, rv);
                } else {
                    ops::batchnorm::forward_infer(x, &p, c, rm, rv, &mut y);
                }
            }
            Op::Relu => ops::relu::forward(x, &mut y),
            Op::MaxPool(p) => {
                ops::pool::max_forward(&PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]), x, &mut y)
            }
            Op::AvgPool(p) => {
                ops::pool::avg_forward(&PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]), x, &mut y)
            }
            Op::GlobalAvgPool => ops::global_pool::forward(x, xs[0], xs[1] * xs[2], xs[3], &mut y),
            Op::Concat => {
                let parts: Vec<&[f32]> = node
                    .inputs
                    .iter()
                    .map(|&t| self.bufs[t].as_slice())
                    .collect();
                ops::concat::forward(&parts, &self.channels(&node), &mut y);
            }
            Op::Dropout { p, seed } => {
                let p = if mode == Mode::Train { *p } else { 0.0 };
                ops::dropout::forward(x, p, *seed, self.step, &mut y);
            }
            Op::Linear {
                in_features,
                out_features,
            } => {
                let (wt, b) = (
                    self.param(params, node.params[0]),
                    self.param(params, node.params[1]),
                );
                ops::linear::forward(x, wt, b, xs[0], *in_features, *out_features, &mut y);
            }
            Op::SoftmaxCrossEntropy { smoothing } => {
                let labels = &self.bufs[node.inputs[1]];
                y[0] = ops::softmax_ce::forward(x, labels, xs[0], xs[1], *smoothing);
            }
        }
        self.bufs[node.outputs[0]] = y;
        for (&t, buf) in node.saved.iter().zip(saved) {
            self.bufs[t] = buf;
        }
    }

    fn channels(&self, node: &Node) -> Vec<usize> {
        node.inputs
            .iter()
            .map(|&t| *self.plan.shape(t).last().unwrap())
            .collect()
    }

    fn backward_step(
        &mut self,
        step: &BackwardStep,
        params: &[f32],
        grads: &mut [f32],
        loss_scale: f32,
    ) {
        let node = self.plan.nodes[step.node].clone();
        let xs = self.plan.shape(node.inputs[0]).to_vec();
        // Take the input gradients out of the table so the rest can be read while they are written.
        let mut dxs: Vec<Option<Vec<f32>>> = step
            .grad_inputs
            .iter()
            .map(|g| g.map(|g| self.acquire(g)))
            .collect();
        let acc = &step.accumulate;
        let x = &self.bufs[node.inputs[0]];
        let dy: &[f32] = step
            .grad_output
            .map(|g| self.bufs[g].as_slice())
            .unwrap_or(&[]);
        let pgrad = |t: TensorId| self.params[&t];
        match &node.op {
            Op::Conv2d(g) => {
                let s = ConvShape::new(*g, xs[0], xs[1], xs[2]);
                let (o, l) = pgrad(node.params[0]);
                ops::conv::backward_weight(&s, x, dy, &mut grads[o..o + l]);
                if let Some(dx) = &mut dxs[0] {
                    ops::conv::backward_data(
                        &s,
                        dy,
                        self.param(params, node.params[0]),
                        dx,
                        acc[0],
                    );
                }
            }
            Op::BatchNorm { .. } => {
                let ((og, lg), (ob, lb)) = (pgrad(node.params[0]), pgrad(node.params[1]));
                assert!(
                    og + lg <= ob,
                    "BN gamma must precede beta in the flat buffer"
                );
                let (head, tail) = grads.split_at_mut(ob);
                let (mean, inv) = (&self.bufs[node.saved[0]], &self.bufs[node.saved[1]]);
                let dx = dxs[0]
                    .as_mut()
                    .expect("batchnorm input always needs a gradient");
                let c = *xs.last().unwrap();
                ops::batchnorm::backward(
                    x,
                    dy,
                    self.param(params, node.params[0]),
                    mean,
                    inv,
                    c,
                    dx,
                    &mut head[og..og + lg],
                    &mut tail[..lb],
                    acc[0],
                );
            }
            Op::Relu => ops::relu::backward(
                &self.bufs[node.outputs[0]],
                dy,
                dxs[0].as_mut().unwrap(),
                acc[0],
            ),
            Op::MaxPool(p) => ops::pool::max_backward(
                &PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]),
                x,
                dy,
                dxs[0].as_mut().unwrap(),
                acc[0],
            ),
            Op::AvgPool(p) => ops::pool::avg_backward(
                &PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]),
                dy,
                dxs[0].as_mut().unwrap(),
                acc[0],
            ),
            Op::GlobalAvgPool => ops::global_pool::backward(
                dy,
                xs[0],
                xs[1] * xs[2],
                xs[3],
                dxs[0].as_mut().unwrap(),
                acc[0],
            ),
            Op::Concat => {
                let channels = self.channels(&node);
                for (k, dx) in dxs.iter_mut().enumerate() {
                    if let Some(dx) = dx {
                        ops::concat::backward(dy, &channels, k, dx, acc[k]);
                    }
                }
            }
            Op::Dropout { p, seed } => {
                ops::dropout::backward(dy, *p, *seed, self.step, dxs[0].as_mut().unwrap(), acc[0])
            }
            Op::Linear {
                in_features,
                out_features,
            } => {
                let ((ow, lw), (ob, lb)) = (pgrad(node.params[0]), pgrad(node.params[1]));
                let (head, tail) = grads.split_at_mut(ob);
                let wt = self.param(params, node.params[0]);
                ops::linear::backward(
                    x,
                    wt,
                    dy,
                    xs[0],
                    *in_features,
                    *out_features,
                    dxs[0].as_deref_mut(),
                    &mut head[ow..ow + lw],
                    &mut tail[..lb],
                    acc[0],
                );
            }
            Op::SoftmaxCrossEntropy { smoothing } => {
                let labels = &self.bufs[node.inputs[1]];
                ops::softmax_ce::backward(
                    x,
                    labels,
                    xs[0],
                    xs[1],
                    *smoothing,
                    loss_scale,
                    dxs[0].as_mut().unwrap(),
                );
            }
        }
        for (g, dx) in step.grad_inputs.iter().zip(dxs) {
            if let (Some(g), Some(dx)) = (g, dx) {
                self.bufs[*g] = dx;
            }
        }
    }
}

/// Two disjoint mutable ranges `(offset, len)` of one buffer.
fn two_mut(buf: &mut [f32], a: (usize, usize), b: (usize, usize)) -> (&mut [f32], &mut [f32]) {
    assert!(a.0 + a.1 <= b.0, "ranges must be ordered and disjoint");
    let (head, tail) = buf.split_at_mut(b.0);
    (&mut head[a.0..a.0 + a.1], &mut tail[..b.1])
}

/// For each step, the tensors whose last use it is.
fn release_lists(
    last_use: impl Iterator<Item = Option<usize>>,
    steps: usize,
) -> Vec<Vec<TensorId>> {
    let mut lists = vec![Vec::new(); steps];
    for (t, end) in last_use.enumerate() {
        if let Some(end) = end {
            lists[end.min(steps - 1)].push(t);
        }
    }
    lists
}

/// Last forward node reading each tensor in an inference pass; the outputs the host reads
/// (logits, loss) and the batch stay until the next pass.
fn eval_last_use(plan: &Plan) -> Vec<Option<usize>> {
    let mut last = vec![None; plan.tensors.len()];
    for (i, node) in plan.nodes.iter().enumerate() {
        for &t in node.inputs.iter().chain(&node.outputs).chain(&node.saved) {
            last[t] = Some(i);
        }
    }
    for t in [plan.input, plan.labels, plan.logits, plan.loss] {
        last[t] = Some(plan.nodes.len());
    }
    last
}
