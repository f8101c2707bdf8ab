//! InceptionV4 (Szegedy et al. 2016) with the timm/TF-slim head, named as timm names its modules so
//! that checkpoints map one to one onto timm's `inception_v4` state dict.

use super::{GraphBuilder, Plan, PlanConfig, TensorId};
use anyhow::Result;

pub fn build(config: PlanConfig) -> Result<Plan> {
    let classes = config.num_classes;
    let dropout = config.dropout;
    let mut g = GraphBuilder::new("v4", config)?;
    let x = g.input();
    // Stem.
    let x = g.conv_bn_relu("features.0", x, 32, (3, 3), 2, (0, 0))?;
    let x = g.conv_bn_relu("features.1", x, 32, (3, 3), 1, (0, 0))?;
    let x = g.conv_bn_relu("features.2", x, 64, (3, 3), 1, (1, 1))?;
    let x = mixed_3a(&mut g, "features.3", x)?;
    let x = mixed_4a(&mut g, "features.4", x)?;
    let mut x = mixed_5a(&mut g, "features.5", x)?;
    for i in 6..10 {
        x = inception_a(&mut g, &format!("features.{i}"), x)?;
    }
    x = reduction_a(&mut g, "features.10", x)?;
    for i in 11..18 {
        x = inception_b(&mut g, &format!("features.{i}"), x)?;
    }
    x = reduction_b(&mut g, "features.18", x)?;
    for i in 19..22 {
        x = inception_c(&mut g, &format!("features.{i}"), x)?;
    }
    let x = g.global_avg_pool("global_pool", x)?;
    let x = g.dropout("head_drop", x, dropout);
    let logits = g.linear("last_linear", x, classes)?;
    g.finish(logits)
}

/// A 1xk ("h") or kx1 ("v") factorised convolution with "same" padding.
pub(crate) fn conv_1xk(
    g: &mut GraphBuilder,
    name: &str,
    x: TensorId,
    cout: usize,
    k: usize,
) -> Result<TensorId> {
    g.conv_bn_relu(name, x, cout, (1, k), 1, (0, k / 2))
}

pub(crate) fn conv_kx1(
    g: &mut GraphBuilder,
    name: &str,
    x: TensorId,
    cout: usize,
    k: usize,
) -> Result<TensorId> {
    g.conv_bn_relu(name, x, cout, (k, 1), 1, (k / 2, 0))
}

fn mixed_3a(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.max_pool(&format!("{p}.maxpool"), x, 3, 2, 0)?;
    let b1 = g.conv_bn_relu(&format!("{p}.conv"), x, 96, (3, 3), 2, (0, 0))?;
    g.concat(&format!("{p}.cat"), &[b0, b1])
}

fn mixed_4a(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0.0"), x, 64, (1, 1), 1, (0, 0))?;
    let b0 = g.conv_bn_relu(&format!("{p}.branch0.1"), b0, 96, (3, 3), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.0"), x, 64, (1, 1), 1, (0, 0))?;
    let b1 = conv_1xk(g, &format!("{p}.branch1.1"), b1, 64, 7)?;
    let b1 = conv_kx1(g, &format!("{p}.branch1.2"), b1, 64, 7)?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.3"), b1, 96, (3, 3), 1, (0, 0))?;
    g.concat(&format!("{p}.cat"), &[b0, b1])
}

fn mixed_5a(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.conv"), x, 192, (3, 3), 2, (0, 0))?;
    let b1 = g.max_pool(&format!("{p}.maxpool"), x, 3, 2, 0)?;
    g.concat(&format!("{p}.cat"), &[b0, b1])
}

fn inception_a(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0"), x, 96, (1, 1), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.0"), x, 64, (1, 1), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.1"), b1, 96, (3, 3), 1, (1, 1))?;
    let b2 = g.conv_bn_relu(&format!("{p}.branch2.0"), x, 64, (1, 1), 1, (0, 0))?;
    let b2 = g.conv_bn_relu(&format!("{p}.branch2.1"), b2, 96, (3, 3), 1, (1, 1))?;
    let b2 = g.conv_bn_relu(&format!("{p}.branch2.2"), b2, 96, (3, 3), 1, (1, 1))?;
    let b3 = g.avg_pool(&format!("{p}.branch3.0"), x, 3, 1, 1)?;
    let b3 = g.conv_bn_relu(&format!("{p}.branch3.1"), b3, 96, (1, 1), 1, (0, 0))?;
    g.concat(&format!("{p}.cat"), &[b0, b1, b2, b3])
}

