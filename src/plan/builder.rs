//! A small graph builder the model definitions use: each call adds one node, checks its shapes and
//! returns the output tensor.

use super::{out_size, Conv2d, Node, Op, Plan, Pool, Tensor, TensorId, TensorKind};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Everything that fixes a plan's shapes and hyper-parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanConfig {
    pub batch: usize,
    pub image_size: usize,
    pub num_classes: usize,
    pub dropout: f32,
    pub label_smoothing: f32,
    pub bn_eps: f32,
    pub bn_momentum: f32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            batch: 1,
            image_size: 299,
            num_classes: 1000,
            dropout: 0.2,
            label_smoothing: 0.1,
            bn_eps: 1e-3,
            bn_momentum: 0.1,
        }
    }
}

pub struct GraphBuilder {
    plan: Plan,
}

impl GraphBuilder {
    /// Start a plan whose input is `[batch, image_size, image_size, 3]`.
    pub fn new(name: &str, config: PlanConfig) -> Result<Self> {
        if config.batch == 0 || config.num_classes == 0 {
            bail!("batch size and number of classes must be at least 1");
        }
        let (b, s) = (config.batch, config.image_size);
        let mut plan = Plan {
            name: name.to_string(),
            config,
            tensors: Vec::new(),
            nodes: Vec::new(),
            input: 0,
            labels: 0,
            logits: 0,
            loss: 0,
        };
        plan.input = push(&mut plan, "input", vec![b, s, s, 3], TensorKind::Input);
        plan.labels = push(&mut plan, "labels", vec![b], TensorKind::Label);
        Ok(GraphBuilder { plan })
    }

    pub fn input(&self) -> TensorId {
        self.plan.input
    }

