//! The CPU reference of the device self-test: src/ops (and the optimizer of src/train) behind the
//! [`CpuReference`] hook. Only adapts shapes and layouts; the maths is theirs.

use std::ops::Range;

use super::conv::ConvShape;
use super::ops::PoolShape;
use super::selftest::{BnBackwardRef, BnCase, BnForwardRef, CpuReference, RmspropHyper};
use crate::ops;
use crate::optim::{RmsProp, RmsPropConfig};

/// src/ops as the self-test oracle.
pub struct OpsReference;

fn ops_conv(s: &ConvShape) -> ops::conv::ConvShape {
    ops::conv::ConvShape::new(s.conv, s.n, s.h, s.w)
}

fn ops_pool(s: &PoolShape) -> ops::pool::PoolShape {
    ops::pool::PoolShape::new(s.pool, s.n, s.h, s.w, s.c)
}

/// Runs of equal flags, the optimizer's decay-mask format.
fn runs(flags: &[bool]) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &f) in flags.iter().enumerate() {
        match out.last_mut() {
            Some((r, g)) if *g == f => r.end = i + 1,
            _ => out.push((i..i + 1, f)),
        }
    }
    out
}

impl CpuReference for OpsReference {
    fn conv_fprop(&self, s: &ConvShape, x: &[f32], w: &[f32]) -> Option<Vec<f32>> {
        let mut y = vec![0.0; s.n * s.oh() * s.ow() * s.conv.cout];
        ops::conv::forward(&ops_conv(s), x, w, &mut y);
        Some(y)
    }

    fn conv_dgrad(&self, s: &ConvShape, dy: &[f32], w: &[f32]) -> Option<Vec<f32>> {
        let mut dx = vec![0.0; s.n * s.h * s.w * s.conv.cin];
        ops::conv::backward_data(&ops_conv(s), dy, w, &mut dx, false);
        Some(dx)
    }

    fn conv_wgrad(&self, s: &ConvShape, x: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
        let c = &s.conv;
        let mut dw = vec![0.0; c.cout * c.kh * c.kw * c.cin];
        ops::conv::backward_weight(&ops_conv(s), x, dy, &mut dw);
        Some(dw)
    }

    fn bn_forward_train(&self, case: &BnCase) -> Option<BnForwardRef> {
        let (m, c) = (case.m, case.c);
        let p = ops::batchnorm::BnParams {
            gamma: case.gamma,
            beta: case.beta,
            eps: case.eps,
        };
        let mut r = BnForwardRef {
            y: vec![0.0; m * c],
            mean: vec![0.0; c],
            inv_std: vec![0.0; c],
            running_mean: case.running_mean.to_vec(),
            running_var: case.running_var.to_vec(),
        };
        ops::batchnorm::forward_train(
            case.x,
            &p,
            case.momentum,
            c,
            &mut r.y,
            &mut r.mean,
            &mut r.inv_std,
            &mut r.running_mean,
            &mut r.running_var,
        );
        if case.relu {
            r.y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Some(r)
    }

    fn bn_forward_infer(&self, case: &BnCase) -> Option<Vec<f32>> {
        let p = ops::batchnorm::BnParams {
            gamma: case.gamma,
            beta: case.beta,
            eps: case.eps,
        };
        let mut y = vec![0.0; case.m * case.c];
        ops::batchnorm::forward_infer(
            case.x,
            &p,
            case.c,
            case.running_mean,
            case.running_var,
            &mut y,
        );
        if case.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Some(y)
    }

    fn bn_backward(
        &self,
        case: &BnCase,
        y: &[f32],
        dy: &[f32],
        mean: &[f32],
        inv_std: &[f32],
    ) -> Option<BnBackwardRef> {
        let c = case.c;
        // The fused ReLU backward: the gradient passes where the BN+ReLU output is positive.
        let dy_eff: Vec<f32> = if case.relu {
            dy.iter()
                .zip(y)
                .map(|(&g, &o)| if o > 0.0 { g } else { 0.0 })
                .collect()
        } else {
            dy.to_vec()
        };
        let mut r = BnBackwardRef {
            dx: vec![0.0; case.m * c],
            dgamma: vec![0.0; c],
            dbeta: vec![0.0; c],
        };
        ops::batchnorm::backward(
            case.x,
            &dy_eff,
            case.gamma,
            mean,
            inv_std,
            c,
            &mut r.dx,
            &mut r.dgamma,
            &mut r.dbeta,
            false,
        );
        Some(r)
    }

    fn pool_forward(&self, s: &PoolShape, max: bool, x: &[f32]) -> Option<Vec<f32>> {
        let mut y = vec![0.0; s.n * s.oh() * s.ow() * s.c];
        let ps = ops_pool(s);
        if max {
            ops::pool::max_forward(&ps, x, &mut y);
        } else {
            ops::pool::avg_forward(&ps, x, &mut y);
        }
        Some(y)
    }

    fn pool_backward(&self, s: &PoolShape, max: bool, x: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        let ps = ops_pool(s);
        if max {
            ops::pool::max_backward(&ps, x, dy, &mut dx, false);
        } else {
            ops::pool::avg_backward(&ps, dy, &mut dx, false);
        }
        Some(dx)
    }

    fn dropout_forward(&self, p: f32, seed: u64, step: u64, x: &[f32]) -> Option<Vec<f32>> {
        let mut y = vec![0.0; x.len()];
        ops::dropout::forward(x, p, seed, step, &mut y);
        Some(y)
    }

    fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        smoothing: f32,
        grad_scale: f32,
        logits: &[f32],
        labels: &[f32],
    ) -> Option<(f32, Vec<f32>)> {
        let loss = ops::softmax_ce::forward(logits, labels, n, k, smoothing);
        let mut dz = vec![0.0; n * k];
        ops::softmax_ce::backward(logits, labels, n, k, smoothing, grad_scale, &mut dz);
        Some((loss, dz))
    }

    fn rmsprop(
        &self,
        h: &RmspropHyper,
        g: &[f32],
        decay: &[bool],
        w: &mut [f32],
        ms: &mut [f32],
        mom: &mut [f32],
    ) -> Option<()> {
        let cfg = RmsPropConfig {
            rho: h.rho,
            momentum: h.momentum,
            eps: h.eps,
            weight_decay: h.weight_decay,
            decay_all: false,
        };
        let mut opt = RmsProp::with_mask(cfg, w.len(), runs(decay));
        opt.ms.copy_from_slice(ms);
        opt.mom.copy_from_slice(mom);
        opt.step(w, g, h.lr, h.inv_loss_scale);
        ms.copy_from_slice(&opt.ms);
        mom.copy_from_slice(&opt.mom);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_equal_flags() {
        assert_eq!(
            runs(&[true, true, false, true]),
            vec![(0..2, true), (2..3, false), (3..4, true)]
        );
        assert!(runs(&[]).is_empty());
    }
}
