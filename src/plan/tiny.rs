//! `tiny`: a miniature InceptionV4 with one block of each kind and small channel counts, for fast
//! tests. It exercises every op and every awkward shape of v4 (1x7/7x1, 1x3/3x1, stride-2 valid
//! convolutions, padded average pools, four-way concats, tensors feeding several branches).

use super::v4::{conv_1xk, conv_kx1};
use super::{GraphBuilder, Plan, PlanConfig};
use anyhow::Result;

pub fn build(config: PlanConfig) -> Result<Plan> {
    let classes = config.num_classes;
    let dropout = config.dropout;
    let mut g = GraphBuilder::new("tiny", config)?;
    let x = g.input();
    // Stem: stride-2 valid, then padded 3x3.
    let x = g.conv_bn_relu("stem.0", x, 8, (3, 3), 2, (0, 0))?;
    let x = g.conv_bn_relu("stem.1", x, 8, (3, 3), 1, (1, 1))?;
    // Mixed-3a-like: maxpool || stride-2 conv.
    let p = g.max_pool("mixed3.maxpool", x, 3, 2, 0)?;
    let c = g.conv_bn_relu("mixed3.conv", x, 8, (3, 3), 2, (0, 0))?;
    let x = g.concat("mixed3.cat", &[p, c])?;
    // Inception-A-like: four branches, padded avg pool.
    let a0 = g.conv_bn_relu("a.branch0", x, 4, (1, 1), 1, (0, 0))?;
    let a1 = g.conv_bn_relu("a.branch1.0", x, 4, (1, 1), 1, (0, 0))?;
    let a1 = g.conv_bn_relu("a.branch1.1", a1, 4, (3, 3), 1, (1, 1))?;
    let a2 = g.conv_bn_relu("a.branch2.0", x, 4, (1, 1), 1, (0, 0))?;
    let a2 = conv_1xk(&mut g, "a.branch2.1", a2, 4, 7)?;
    let a2 = conv_kx1(&mut g, "a.branch2.2", a2, 4, 7)?;
    let a3 = g.avg_pool("a.branch3.0", x, 3, 1, 1)?;
    let a3 = g.conv_bn_relu("a.branch3.1", a3, 4, (1, 1), 1, (0, 0))?;
    let x = g.concat("a.cat", &[a0, a1, a2, a3])?;
    // Reduction-like.
    let r0 = g.conv_bn_relu("red.branch0", x, 8, (3, 3), 2, (0, 0))?;
    let r1 = g.max_pool("red.branch1", x, 3, 2, 0)?;
    let x = g.concat("red.cat", &[r0, r1])?;
    // Inception-C-like: one 1x1 feeding a 1x3 and a 3x1.
    let c0 = g.conv_bn_relu("c.branch0", x, 4, (1, 1), 1, (0, 0))?;
    let c1 = g.conv_bn_relu("c.branch1_0", x, 6, (1, 1), 1, (0, 0))?;
    let c1a = conv_1xk(&mut g, "c.branch1_1a", c1, 4, 3)?;
    let c1b = conv_kx1(&mut g, "c.branch1_1b", c1, 4, 3)?;
    let c3 = g.avg_pool("c.branch3.0", x, 3, 1, 1)?;
    let c3 = g.conv_bn_relu("c.branch3.1", c3, 4, (1, 1), 1, (0, 0))?;
    let x = g.concat("c.cat", &[c0, c1a, c1b, c3])?;
    let x = g.global_avg_pool("global_pool", x)?;
    let x = g.dropout("head_drop", x, dropout);
    let logits = g.linear("last_linear", x, classes)?;
    g.finish(logits)
}