    pub fn config(&self) -> &PlanConfig {
        &self.plan.config
    }

    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.plan.tensors[t].shape
    }

    fn tensor(&mut self, name: String, shape: Vec<usize>, kind: TensorKind) -> TensorId {
        push(&mut self.plan, &name, shape, kind)
    }

    fn node(
        &mut self,
        name: &str,
        op: Op,
        inputs: Vec<TensorId>,
        out_shape: Vec<usize>,
    ) -> (usize, TensorId) {
        let y = self.tensor(format!("{name}.out"), out_shape, TensorKind::Activation);
        self.plan.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            params: vec![],
            state: vec![],
            outputs: vec![y],
            saved: vec![],
        });
        (self.plan.nodes.len() - 1, y)
    }

    /// Convolution without bias; `pad` is (top, bottom, left, right).
    pub fn conv(
        &mut self,
        name: &str,
        x: TensorId,
        cout: usize,
        kernel: (usize, usize),
        stride: usize,
        pad: (usize, usize, usize, usize),
    ) -> Result<TensorId> {
        let [n, h, w, cin] = nhwc(self.shape(x), name)?;
        let (kh, kw) = kernel;
        let geom = Conv2d {
            cin,
            cout,
            kh,
            kw,
            stride,
            pad_top: pad.0,
            pad_bottom: pad.1,
            pad_left: pad.2,
            pad_right: pad.3,
        };
        let (Some(oh), Some(ow)) = (
            out_size(h, kh, stride, pad.0, pad.1),
            out_size(w, kw, stride, pad.2, pad.3),
        ) else {
            bail!("{name}: a {kh}x{kw} convolution does not fit a {h}x{w} input; the image size is too small");
        };
        let weight = self.tensor(
            format!("{name}.weight"),
            vec![cout, kh, kw, cin],
            TensorKind::Param,
        );
        let (idx, y) = self.node(name, Op::Conv2d(geom), vec![x], vec![n, oh, ow, cout]);
        self.plan.nodes[idx].params.push(weight);
        Ok(y)
    }

    pub fn batchnorm(&mut self, name: &str, x: TensorId) -> Result<TensorId> {
        let shape = self.shape(x).to_vec();
        let c = *shape.last().unwrap();
        let (eps, momentum) = (self.plan.config.bn_eps, self.plan.config.bn_momentum);
        let gamma = self.tensor(format!("{name}.weight"), vec![c], TensorKind::Param);
        let beta = self.tensor(format!("{name}.bias"), vec![c], TensorKind::Param);
        let rm = self.tensor(format!("{name}.running_mean"), vec![c], TensorKind::State);
        let rv = self.tensor(format!("{name}.running_var"), vec![c], TensorKind::State);
        let mean = self.tensor(format!("{name}.batch_mean"), vec![c], TensorKind::Saved);
        let inv_std = self.tensor(format!("{name}.batch_inv_std"), vec![c], TensorKind::Saved);
        let (idx, y) = self.node(name, Op::BatchNorm { eps, momentum }, vec![x], shape);
        let node = &mut self.plan.nodes[idx];
        node.params = vec![gamma, beta];
        node.state = vec![rm, rv];
        node.saved = vec![mean, inv_std];
        Ok(y)
    }

    pub fn relu(&mut self, name: &str, x: TensorId) -> TensorId {
        let shape = self.shape(x).to_vec();
        self.node(name, Op::Relu, vec![x], shape).1
    }

    /// timm's ConvNormAct: `<name>.conv` -> `<name>.bn` -> ReLU. `pad` is symmetric (pad_h, pad_w).
    pub fn conv_bn_relu(
        &mut self,
        name: &str,
        x: TensorId,
        cout: usize,
        kernel: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<TensorId> {
        let c = self.conv(
            &format!("{name}.conv"),
            x,
            cout,
            kernel,
            stride,
            (pad.0, pad.0, pad.1, pad.1),
        )?;
        let b = self.batchnorm(&format!("{name}.bn"), c)?;
        Ok(self.relu(&format!("{name}.act"), b))
    }

    fn pool(&mut self, name: &str, x: TensorId, pool: Pool, avg: bool) -> Result<TensorId> {
        let [n, h, w, c] = nhwc(self.shape(x), name)?;
        let (Some(oh), Some(ow)) = (
            out_size(h, pool.k, pool.stride, pool.pad, pool.pad),
            out_size(w, pool.k, pool.stride, pool.pad, pool.pad),
        ) else {
            bail!(
                "{name}: a {k}x{k} pool does not fit a {h}x{w} input; the image size is too small",
                k = pool.k
            );
        };
        if pool.pad * 2 > pool.k {
            bail!(
                "{name}: padding {} is more than half the {}x{} window",
                pool.pad,
                pool.k,
                pool.k
            );
        }
        let op = if avg {
            Op::AvgPool(pool)
        } else {
            Op::MaxPool(pool)
        };
        Ok(self.node(name, op, vec![x], vec![n, oh, ow, c]).1)
    }

    pub fn max_pool(
        &mut self,
        name: &str,
        x: TensorId,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<TensorId> {
        self.pool(name, x, Pool { k, stride, pad }, false)
    }

    pub fn avg_pool(
        &mut self,
        name: &str,
        x: TensorId,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<TensorId> {
        self.pool(name, x, Pool { k, stride, pad }, true)
    }

    /// Channel concatenation, in the order given.
    pub fn concat(&mut self, name: &str, xs: &[TensorId]) -> Result<TensorId> {
        let [n, h, w, _] = nhwc(self.shape(xs[0]), name)?;
        let mut c = 0;
        for &x in xs {
            let [xn, xh, xw, xc] = nhwc(self.shape(x), name)?;
            if (xn, xh, xw) != (n, h, w) {
                bail!("{name}: concat inputs differ in batch or spatial size");
            }
            c += xc;
        }
        Ok(self.node(name, Op::Concat, xs.to_vec(), vec![n, h, w, c]).1)
    }

    pub fn global_avg_pool(&mut self, name: &str, x: TensorId) -> Result<TensorId> {
        let [n, _, _, c] = nhwc(self.shape(x), name)?;
        Ok(self.node(name, Op::GlobalAvgPool, vec![x], vec![n, c]).1)
    }

    pub fn dropout(&mut self, name: &str, x: TensorId, p: f32) -> TensorId {
        let shape = self.shape(x).to_vec();
        let seed = self.plan.nodes.len() as u64;
        self.node(name, Op::Dropout { p, seed }, vec![x], shape).1
    }

    pub fn linear(&mut self, name: &str, x: TensorId, out_features: usize) -> Result<TensorId> {
        let &[n, in_features] = self.shape(x) else {
            bail!("{name}: a fully connected layer needs a [batch, features] input");
        };
        let weight = self.tensor(
            format!("{name}.weight"),
            vec![out_features, in_features],
            TensorKind::Param,
        );
        let bias = self.tensor(
            format!("{name}.bias"),
            vec![out_features],
            TensorKind::Param,
        );
        let (idx, y) = self.node(
            name,
            Op::Linear {
                in_features,
                out_features,
            },
            vec![x],
            vec![n, out_features],
        );
        self.plan.nodes[idx].params = vec![weight, bias];
        Ok(y)
    }

    /// Finish the plan: softmax cross-entropy of `logits` against the labels.
    pub fn finish(mut self, logits: TensorId) -> Result<Plan> {
        let smoothing = self.plan.config.label_smoothing;
        let labels = self.plan.labels;
        let (_, loss) = self.node(
            "loss",
            Op::SoftmaxCrossEntropy { smoothing },
            vec![logits, labels],
            vec![1],
        );
        self.plan.logits = logits;
        self.plan.loss = loss;
        Ok(self.plan)
    }
}

fn push(plan: &mut Plan, name: &str, shape: Vec<usize>, kind: TensorKind) -> TensorId {
    plan.tensors.push(Tensor {
        name: name.to_string(),
        shape,
        kind,
    });
    plan.tensors.len() - 1
}

fn nhwc(shape: &[usize], name: &str) -> Result<[usize; 4]> {
    match shape {
        &[n, h, w, c] => Ok([n, h, w, c]),
        _ => bail!("{name}: expected an NHWC activation, got shape {shape:?}"),
    }
}
