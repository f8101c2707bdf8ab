//! Finite-difference checks of every CPU op's backward at awkward InceptionV4 shapes, and of the
//! GEMM convolution against the direct definition.

mod common;

use common::{check_grad, project, random, random_away_from_ties};
use inception_engine::ops::{self, batchnorm::BnParams, conv::ConvShape, pool::PoolShape};
use inception_engine::plan::{Conv2d, Pool};

fn conv(
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: (usize, usize),
) -> Conv2d {
    Conv2d {
        cin,
        cout,
        kh,
        kw,
        stride,
        pad_top: pad.0,
        pad_bottom: pad.0,
        pad_left: pad.1,
        pad_right: pad.1,
    }
}

/// The awkward convolutions of v4: factorised 1x7/7x1 and 1x3/3x1, stride-2 valid, pad 1, 1x1.
fn conv_cases() -> Vec<(&'static str, Conv2d, usize, usize)> {
    vec![
        ("1x7 same", conv(3, 4, 1, 7, 1, (0, 3)), 5, 9),
        ("7x1 same", conv(3, 4, 7, 1, 1, (3, 0)), 9, 5),
        ("1x3 same", conv(4, 3, 1, 3, 1, (0, 1)), 4, 6),
        ("3x1 same", conv(4, 3, 3, 1, 1, (1, 0)), 6, 4),
        ("3x3 stride 2 valid", conv(3, 5, 3, 3, 2, (0, 0)), 9, 8),
        ("3x3 pad 1", conv(2, 3, 3, 3, 1, (1, 1)), 5, 5),
        ("1x1", conv(6, 4, 1, 1, 1, (0, 0)), 4, 3),
    ]
}

#[test]
fn conv_gemm_matches_direct_definition() {
    for (name, g, h, w) in conv_cases() {
        let s = ConvShape::new(g, 2, h, w);
        let x = random(2 * h * w * g.cin, 1);
        let wt = random(g.cout * s.k(), 2);
        let (mut y, mut want) = (
            vec![f32::NAN; 2 * s.oh() * s.ow() * g.cout],
            vec![f32::NAN; 2 * s.oh() * s.ow() * g.cout],
        );
        ops::conv::forward(&s, &x, &wt, &mut y);
        ops::conv::forward_direct(&s, &x, &wt, &mut want);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn conv_gradients() {
    for (name, g, h, w) in conv_cases() {
        let s = ConvShape::new(g, 2, h, w);
        let x = random(2 * h * w * g.cin, 3);
        let wt = random(g.cout * s.k(), 4);
        let r = random(2 * s.oh() * s.ow() * g.cout, 5);
        let run = |x: &[f32], wt: &[f32]| {
            let mut y = vec![0.0; r.len()];
            ops::conv::forward(&s, x, wt, &mut y);
            project(&y, &r)
        };
        let mut dx = vec![f32::NAN; x.len()];
        ops::conv::backward_data(&s, &r, &wt, &mut dx, false);
        check_grad(&format!("conv {name} dx"), &x, &dx, 1e-2, 1e-3, |x| {
            run(x, &wt)
        });
        let mut dw = vec![f32::NAN; wt.len()];
        ops::conv::backward_weight(&s, &x, &r, &mut dw);
        check_grad(&format!("conv {name} dw"), &wt, &dw, 1e-2, 1e-3, |wt| {
            run(&x, wt)
        });
    }
}

#[test]
fn backward_accumulates_when_asked() {
    let (_, g, h, w) = conv_cases()[0];
    let s = ConvShape::new(g, 1, h, w);
    let r = random(s.oh() * s.ow() * g.cout, 6);
    let wt = random(g.cout * s.k(), 7);
    let mut fresh = vec![f32::NAN; h * w * g.cin];
    ops::conv::backward_data(&s, &r, &wt, &mut fresh, false);
    let mut acc = vec![1.5; h * w * g.cin];
    ops::conv::backward_data(&s, &r, &wt, &mut acc, true);
    for (a, f) in acc.iter().zip(&fresh) {
        assert!((a - (f + 1.5)).abs() < 1e-5);
    }
}

#[test]
fn batchnorm_training_gradients() {
    let (rows, c) = (24, 5);
    let x = random(rows * c, 8);
    let gamma: Vec<f32> = random(c, 9).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = random(c, 10);
    let r = random(rows * c, 11);
    let run = |x: &[f32], gamma: &[f32], beta: &[f32]| {
        let (mut y, mut m, mut s, mut rm, mut rv) = (
            vec![0.0; rows * c],
            vec![0.0; c],
            vec![0.0; c],
            vec![0.0; c],
            vec![1.0; c],
        );
        ops::batchnorm::forward_train(
            x,
            &BnParams {
                gamma,
                beta,
                eps: 1e-3,
            },
            0.1,
            c,
            &mut y,
            &mut m,
            &mut s,
            &mut rm,
            &mut rv,
        );
        (project(&y, &r), m, s)
    };
    let (_, mean, inv_std) = run(&x, &gamma, &beta);
    let (mut dx, mut dg, mut db) = (
        vec![f32::NAN; x.len()],
        vec![f32::NAN; c],
        vec![f32::NAN; c],
    );
    ops::batchnorm::backward(
        &x, &r, &gamma, &mean, &inv_std, c, &mut dx, &mut dg, &mut db, false,
    );
    check_grad("bn dx", &x, &dx, 1e-2, 2e-3, |x| run(x, &gamma, &beta).0);
    check_grad("bn dgamma", &gamma, &dg, 1e-2, 1e-3, |g| {
        run(&x, g, &beta).0
    });
    check_grad("bn dbeta", &beta, &db, 1e-2, 1e-3, |b| run(&x, &gamma, b).0);
}

#[test]
fn batchnorm_running_statistics_follow_pytorch_convention() {
    let (rows, c) = (10, 2);
    let x = random(rows * c, 12);
    let p = BnParams {
        gamma: &[1.0, 1.0],
        beta: &[0.0, 0.0],
        eps: 1e-3,
    };
    let (mut y, mut m, mut s, mut rm, mut rv) = (
        vec![0.0; rows * c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.5; c],
        vec![2.0; c],
    );
    ops::batchnorm::forward_train(&x, &p, 0.1, c, &mut y, &mut m, &mut s, &mut rm, &mut rv);
    for ch in 0..c {
        let vals: Vec<f64> = (0..rows).map(|r| x[r * c + ch] as f64).collect();
        let mean = vals.iter().sum::<f64>() / rows as f64;
        let unbiased = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (rows - 1) as f64;
        assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * mean)).abs() < 1e-6);
        assert!((rv[ch] as f64 - (0.9 * 2.0 + 0.1 * unbiased)).abs() < 1e-6);
    }
}

