//! CPU reference ops with criterion: convolution forward, data and weight gradient at four
//! representative InceptionV4 shapes (stem, Inception-A 1x1, Inception-B 1x7, Inception-C 1x3) at
//! batch 2, batchnorm, pooling and ReLU at the largest stem activation, and one full training step
//! of the `tiny` plan. Sized to finish in a few minutes on two cores:
//! `cargo bench --bench cpu_ops`. Under `cargo test` criterion runs each routine once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use inception_engine::backend::{cpu::CpuTrainer, Backend, Images};
use inception_engine::bench::cases::{self, ConvCase};
use inception_engine::ops::{batchnorm, conv, pool, relu};
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig, Pool};
use rand::{Rng, SeedableRng};

const BATCH: usize = 2;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// The four shapes: first match of each predicate among the plan's distinct convolutions.
fn representative_convs() -> Vec<(&'static str, ConvCase)> {
    let all = cases::derive("v4", BATCH, 299).expect("v4 plan").convs;
    let pick = |label: &'static str, f: &dyn Fn(&ConvCase) -> bool| {
        let c = all.iter().find(|c| f(c)).expect("shape in v4").clone();
        (label, c)
    };
    vec![
        pick("stem_3x3_147", &|c| {
            c.shape.h == 147 && c.shape.conv.pad_top == 1
        }),
        pick("a_1x1_35", &|c| {
            c.shape.h == 35 && c.shape.conv.kh == 1 && c.shape.conv.kw == 1
        }),
        pick("b_1x7_17", &|c| c.shape.h == 17 && c.shape.conv.kw == 7),
        pick("c_1x3_8", &|c| {
            c.shape.h == 8 && c.shape.conv.kw == 3 && c.shape.conv.kh == 1
        }),
    ]
}

fn conv_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    configure(&mut g);
    for (label, case) in representative_convs() {
        let k = case.shape;
        let s = conv::ConvShape::new(k.conv, k.n, k.h, k.w);
        let x = random(k.n * k.h * k.w * k.conv.cin, 1);
        let w = random(k.conv.cout * s.k(), 2);
        let dy = random(k.n * s.oh() * s.ow() * k.conv.cout, 3);
        let mut y = vec![0f32; dy.len()];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        // Elements = FLOP, so criterion's elem/s reads as FLOP/s.
        g.throughput(Throughput::Elements(case.flop() as u64));
        g.bench_function(format!("{label}/fprop"), |b| {
            b.iter(|| conv::forward(&s, black_box(&x), &w, &mut y))
        });
        g.bench_function(format!("{label}/dgrad"), |b| {
            b.iter(|| conv::backward_data(&s, black_box(&dy), &w, &mut dx, false))
        });
        g.bench_function(format!("{label}/wgrad"), |b| {
            b.iter(|| conv::backward_weight(&s, black_box(&x), &dy, &mut dw))
        });
    }
    g.finish();
}

/// Batchnorm, pooling and ReLU over the stem's largest activation: [BATCH, 147, 147, 64].
fn memory_benches(c: &mut Criterion) {
    let (h, ch) = (147, 64);
    let len = BATCH * h * h * ch;
    let x = random(len, 4);
    let dy = random(len, 5);
    let mut y = vec![0f32; len];
    let mut dx = vec![0f32; len];
    let mut g = c.benchmark_group("memory");
    configure(&mut g);
    let gamma = vec![1.0f32; ch];
    let beta = vec![0.0f32; ch];
    let p = batchnorm::BnParams {
        gamma: &gamma,
        beta: &beta,
        eps: 1e-3,
    };
    let (mut mean, mut inv_std) = (vec![0f32; ch], vec![1f32; ch]);
    let (mut rm, mut rv) = (vec![0f32; ch], vec![1f32; ch]);
    let (mut dgamma, mut dbeta) = (vec![0f32; ch], vec![0f32; ch]);
    let f32s = |n: usize| Throughput::Bytes((n * 4) as u64);
    g.throughput(f32s(2 * len));
    g.bench_function("batchnorm_147x147x64/fwd", |b| {
        b.iter(|| {
            batchnorm::forward_train(
                black_box(&x),
                &p,
                0.1,
                ch,
                &mut y,
                &mut mean,
                &mut inv_std,
                &mut rm,
                &mut rv,
            )
        })
    });
    g.throughput(f32s(3 * len));
    g.bench_function("batchnorm_147x147x64/bwd", |b| {
        b.iter(|| {
            batchnorm::backward(
                black_box(&x),
                &dy,
                &gamma,
                &mean,
                &inv_std,
                ch,
                &mut dx,
                &mut dgamma,
                &mut dbeta,
                false,
            )
        })
    });
    // Mixed_3a's max pool and a padded 3x3/1 average pool, as in the Inception blocks.
    for (name, max, pl) in [
        (
            "maxpool_3x3s2",
            true,
            Pool {
                k: 3,
                stride: 2,
                pad: 0,
            },
        ),
        (
            "avgpool_3x3s1p1",
            false,
            Pool {
                k: 3,
                stride: 1,
                pad: 1,
            },
        ),
    ] {
        let s = pool::PoolShape::new(pl, BATCH, h, h, ch);
        let out = BATCH * s.oh() * s.ow() * ch;
        let mut py = vec![0f32; out];
        let pdy = random(out, 6);
        g.throughput(f32s(len + out));
        g.bench_function(format!("{name}/fwd"), |b| {
            b.iter(|| {
                if max {
                    pool::max_forward(&s, black_box(&x), &mut py)
                } else {
                    pool::avg_forward(&s, black_box(&x), &mut py)
                }
            })
        });
        // Backward: read dy, write dx; the max pool also reads x to find each maximum again.
        g.throughput(f32s(out + len + if max { len } else { 0 }));
        g.bench_function(format!("{name}/bwd"), |b| {
            b.iter(|| {
                if max {
                    pool::max_backward(&s, black_box(&x), &pdy, &mut dx, false)
                } else {
                    pool::avg_backward(&s, black_box(&pdy), &mut dx, false)
                }
            })
        });
    }
    g.throughput(f32s(2 * len));
    g.bench_function("relu_147x147x64/fwd", |b| {
        b.iter(|| relu::forward(black_box(&x), &mut y))
    });
    g.throughput(f32s(3 * len));
    g.bench_function("relu_147x147x64/bwd", |b| {
        b.iter(|| relu::backward(black_box(&y), &dy, &mut dx, false))
    });
    g.finish();
}

/// One forward + backward + RMSProp step of the `tiny` plan on synthetic data.
fn train_step_bench(c: &mut Criterion) {
    let (batch, size) = (16, 32);
    let cfg = PlanConfig {
        batch,
        image_size: size,
        num_classes: 10,
        ..PlanConfig::default()
    };
    let plan = plan::build("tiny", cfg).expect("tiny plan");
    let images = random(plan.tensor(plan.input).numel(), 7);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let model = ModelState::init(&plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CpuTrainer::new(plan, model, optim).expect("trainer");
    let mut scaler = LossScaler::None;
    let mut step = 0u64;
    let mut g = c.benchmark_group("train");
    configure(&mut g);
    g.throughput(Throughput::Elements(batch as u64));
    g.bench_function(format!("tiny_b{batch}_{size}px/step"), |b| {
        b.iter(|| {
            step += 1;
            trainer
                .train_step(Images::F32(&images), &labels, step, 1e-4, &mut scaler)
                .expect("train step")
        })
    });
    g.finish();
}

criterion_group!(benches, conv_benches, memory_benches, train_step_bench);
criterion_main!(benches);
