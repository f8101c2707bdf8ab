//! The host-side figures of the leaner step's batchnorm and max-pool changes, without a GPU:
//! a v4 training step's kernel launches and the bytes BN and the window pools move by the
//! launchers' model (`StepFigures`, the figures `bench train` prints), on each path. Nothing is
//! timed here.

use inception_engine::backend::cuda::calls::Call;
use inception_engine::backend::cuda::figures::StepFigures;
use inception_engine::backend::cuda::layout::{Ptrs, StepArgs, StepLayout};
use inception_engine::backend::Amp;
use inception_engine::gpu::KernelPaths;
use inception_engine::ops::softmax_ce::cuda::ScaleArg;
use inception_engine::optim::RmsPropConfig;
use inception_engine::plan::{self, Op, PlanConfig};

/// A v4 training layout at batch 128, 299x299, O2, with every buffer at a distinct aligned fake
/// base (the calls' alignment decides the BN path).
fn v4_layout(paths: KernelPaths) -> StepLayout {
    let config = PlanConfig {
        batch: 128,
        image_size: 299,
        ..PlanConfig::default()
    };
    let plan = plan::build("v4", config).unwrap();
    let optim = RmsPropConfig::default();
    let (mut step, _) = StepLayout::new(plan, Amp::O2, true, 132, optim, paths).unwrap();
    let base = |i: u64| i << 40;
    step.ptr = Ptrs {
        arena: base(1),
        master: base(2),
        w16: base(3),
        grads: base(4),
        ms: base(5),
        mom: base(6),
        decay: base(7),
        states: base(8),
        ws: base(9),
        images: base(10),
        labels: base(11),
        row_loss: base(12),
        report: base(13),
        stem: step.stem.map(|_| (base(14), base(15))),
    };
    step
}

/// The host-side figures of a v4 training step at batch 128, 299x299, O2 (dynamic loss scaling,
/// as `train`), on each path of the batchnorm and max-pool changes: kernel launches, and the
/// bytes BN and the window pools move by the launchers' model. Nothing is timed. Asserts what
/// each change must do: the vectorised BN takes every v4 layer (2 launches instead of 3, each
/// way) and drops the backward's two reads of y; the argmax replaces the max-pool backward's read
/// of x (2 bytes per input) by one byte per output, written by the forward.
#[test]
fn v4_step_figures_on_each_path() {
    let figures = |paths: KernelPaths| {
        let step = v4_layout(paths);
        let args = StepArgs {
            train: true,
            step: 0,
            lr: 0.01,
            scale: ScaleArg::Device(step.report_word(3)),
            growth: Some(2000),
            on_device: paths.graph,
        };
        let calls = step.program_calls(true, args).unwrap();
        let bn_layers = calls
            .iter()
            .filter(|(_, c)| matches!(c, Call::BnForwardTrain(_)))
            .count();
        (StepFigures::of(&calls, &step), bn_layers)
    };
    let base = KernelPaths::BASELINE;
    let (before, bn_layers) = figures(base);
    let (bn, _) = figures(KernelPaths {
        bn_vec: true,
        ..base
    });
    let (pool, _) = figures(KernelPaths {
        pool_argmax: true,
        ..base
    });
    let (both, _) = figures(KernelPaths {
        bn_vec: true,
        pool_argmax: true,
        ..base
    });
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (name, f) in [
        ("baseline", before),
        ("+bn_vec", bn),
        ("+pool_argmax", pool),
        ("+both", both),
    ] {
        eprintln!(
            "v4 b128 299 O2 {name:>13}: {} launches; BN read {:.0} + written {:.0} MiB; pools read {:.0} + written {:.0} MiB",
            f.launches,
            mib(f.bn.read),
            mib(f.bn.written),
            mib(f.pool.read),
            mib(f.pool.written)
        );
    }
    assert_eq!(bn_layers, 149, "one BN per convolution");
    assert_eq!(before.launches - bn.launches, 2 * bn_layers);
    assert_eq!(pool.launches, before.launches);
    // BN: same forward bytes; the backward reads y twice fewer (every v4 BN has its ReLU) and
    // gamma and beta (fp32) once more, for the mask.
    let (activations, channels) = bn_sizes();
    let y_reads = 2 * 2 * 128 * activations;
    assert_eq!(before.bn.read - bn.bn.read, y_reads - 2 * 4 * channels);
    assert_eq!(before.bn.written, bn.bn.written);
    assert_eq!(before.pool, bn.pool);
    // Pools: the backward reads the argmax instead of x; the forward writes it.
    assert!(pool.pool.total() < before.pool.total());
    assert!(pool.pool.written > before.pool.written);
    assert_eq!(pool.bn, before.bn);
    assert_eq!(both.bn, bn.bn);
    assert_eq!(both.pool, pool.pool);
    assert_eq!(both.launches, bn.launches);
}

/// The batch's upload on each path of the u8 change: 4 bytes a value as f32, 1 as u8 (labels
/// 4 bytes each either way), and one more launch for the device normalisation.
#[test]
fn v4_upload_bytes_on_each_path() {
    let figures = |paths: KernelPaths| {
        let step = v4_layout(paths);
        let args = StepArgs {
            train: true,
            step: 0,
            lr: 0.01,
            scale: ScaleArg::Device(step.report_word(3)),
            growth: Some(2000),
            on_device: paths.graph,
        };
        StepFigures::of(&step.program_calls(true, args).unwrap(), &step)
    };
    let base = KernelPaths::BASELINE;
    let (f32_path, u8_path) = (
        figures(base),
        figures(KernelPaths {
            u8_input: true,
            ..base
        }),
    );
    eprintln!(
        "v4 b128 299 O2 upload per step: f32 {} bytes, u8 {} bytes",
        f32_path.upload, u8_path.upload
    );
    assert_eq!(f32_path.upload, 137_320_448);
    assert_eq!(u8_path.upload, 34_330_496);
    assert_eq!(u8_path.launches, f32_path.launches + 1);
    assert_eq!((u8_path.bn, u8_path.pool), (f32_path.bn, f32_path.pool));
}

/// Elements of every BN input of v4 at 299x299 per image, and channels, summed over the layers.
fn bn_sizes() -> (u64, u64) {
    let config = PlanConfig {
        batch: 1,
        image_size: 299,
        ..PlanConfig::default()
    };
    let plan = plan::build("v4", config).unwrap();
    let bns = plan
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }));
    bns.map(|n| {
        let x = plan.tensor(n.inputs[0]);
        (x.numel() as u64, *x.shape.last().unwrap() as u64)
    })
    .fold((0, 0), |(a, b), (x, c)| (a + x, b + c))
}
