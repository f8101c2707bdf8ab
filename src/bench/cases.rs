//! What the kernel suite measures, derived from the plan: every distinct convolution shape (named
//! after the first layer that has it), the fully connected layer, representative batchnorm and
//! every distinct pooling shape, with their FLOP and minimum-traffic byte counts. Pure data: no GPU.

use anyhow::Result;
use serde::Serialize;

use crate::ops::conv::ConvShape;
use crate::ops::pool::PoolShape;
use crate::plan::{self, Op, Plan, PlanConfig};

/// One distinct convolution of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct ConvCase {
    /// Name of the first node with this shape (timm's module name).
    pub name: String,
    /// How many convolutions of the plan share the shape.
    pub layers: usize,
    pub shape: ConvShape,
}

impl ConvCase {
    /// Useful floating-point operations of one pass: 2 x the forward MACs. The data and weight
    /// gradients do the same arithmetic (the usual convention for convolution benchmarks).
    pub fn flop(&self) -> f64 {
        let s = &self.shape;
        let c = &s.conv;
        2.0 * (s.n * s.oh() * s.ow() * c.cout * c.kh * c.kw * c.cin) as f64
    }

    /// Compact label: `HxWxCin -> Cout kKHxKW sS pT,B,L,R`.
    pub fn label(&self) -> String {
        self.shape.label()
    }
}

/// A batchnorm over activations viewed as [m][c] (fp16 activations, fp32 statistics).
#[derive(Clone, Debug, Serialize)]
pub struct BnCase {
    pub name: String,
    pub m: usize,
    pub c: usize,
}

impl BnCase {
    /// Minimum traffic of the training forward: read x once, write y once (fp16).
    pub fn fwd_bytes(&self) -> f64 {
        2.0 * 2.0 * (self.m * self.c) as f64
    }
    /// Minimum traffic of the backward with the fused ReLU: read x, y, dy, write dx (fp16).
    pub fn bwd_bytes(&self) -> f64 {
        4.0 * 2.0 * (self.m * self.c) as f64
    }
}

/// A distinct pooling window of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct PoolCase {
    pub name: String,
    pub max: bool,
    #[serde(skip)]
    pub shape: PoolShape,
}

impl PoolCase {
    fn input_elems(&self) -> f64 {
        let s = &self.shape;
        (s.n * s.h * s.w * s.c) as f64
    }
    fn output_elems(&self) -> f64 {
        let s = &self.shape;
        (s.n * s.oh() * s.ow() * s.c) as f64
    }
    /// Minimum traffic of the forward: read x, write y (fp16).
    pub fn fwd_bytes(&self) -> f64 {
        2.0 * (self.input_elems() + self.output_elems())
    }
    /// Minimum traffic of the backward: read dy, write dx, and for max pooling read x (to find
    /// each window's maximum again).
    pub fn bwd_bytes(&self) -> f64 {
        let x = if self.max { self.input_elems() } else { 0.0 };
        2.0 * (self.output_elems() + self.input_elems() + x)
    }
    pub fn label(&self) -> String {
        let s = &self.shape;
        format!(
            "{} {}x{}x{} k{} s{} p{}",
            if self.max { "max" } else { "avg" },
            s.h,
            s.w,
            s.c,
            s.pool.k,
            s.pool.stride,
            s.pool.pad
        )
    }
}

pub use crate::backend::cuda::cost::RMSPROP_BYTES_PER_PARAM;

/// Everything the suite measures for one plan.
#[derive(Clone, Debug, Serialize)]
pub struct Cases {
    pub batch: usize,
    pub image_size: usize,
    pub convs: Vec<ConvCase>,
    /// The classifier as (batch, in, out).
    pub fc: (usize, usize, usize),
    pub bns: Vec<BnCase>,
    pub pools: Vec<PoolCase>,
    /// Trainable scalars (the flat buffer RMSProp updates).
    pub params: usize,
    /// Classes of the softmax cross-entropy.
    pub classes: usize,
}

impl Cases {
    /// The classifier as the 1x1 convolution over an n x 1 x 1 image that the linear launchers run.
    pub fn fc_shape(&self) -> ConvShape {
        let (n, cin, cout) = self.fc;
        ConvShape::fc(n, cin, cout)
    }
}

/// Derives the cases of plan `name` at `batch` and `image_size`.
pub fn derive(name: &str, batch: usize, image_size: usize) -> Result<Cases> {
    let plan = plan::build(
        name,
        PlanConfig {
            batch,
            image_size,
            ..PlanConfig::default()
        },
    )?;
    Ok(from_plan(&plan))
}

