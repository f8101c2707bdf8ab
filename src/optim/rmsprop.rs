//! RMSProp as the MindSpore and TF1 recipe runs it (facts.md section 2): non-centred, epsilon
//! inside the square root, mean-square state starting at 1.0, heavy-ball momentum on the scaled
//! step, and coupled L2 weight decay added to the gradient.

use crate::params::ParamLayout;
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel work item: large enough to amortise scheduling, small enough to balance
/// 42.7M parameters over the cores.
const CHUNK: usize = 1 << 16;

/// Hyper-parameters of [`RmsProp`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RmsPropConfig {
    pub rho: f32,
    pub momentum: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Decay every parameter (BN gamma/beta and biases too), as MindSpore effectively does.
    pub decay_all: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            rho: 0.9,
            momentum: 0.9,
            eps: 1.0,
            weight_decay: 4e-5,
            decay_all: false,
        }
    }
}

/// RMSProp over one flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsProp {
    pub cfg: RmsPropConfig,
    /// Mean of squared gradients; starts at 1.0 like recent MindSpore and TF1.
    pub ms: Vec<f32>,
    /// Momentum buffer (the last update applied); starts at 0.0.
    pub mom: Vec<f32>,
    /// Runs of the buffer with their weight-decay flag, covering it in order.
    pub decay: Vec<(Range<usize>, bool)>,
}

impl RmsProp {
    /// An optimizer for a model with `layout`; decay follows `cfg.decay_all` and the layout's flags.
    pub fn new(cfg: RmsPropConfig, layout: &ParamLayout) -> Self {
        Self::with_mask(cfg, layout.param_len, layout.decay_mask(cfg.decay_all))
    }

    /// An optimizer over `len` parameters with an explicit decay mask (runs covering `0..len`).
    pub fn with_mask(cfg: RmsPropConfig, len: usize, decay: Vec<(Range<usize>, bool)>) -> Self {
        RmsProp {
            cfg,
            ms: vec![1.0; len],
            mom: vec![0.0; len],
            decay,
        }
    }

    pub fn len(&self) -> usize {
        self.ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ms.is_empty()
    }

    /// One update. `grads` are multiplied by `grad_scale` first (1 / loss scale), then weight
    /// decay is added where the mask says so. Purely elementwise, so the result does not depend
    /// on how the work is split.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, grad_scale: f32) {
        assert_eq!(params.len(), self.len(), "parameter buffer length");
        assert_eq!(grads.len(), self.len(), "gradient buffer length");
        let cfg = self.cfg;
        let decay = &self.decay;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.ms.par_chunks_mut(CHUNK))
            .zip(self.mom.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, (((w, g), ms), mom))| {
                let base = i * CHUNK;
                for_each_run(decay, base..base + w.len(), |r, decayed| {
                    let local = r.start - base..r.end - base;
                    let wd = if decayed { cfg.weight_decay } else { 0.0 };
                    let s = Slices {
                        w: &mut w[local.clone()],
                        g: &g[local.clone()],
                        ms: &mut ms[local.clone()],
                        mom: &mut mom[local],
                    };
                    update(s, &cfg, lr, grad_scale, wd);
                });
            });
    }
}

struct Slices<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    ms: &'a mut [f32],
    mom: &'a mut [f32],
}

/// The RMSProp update over one run of elements sharing the same weight decay.
fn update(s: Slices, cfg: &RmsPropConfig, lr: f32, grad_scale: f32, wd: f32) {
    let (rho, momentum, eps) = (cfg.rho, cfg.momentum, cfg.eps);
    for (((w, &g), ms), mom) in
        s.w.iter_mut()
            .zip(s.g)
            .zip(s.ms.iter_mut())
            .zip(s.mom.iter_mut())
    {
        let g = g * grad_scale + wd * *w;
        *ms = rho * *ms + (1.0 - rho) * g * g;
        *mom = momentum * *mom + lr * g / (*ms + eps).sqrt();
        *w -= *mom;
    }
}

/// Call `f` with each part of `span` that lies in one decay run, in order. Elements no run
/// covers (a mask shorter than the buffer) get no decay.
fn for_each_run(
    runs: &[(Range<usize>, bool)],
    span: Range<usize>,
    mut f: impl FnMut(Range<usize>, bool),
) {
    let mut pos = span.start;
    let first = runs.partition_point(|(r, _)| r.end <= span.start);
    for (r, flag) in &runs[first..] {
        if pos >= span.end {
            break;
        }
        if r.start > pos {
            let end = r.start.min(span.end);
            f(pos..end, false);
            pos = end;
        }
        let end = r.end.min(span.end);
        if end > pos {
            f(pos..end, *flag);
            pos = end;
        }
    }
    if pos < span.end {
        f(pos..span.end, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_span_in_order() {
        let runs = vec![(0..3, true), (3..5, false), (7..10, true)];
        let mut seen = Vec::new();
        for_each_run(&runs, 2..12, |r, f| seen.push((r, f)));
        assert_eq!(
            seen,
            vec![
                (2..3, true),
                (3..5, false),
                (5..7, false),
                (7..10, true),
                (10..12, false)
            ]
        );
    }
}