fn reduction_a(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0"), x, 384, (3, 3), 2, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.0"), x, 192, (1, 1), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.1"), b1, 224, (3, 3), 1, (1, 1))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.2"), b1, 256, (3, 3), 2, (0, 0))?;
    let b2 = g.max_pool(&format!("{p}.branch2"), x, 3, 2, 0)?;
    g.concat(&format!("{p}.cat"), &[b0, b1, b2])
}

fn inception_b(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0"), x, 384, (1, 1), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.0"), x, 192, (1, 1), 1, (0, 0))?;
    let b1 = conv_1xk(g, &format!("{p}.branch1.1"), b1, 224, 7)?;
    let b1 = conv_kx1(g, &format!("{p}.branch1.2"), b1, 256, 7)?;
    let b2 = g.conv_bn_relu(&format!("{p}.branch2.0"), x, 192, (1, 1), 1, (0, 0))?;
    let b2 = conv_kx1(g, &format!("{p}.branch2.1"), b2, 192, 7)?;
    let b2 = conv_1xk(g, &format!("{p}.branch2.2"), b2, 224, 7)?;
    let b2 = conv_kx1(g, &format!("{p}.branch2.3"), b2, 224, 7)?;
    let b2 = conv_1xk(g, &format!("{p}.branch2.4"), b2, 256, 7)?;
    let b3 = g.avg_pool(&format!("{p}.branch3.0"), x, 3, 1, 1)?;
    let b3 = g.conv_bn_relu(&format!("{p}.branch3.1"), b3, 128, (1, 1), 1, (0, 0))?;
    g.concat(&format!("{p}.cat"), &[b0, b1, b2, b3])
}

fn reduction_b(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0.0"), x, 192, (1, 1), 1, (0, 0))?;
    let b0 = g.conv_bn_relu(&format!("{p}.branch0.1"), b0, 192, (3, 3), 2, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.0"), x, 256, (1, 1), 1, (0, 0))?;
    let b1 = conv_1xk(g, &format!("{p}.branch1.1"), b1, 256, 7)?;
    let b1 = conv_kx1(g, &format!("{p}.branch1.2"), b1, 320, 7)?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1.3"), b1, 320, (3, 3), 2, (0, 0))?;
    let b2 = g.max_pool(&format!("{p}.branch2"), x, 3, 2, 0)?;
    g.concat(&format!("{p}.cat"), &[b0, b1, b2])
}

fn inception_c(g: &mut GraphBuilder, p: &str, x: TensorId) -> Result<TensorId> {
    let b0 = g.conv_bn_relu(&format!("{p}.branch0"), x, 256, (1, 1), 1, (0, 0))?;
    let b1 = g.conv_bn_relu(&format!("{p}.branch1_0"), x, 384, (1, 1), 1, (0, 0))?;
    let b1a = conv_1xk(g, &format!("{p}.branch1_1a"), b1, 256, 3)?;
    let b1b = conv_kx1(g, &format!("{p}.branch1_1b"), b1, 256, 3)?;
    let b2 = g.conv_bn_relu(&format!("{p}.branch2_0"), x, 384, (1, 1), 1, (0, 0))?;
    let b2 = conv_kx1(g, &format!("{p}.branch2_1"), b2, 448, 3)?;
    let b2 = conv_1xk(g, &format!("{p}.branch2_2"), b2, 512, 3)?;
    let b2a = conv_1xk(g, &format!("{p}.branch2_3a"), b2, 256, 3)?;
    let b2b = conv_kx1(g, &format!("{p}.branch2_3b"), b2, 256, 3)?;
    let b3 = g.avg_pool(&format!("{p}.branch3.0"), x, 3, 1, 1)?;
    let b3 = g.conv_bn_relu(&format!("{p}.branch3.1"), b3, 256, (1, 1), 1, (0, 0))?;
    // timm concatenates the two halves of branch1 and branch2 in place: the flat order is the same.
    g.concat(&format!("{p}.cat"), &[b0, b1a, b1b, b2a, b2b, b3])
}
