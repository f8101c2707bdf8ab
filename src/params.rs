//! The flat parameter and state buffers of a plan.
//!
//! Every backend keeps the model as two flat `f32` buffers: the trainable parameters in
//! [`Plan::params`] order and the persistent state (BN running statistics) in [`Plan::states`]
//! order. [`ParamLayout`] says where each named tensor lives in them; [`ModelState`] owns the
//! buffers and initialises them deterministically from a seed.

use crate::plan::{Op, Plan, TensorId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::ops::Range;

/// Where one named tensor lives in a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    pub tensor: TensorId,
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Whether weight decay applies by default (conv and FC weights only).
    pub decay: bool,
}

impl ParamEntry {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The layout of the flat parameter and state buffers of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// Trainable parameters, in [`Plan::params`] order.
    pub params: Vec<ParamEntry>,
    /// BN running statistics, in [`Plan::states`] order; `decay` is always false.
    pub states: Vec<ParamEntry>,
    pub param_len: usize,
    pub state_len: usize,
}

impl ParamLayout {
    pub fn new(plan: &Plan) -> Self {
        let (params, param_len) = entries(plan, &plan.params(), true);
        let (states, state_len) = entries(plan, &plan.states(), false);
        ParamLayout {
            params,
            states,
            param_len,
            state_len,
        }
    }

    /// Runs of the parameter buffer with their weight-decay flag, covering it in order with
    /// adjacent runs of equal flag merged. A per-element mask would cost 43 MB on v4.
    /// With `decay_all` every parameter is decayed (what MindSpore effectively does).
    pub fn decay_mask(&self, decay_all: bool) -> Vec<(Range<usize>, bool)> {
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        for e in &self.params {
            let flag = decay_all || e.decay;
            match runs.last_mut() {
                Some((r, f)) if *f == flag && r.end == e.offset => r.end = e.offset + e.len,
                _ => runs.push((e.range(), flag)),
            }
        }
        runs
    }

    pub fn param_entry(&self, name: &str) -> Option<&ParamEntry> {
        self.params.iter().find(|e| e.name == name)
    }

    pub fn state_entry(&self, name: &str) -> Option<&ParamEntry> {
        self.states.iter().find(|e| e.name == name)
    }
}

fn entries(plan: &Plan, ids: &[TensorId], with_decay: bool) -> (Vec<ParamEntry>, usize) {
    let mut offset = 0;
    let list = ids
        .iter()
        .map(|&t| {
            let tensor = plan.tensor(t);
            let len = tensor.numel();
            let e = ParamEntry {
                tensor: t,
                name: tensor.name.clone(),
                shape: tensor.shape.clone(),
                offset,
                len,
                decay: with_decay && plan.is_decayed(t),
            };
            offset += len;
            e
        })
        .collect();
    (list, offset)
}

/// How one tensor is initialised; decided by the owning node's op, not by the tensor's name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal { std: f64 },
    Uniform { bound: f64 },
    Const(f32),
}

/// The model's parameters and persistent state.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelState {
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub states: Vec<f32>,
}

impl ModelState {
    /// All-zero buffers with the plan's layout (to be filled by a checkpoint).
    pub fn zeros(plan: &Plan) -> Self {
        let layout = ParamLayout::new(plan);
        let (params, states) = (vec![0.0; layout.param_len], vec![0.0; layout.state_len]);
        ModelState {
            layout,
            params,
            states,
        }
    }

    /// Deterministic initialisation from `seed`: conv weights He-normal (std sqrt(2 / fan_in),
    /// fan_in = kh*kw*cin), BN gamma 1 and beta 0, running mean 0 and variance 1, FC weight and
    /// bias U(-1/sqrt(in), 1/sqrt(in)). Each tensor draws from its own ChaCha8 stream (the
    /// tensor id), so the result does not depend on thread count or fill order.
    pub fn init(plan: &Plan, seed: u64) -> Self {
        let mut model = Self::zeros(plan);
        let rules = init_rules(plan);
        let layout = &model.layout;
        fill(&mut model.params, &layout.params, &rules, seed);
        fill(&mut model.states, &layout.states, &rules, seed);
        model
    }

    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.layout
            .param_entry(name)
            .map(|e| &self.params[e.range()])
    }

    pub fn param_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let r = self.layout.param_entry(name)?.range();
        Some(&mut self.params[r])
    }

    pub fn state(&self, name: &str) -> Option<&[f32]> {
        self.layout
            .state_entry(name)
            .map(|e| &self.states[e.range()])
    }

    pub fn state_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let r = self.layout.state_entry(name)?.range();
        Some(&mut self.states[r])
    }
}

/// The init rule of every parameter and state tensor, indexed by tensor id.
fn init_rules(plan: &Plan) -> Vec<Init> {
    // Tensors owned by no known op stay zero; every op with params is listed below.
    let mut rules = vec![Init::Const(0.0); plan.tensors.len()];
    for node in &plan.nodes {
        match &node.op {
            Op::Conv2d(c) => {
                let fan_in = (c.kh * c.kw * c.cin) as f64;
                rules[node.params[0]] = Init::Normal {
                    std: (2.0 / fan_in).sqrt(),
                };
            }
            Op::BatchNorm { .. } => {
                rules[node.params[0]] = Init::Const(1.0); // gamma
                rules[node.params[1]] = Init::Const(0.0); // beta
                rules[node.state[0]] = Init::Const(0.0); // running mean
                rules[node.state[1]] = Init::Const(1.0); // running var
            }
            Op::Linear { in_features, .. } => {
                let bound = 1.0 / (*in_features as f64).sqrt();
                for &p in &node.params {
                    rules[p] = Init::Uniform { bound };
                }
            }
            _ => {}
        }
    }
    rules
}

/// Fill each entry's slice of `buf` by its rule, in parallel over tensors.
fn fill(buf: &mut [f32], entries: &[ParamEntry], rules: &[Init], seed: u64) {
    let mut slices = Vec::with_capacity(entries.len());
    let mut rest = buf;
    for e in entries {
        let (head, tail) = rest.split_at_mut(e.len);
        slices.push((e.tensor, head));
        rest = tail;
    }
    slices.into_par_iter().for_each(|(tensor, out)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(tensor as u64);
        fill_one(out, rules[tensor], &mut rng);
    });
}

fn fill_one(out: &mut [f32], rule: Init, rng: &mut ChaCha8Rng) {
    match rule {
        Init::Const(v) => out.fill(v),
        Init::Uniform { bound } => {
            for x in out.iter_mut() {
                *x = rng.random_range(-bound..bound) as f32;
            }
        }
        Init::Normal { std } => {
            // Box-Muller: each pair of uniforms gives two independent standard normals.
            for pair in out.chunks_mut(2) {
                let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], so ln is finite
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let theta = 2.0 * std::f64::consts::PI * u2;
                pair[0] = (r * theta.cos()) as f32;
                if let Some(second) = pair.get_mut(1) {
                    *second = (r * theta.sin()) as f32;
                }
            }
        }
    }
}