pub fn from_plan(plan: &Plan) -> Cases {
    let mut convs: Vec<ConvCase> = Vec::new();
    let mut bn_shapes: Vec<BnCase> = Vec::new();
    let mut pools: Vec<PoolCase> = Vec::new();
    let mut fc = (plan.batch(), 0, 0);
    for node in &plan.nodes {
        let x = plan.shape(node.inputs[0]);
        match &node.op {
            Op::Conv2d(c) => {
                let shape = ConvShape {
                    conv: *c,
                    n: x[0],
                    h: x[1],
                    w: x[2],
                };
                match convs.iter_mut().find(|k| k.shape == shape) {
                    Some(k) => k.layers += 1,
                    None => convs.push(ConvCase {
                        name: node.name.clone(),
                        layers: 1,
                        shape,
                    }),
                }
            }
            Op::BatchNorm { .. } => {
                let c = *x.last().unwrap_or(&1);
                let m = x.iter().product::<usize>() / c.max(1);
                if !bn_shapes.iter().any(|b| b.m == m && b.c == c) {
                    bn_shapes.push(BnCase {
                        name: node.name.clone(),
                        m,
                        c,
                    });
                }
            }
            Op::MaxPool(p) | Op::AvgPool(p) if x.len() == 4 => {
                let case = PoolCase {
                    name: node.name.clone(),
                    max: matches!(node.op, Op::MaxPool(_)),
                    shape: PoolShape {
                        pool: *p,
                        n: x[0],
                        h: x[1],
                        w: x[2],
                        c: x[3],
                    },
                };
                if !pools
                    .iter()
                    .any(|q| q.max == case.max && q.shape == case.shape)
                {
                    pools.push(case);
                }
            }
            Op::Linear {
                in_features,
                out_features,
            } => fc = (x[0], *in_features, *out_features),
            _ => {}
        }
    }
    Cases {
        batch: plan.batch(),
        image_size: plan.config.image_size,
        convs,
        fc,
        bns: representative_bns(bn_shapes),
        pools,
        params: plan.param_count(),
        classes: plan.shape(plan.logits)[1],
    }
}

/// The largest, the median and the smallest distinct BN shape (by element count): the bandwidth
/// figure of a memory-bound kernel depends mostly on size, so three points show the curve.
fn representative_bns(mut all: Vec<BnCase>) -> Vec<BnCase> {
    all.sort_by_key(|b| std::cmp::Reverse(b.m * b.c));
    let mut pick: Vec<BnCase> = Vec::new();
    for i in [0, all.len() / 2, all.len().saturating_sub(1)] {
        if let Some(b) = all.get(i) {
            if !pick.iter().any(|p| p.m == b.m && p.c == b.c) {
                pick.push(b.clone());
            }
        }
    }
    pick
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_has_38_distinct_convs_named_after_their_first_layer() {
        let cases = derive("v4", 128, 299).unwrap();
        assert_eq!(cases.convs.len(), 38);
        assert_eq!(cases.convs.iter().map(|c| c.layers).sum::<usize>(), 149);
        let stem = &cases.convs[0];
        assert_eq!(
            (stem.shape.n, stem.shape.h, stem.shape.conv.cin),
            (128, 299, 3)
        );
        assert_eq!(stem.label(), "299x299x3->32 k3x3 s2 p0,0,0,0");
        // 2 x 19,181,664 MACs per image at batch 128.
        assert_eq!(stem.flop(), 2.0 * 19_181_664.0 * 128.0);
        assert_eq!(cases.fc, (128, 1536, 1000));
        assert_eq!(cases.params, 42_679_816);
        assert_eq!(cases.classes, 1000);
        // Sum over the distinct shapes weighted by their layer count gives the plan's conv MACs.
        let macs: f64 = cases
            .convs
            .iter()
            .map(|c| c.flop() / 2.0 * c.layers as f64)
            .sum();
        assert_eq!(macs, (12_253_974_624.0 - 1536.0 * 1000.0) * 128.0);
    }

    #[test]
    fn pools_and_bns_cover_the_plan() {
        let cases = derive("v4", 128, 299).unwrap();
        assert!(cases.pools.iter().any(|p| p.max) && cases.pools.iter().any(|p| !p.max));
        let first = &cases.pools[0];
        assert!(first.max && first.shape.h == 147 && first.shape.c == 64);
        assert_eq!(cases.bns.len(), 3);
        assert!(cases.bns[0].m * cases.bns[0].c >= cases.bns[2].m * cases.bns[2].c);
        assert_eq!(
            cases.bns[0].fwd_bytes(),
            4.0 * (cases.bns[0].m * cases.bns[0].c) as f64
        );
    }

    #[test]
    fn every_model_derives_at_its_selftest_shape() {
        for m in crate::plan::models::MODELS {
            let s = m.selftest.full;
            let cases = derive(m.name, s.batch, s.image_size).unwrap();
            assert!(!cases.convs.is_empty(), "{}", m.name);
        }
    }
}
