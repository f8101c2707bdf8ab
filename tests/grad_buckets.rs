//! The NCCL gradient buckets of a training step, on the host (no GPU): built from the calls the
//! trainer launches, for the tiny plan and v4, and proven by `check_buckets`; a schedule that
//! reduces a bucket one call too early, or leaves an element out, is caught.

use inception_engine::backend::cuda::buckets::{
    bucket_elems, check_buckets, grad_operands, plan_buckets, BucketPlan, DEFAULT_BUCKET_MIB,
};
use inception_engine::backend::cuda::calls::Calls;
use inception_engine::backend::cuda::layout::{Ptrs, StepArgs, StepLayout, REPORT_SCALE};
use inception_engine::backend::cuda::program::Stage;
use inception_engine::backend::Amp;
use inception_engine::gpu::KernelPaths;
use inception_engine::ops::softmax_ce::cuda::ScaleArg;
use inception_engine::optim::RmsPropConfig;
use inception_engine::plan::{self, PlanConfig};

const GRADS: u64 = 3 << 40;

/// A training step's calls at fake buffer addresses (the gradients at [`GRADS`]), with the
/// device loss scaler (so the overflow check is the first reader of the gradients).
fn step_calls(name: &str, batch: usize, size: usize, classes: usize) -> (StepLayout, Calls) {
    let config = PlanConfig {
        batch,
        image_size: size,
        num_classes: classes,
        ..PlanConfig::default()
    };
    let plan = plan::build(name, config).unwrap();
    let optim = RmsPropConfig::default();
    let paths = KernelPaths::LEAN;
    let (mut step, _) = StepLayout::new(plan, Amp::O2, true, 132, optim, paths).unwrap();
    let base = |i: u64| i << 40;
    step.ptr = Ptrs {
        arena: base(1),
        master: base(2),
        w16: base(4),
        grads: GRADS,
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
    let args = StepArgs {
        train: true,
        step: 1,
        lr: 0.01,
        scale: ScaleArg::Device(step.report_word(REPORT_SCALE)),
        growth: Some(2000),
        on_device: true,
    };
    let calls = step.program_calls(true, args).unwrap();
    (step, calls)
}

/// The index of the last backward call, and of the first call after the backward pass.
fn backward_end(calls: &Calls) -> (usize, usize) {
    let first_after = calls
        .iter()
        .position(|(s, _)| matches!(s, Stage::OverflowCheck | Stage::Update))
        .unwrap();
    (first_after - 1, first_after)
}

#[test]
fn v4_buckets_cover_every_gradient_once_and_follow_their_last_write() {
    let (step, calls) = step_calls("v4", 2, 75, 1000);
    let len = step.params.len;
    let target = bucket_elems(DEFAULT_BUCKET_MIB as f64);
    let plan = plan_buckets(&calls, GRADS, len, target).unwrap();
    check_buckets(&calls, GRADS, len, &plan).unwrap();
    // 42,679,816 gradients (plus slot padding) in 25 MiB buckets, each at least the target
    // but the last launched (the stem's end of the buffer).
    assert!(len >= 42_679_816, "{len}");
    let n = plan.buckets.len();
    for b in &plan.buckets {
        eprintln!(
            "v4 bucket: elements {:?} ({:.1} MiB) after call {} of {} ({:?})",
            b.range(),
            b.len as f64 * 4.0 / 1048576.0,
            b.after,
            calls.len(),
            calls[b.after].0
        );
    }
    assert!((len / target..=len / target + 1).contains(&n), "{plan:?}");
    assert!(plan.buckets[..n - 1].iter().all(|b| b.len >= target));
    // The first bucket holds the classifier's gradients, written first: it is triggered in
    // the first fifth of the backward pass, while the last waits for the stem's.
    let (last_backward, wait) = backward_end(&calls);
    let first_backward = calls
        .iter()
        .position(|(s, _)| matches!(s, Stage::Backward { .. }))
        .unwrap();
    let span = last_backward - first_backward;
    assert!(
        plan.buckets[0].after - first_backward < span / 5,
        "{plan:?}"
    );
    assert_eq!(plan.buckets[0].start + plan.buckets[0].len, len);
    assert_eq!(plan.buckets[n - 1].start, 0);
    assert_eq!(plan.wait_before, wait);
}

#[test]
fn tiny_buckets_hold_whole_tensors_and_each_one_waits_for_its_writer() {
    let (step, calls) = step_calls("tiny", 2, 32, 10);
    let len = step.params.len;
    // Small buckets, so the tiny plan has many.
    let plan = plan_buckets(&calls, GRADS, len, 256).unwrap();
    assert!(plan.buckets.len() > 4, "{plan:?}");
    // No tensor is split: every gradient operand lies inside one bucket.
    for (_, call) in &calls {
        for (ptr, n) in grad_operands(call) {
            let start = ((ptr - GRADS) / 4) as usize;
            let holders = plan
                .buckets
                .iter()
                .filter(|b| b.start < start + n && start < b.start + b.len)
                .count();
            assert_eq!(holders, 1, "gradient at element {start} split over buckets");
        }
    }
    // Each bucket's trigger is a call that writes into it.
    for b in &plan.buckets {
        let writes_into = grad_operands(&calls[b.after].1).iter().any(|&(ptr, n)| {
            let s = ((ptr - GRADS) / 4) as usize;
            s < b.start + b.len && b.start < s + n
        });
        assert!(
            writes_into,
            "bucket {b:?} is triggered by a call that does not write it"
        );
    }
    // One bucket as large as the buffer: the whole buffer, after the last gradient write.
    let whole = plan_buckets(&calls, GRADS, len, len).unwrap();
    assert_eq!(whole.buckets.len(), 1);
    assert_eq!((whole.buckets[0].start, whole.buckets[0].len), (0, len));
}

#[test]
fn a_trigger_one_call_early_a_lost_element_and_an_early_reader_are_caught() {
    let (step, calls) = step_calls("tiny", 2, 32, 10);
    let len = step.params.len;
    let good = plan_buckets(&calls, GRADS, len, 256).unwrap();
    for k in 0..good.buckets.len() {
        let mut early: BucketPlan = good.clone();
        early.buckets[k].after -= 1;
        let e = check_buckets(&calls, GRADS, len, &early).unwrap_err();
        assert!(e.to_string().contains("writes elements"), "bucket {k}: {e}");
    }
    let mut lost = good.clone();
    lost.buckets[0].len -= 1;
    let e = check_buckets(&calls, GRADS, len, &lost).unwrap_err();
    assert!(e.to_string().contains("in no bucket"), "{e}");
    let mut late_wait = good.clone();
    late_wait.wait_before += 1;
    let e = check_buckets(&calls, GRADS, len, &late_wait).unwrap_err();
    assert!(e.to_string().contains("first read by call"), "{e}");
    let mut swapped = good;
    swapped.buckets.swap(0, 1);
    let e = check_buckets(&calls, GRADS, len, &swapped).unwrap_err();
    assert!(e.to_string().contains("launch order"), "{e}");
}

#[test]
fn a_gradient_outside_the_buffer_is_an_error() {
    let (step, calls) = step_calls("tiny", 2, 32, 10);
    let e = plan_buckets(&calls, GRADS, step.params.len / 2, 256).unwrap_err();
    assert!(e.to_string().contains("outside the gradient buffer"), "{e}");
    let e = plan_buckets(&calls, GRADS, step.params.len, 0).unwrap_err();
    assert!(e.to_string().contains("at least one element"), "{e}");
}