#[test]
fn relu_gradient() {
    let x = random_away_from_ties(60, 13, 0.02);
    let r = random(60, 14);
    let run = |x: &[f32]| {
        let mut y = vec![0.0; 60];
        ops::relu::forward(x, &mut y);
        project(&y, &r)
    };
    let mut y = vec![0.0; 60];
    ops::relu::forward(&x, &mut y);
    let mut dx = vec![f32::NAN; 60];
    ops::relu::backward(&y, &r, &mut dx, false);
    check_grad("relu", &x, &dx, 1e-2, 1e-4, run);
}

fn pool_check(name: &str, p: Pool, h: usize, w: usize, max: bool) {
    let (n, c) = (2, 3);
    let s = PoolShape::new(p, n, h, w, c);
    let x = random_away_from_ties(n * h * w * c, 15, 0.01);
    let r = random(n * s.oh() * s.ow() * c, 16);
    let fwd = |x: &[f32]| {
        let mut y = vec![0.0; r.len()];
        if max {
            ops::pool::max_forward(&s, x, &mut y);
        } else {
            ops::pool::avg_forward(&s, x, &mut y);
        }
        project(&y, &r)
    };
    let mut dx = vec![f32::NAN; x.len()];
    if max {
        ops::pool::max_backward(&s, &x, &r, &mut dx, false);
    } else {
        ops::pool::avg_backward(&s, &r, &mut dx, false);
    }
    check_grad(name, &x, &dx, 5e-3, 1e-3, fwd);
}

#[test]
fn pool_gradients() {
    pool_check(
        "maxpool 3x3/2 valid",
        Pool {
            k: 3,
            stride: 2,
            pad: 0,
        },
        9,
        8,
        true,
    );
    pool_check(
        "maxpool 3x3/1 pad 1",
        Pool {
            k: 3,
            stride: 1,
            pad: 1,
        },
        5,
        6,
        true,
    );
    pool_check(
        "avgpool 3x3/1 pad 1 (borders)",
        Pool {
            k: 3,
            stride: 1,
            pad: 1,
        },
        5,
        6,
        false,
    );
    pool_check(
        "avgpool 3x3/2 valid",
        Pool {
            k: 3,
            stride: 2,
            pad: 0,
        },
        7,
        7,
        false,
    );
}

#[test]
fn avgpool_excludes_padding_from_the_count() {
    let s = PoolShape::new(
        Pool {
            k: 3,
            stride: 1,
            pad: 1,
        },
        1,
        3,
        3,
        1,
    );
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let mut y = vec![0.0; 9];
    ops::pool::avg_forward(&s, &x, &mut y);
    // Corner (0,0) averages the 2x2 in-bounds block {1, 2, 4, 5}; the centre averages all nine.
    assert_eq!(y[0], 3.0);
    assert_eq!(y[4], 5.0);
}

