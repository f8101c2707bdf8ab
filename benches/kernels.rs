//! GPU kernel benchmarks with criterion: the same suite as `inception-engine bench kernels`
//! (src/bench), timed with CUDA events through `iter_custom`. Without a GPU it prints
//! "skipped: no GPU" and exits successfully. Criterion reports time per launch; the throughput
//! line reads as FLOP/s (elements) for convolutions and GEMMs and as bytes/s for the rest.
//!
//! `cargo bench --bench kernels -- conv/features.5` runs a subset (criterion's filter).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use inception_engine::bench::cases;
use inception_engine::bench::gpu::{Case, Gpu, Work};
use inception_engine::bench::prepare_conv::pad8;

fn kernels(c: &mut Criterion) {
    let gpu = match Gpu::open(1) {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: no GPU ({e:#})");
            return;
        }
    };
    println!("kernels on {}", gpu.describe());
    let cases = cases::derive("v4", 128, 299).expect("v4 plan");
    let mut shapes: Vec<_> = cases.convs.iter().map(|c| c.shape).collect();
    shapes.push(cases.fc_shape());
    shapes.extend(
        cases
            .convs
            .iter()
            .filter(|c| c.shape.conv.cin % 8 != 0)
            .map(|c| pad8(&c.shape)),
    );
    if let Err(e) = gpu.verify(&shapes) {
        println!("tensor-core check failed, launchers stay on the plain kernels: {e:#}");
    }
    for case in Case::all(&cases) {
        let mut prep = match gpu.prepare(&case, &cases) {
            Ok(p) => p,
            Err(e) => {
                println!("{}: not prepared: {e:#}", case.id());
                continue;
            }
        };
        let mut g = c.benchmark_group(prep.id.clone());
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(1));
        g.throughput(match prep.work {
            Work::Flop(f) => Throughput::Elements(f as u64),
            Work::Bytes(b) => Throughput::Bytes(b as u64),
        });
        for v in &mut prep.variants {
            g.bench_function(v.label.clone(), |b| {
                b.iter_custom(|iters| gpu.time_iters(iters, &mut v.run).expect("launch"))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