#[test]
fn global_pool_gradient() {
    let (n, hw, c) = (2, 6, 3);
    let x = random(n * hw * c, 17);
    let r = random(n * c, 18);
    let mut dx = vec![f32::NAN; x.len()];
    ops::global_pool::backward(&r, n, hw, c, &mut dx, false);
    check_grad("global pool", &x, &dx, 1e-2, 1e-4, |x| {
        let mut y = vec![0.0; n * c];
        ops::global_pool::forward(x, n, hw, c, &mut y);
        project(&y, &r)
    });
}

#[test]
fn concat_of_four_branches_gradient() {
    let pixels = 6;
    let channels = [2usize, 3, 1, 4];
    let parts: Vec<Vec<f32>> = channels
        .iter()
        .enumerate()
        .map(|(i, &c)| random(pixels * c, 20 + i as u64))
        .collect();
    let total: usize = channels.iter().sum();
    let r = random(pixels * total, 19);
    for k in 0..4 {
        let mut dx = vec![f32::NAN; parts[k].len()];
        ops::concat::backward(&r, &channels, k, &mut dx, false);
        check_grad(
            &format!("concat input {k}"),
            &parts[k],
            &dx,
            1e-2,
            1e-4,
            |xk| {
                let views: Vec<&[f32]> = (0..4)
                    .map(|j| if j == k { xk } else { parts[j].as_slice() })
                    .collect();
                let mut y = vec![0.0; pixels * total];
                ops::concat::forward(&views, &channels, &mut y);
                project(&y, &r)
            },
        );
    }
}

#[test]
fn dropout_gradient_and_rate() {
    let x = random(4000, 24);
    let r = random(4000, 25);
    let (p, seed, step) = (0.2, 7, 3);
    let mut y = vec![0.0; x.len()];
    ops::dropout::forward(&x, p, seed, step, &mut y);
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f32 / x.len() as f32;
    assert!((dropped - p).abs() < 0.03, "dropped fraction {dropped}");
    let mut dx = vec![f32::NAN; x.len()];
    ops::dropout::backward(&r, p, seed, step, &mut dx, false);
    check_grad("dropout", &x, &dx, 1e-2, 1e-4, |x| {
        let mut y = vec![0.0; x.len()];
        ops::dropout::forward(x, p, seed, step, &mut y);
        project(&y, &r)
    });
    let mut other = vec![0.0; x.len()];
    ops::dropout::forward(&x, p, seed, step + 1, &mut other);
    assert_ne!(y, other, "a new step must draw a new mask");
}

#[test]
fn linear_gradients() {
    let (n, fin, fout) = (3, 5, 4);
    let (x, w, b, r) = (
        random(n * fin, 26),
        random(fout * fin, 27),
        random(fout, 28),
        random(n * fout, 29),
    );
    let run = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; n * fout];
        ops::linear::forward(x, w, b, n, fin, fout, &mut y);
        project(&y, &r)
    };
    let (mut dx, mut dw, mut db) = (
        vec![f32::NAN; x.len()],
        vec![f32::NAN; w.len()],
        vec![f32::NAN; fout],
    );
    ops::linear::backward(
        &x,
        &w,
        &r,
        n,
        fin,
        fout,
        Some(&mut dx),
        &mut dw,
        &mut db,
        false,
    );
    check_grad("linear dx", &x, &dx, 1e-2, 1e-4, |x| run(x, &w, &b));
    check_grad("linear dw", &w, &dw, 1e-2, 1e-4, |w| run(&x, w, &b));
    check_grad("linear db", &b, &db, 1e-2, 1e-4, |b| run(&x, &w, b));
}

#[test]
fn softmax_cross_entropy_with_smoothing() {
    let (n, k, eps) = (4, 6, 0.1);
    let z: Vec<f32> = random(n * k, 30).iter().map(|v| 3.0 * v).collect();
    let labels = [0.0, 5.0, 2.0, 2.0];
    // The loss against its formula, computed here independently.
    let mut want = 0.0f64;
    for i in 0..n {
        let row = &z[i * k..(i + 1) * k];
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        for (j, &v) in row.iter().enumerate() {
            let q = if j == labels[i] as usize {
                1.0 - eps + eps / k as f64
            } else {
                eps / k as f64
            };
            want -= q * (v as f64 - lse);
        }
    }
    want /= n as f64;
    let got = ops::softmax_ce::forward(&z, &labels, n, k, eps as f32);
    assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    let mut dz = vec![f32::NAN; z.len()];
    ops::softmax_ce::backward(&z, &labels, n, k, eps as f32, 1.0, &mut dz);
    check_grad("softmax ce", &z, &dz, 1e-2, 1e-3, |z| {
        ops::softmax_ce::forward(z, &labels, n, k, eps as f32) as f64
    });
    let mut scaled = vec![0.0; z.len()];
    ops::softmax_ce::backward(&z, &labels, n, k, eps as f32, 1024.0, &mut scaled);
    assert!(scaled
        .iter()
        .zip(&dz)
        .all(|(s, d)| (s - 1024.0 * d).abs() < 1e-3));
}
