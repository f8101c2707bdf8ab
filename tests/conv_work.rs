//! The host-side count of what a CUDA training step's convolutions issue (src/backend/cuda/work.rs)
//! on the step bench train measures: InceptionV4, batch 128, 299x299, O2 with dynamic loss
//! scaling, 132 SMs, every shape verified. Each leaner-step change is compared with the baseline
//! alone and all together. Counts only: nothing is timed here (run with `--nocapture` for the table).

use inception_engine::backend::cuda::calls::{Call, Calls};
use inception_engine::backend::cuda::layout::{StepArgs, StepLayout};
use inception_engine::backend::Amp;
use inception_engine::gpu::KernelPaths;
use inception_engine::ops::conv::count::{ConvWork, MACS_PER_MMA};
use inception_engine::ops::conv::cuda::ConvTarget;
use inception_engine::ops::softmax_ce::cuda::ScaleArg;
use inception_engine::optim::RmsPropConfig;
use inception_engine::plan::{self, PlanConfig};

/// The v4 training step's layout and calls at `batch`, `size` x `size`, `amp`.
fn v4_step(batch: usize, size: usize, amp: Amp) -> (StepLayout, Calls) {
    let config = PlanConfig {
        batch,
        image_size: size,
        ..PlanConfig::default()
    };
    let plan = plan::build("v4", config).unwrap();
    let config = RmsPropConfig::default();
    let (mut step, _) = StepLayout::new(plan, amp, true, 132, config, KernelPaths::LEAN).unwrap();
    // The padded stem's buffers exist once the trainer allocates (any non-zero address will do:
    // the calls are counted, never launched).
    step.ptr.stem = step.stem.map(|_| (1 << 40, 2 << 40));
    let args = StepArgs {
        train: true,
        step: 0,
        lr: 0.01,
        scale: ScaleArg::Value(1.0),
        growth: Some(2000),
        on_device: false,
    };
    let calls = step.program_calls(true, args).unwrap();
    (step, calls)
}

fn target(paths: KernelPaths) -> ConvTarget {
    ConvTarget {
        amp: Amp::O2,
        num_sms: 132,
        paths,
    }
}

fn with(name: &str) -> KernelPaths {
    KernelPaths::parse(&format!("baseline,+{name}")).unwrap()
}

fn line(label: &str, w: &ConvWork) -> String {
    format!(
        "{label:<28} {:>16} MMAs {:>10.2} TMAC issued on tensor cores {:>8.3} TMAC plain {:>8.3} TMAC useful  {:>5.1}% useful",
        w.mmas,
        w.tc_macs() as f64 / 1e12,
        w.plain_macs as f64 / 1e12,
        w.useful_macs as f64 / 1e12,
        100.0 * w.useful_fraction()
    )
}

#[test]
fn a_v4_step_issues_fewer_mmas_with_each_change() {
    let (step, calls) = v4_step(128, 299, Amp::O2);
    let base = step.conv_work_per_call(&calls, &target(KernelPaths::BASELINE));
    let total = |w: &[ConvWork]| w.iter().copied().sum::<ConvWork>();
    let baseline = total(&base);
    // Every convolution runs fprop, wgrad and (all but the stem, whose input has no gradient)
    // dgrad; the classifier its three GEMMs. 12,253,974,624 conv + FC MACs per image, of which
    // the stem is 19,181,664.
    let per_image: u64 = 3 * 12_253_974_624 - 19_181_664;
    assert_eq!(baseline.useful_macs, 128 * per_image);
    // Before: only the 3-channel stem's weight gradient runs on the plain kernel.
    assert_eq!(baseline.plain_macs, 128 * 19_181_664);
    eprintln!("{}", line("baseline (whole step)", &baseline));
    let mut previous_best = baseline.mmas;
    for name in ["dgrad_phase", "stem_wgrad_tc", "narrow_tiles"] {
        let after = step.conv_work_per_call(&calls, &target(with(name)));
        // The calls the change touches, before and after.
        let touched: Vec<usize> = (0..calls.len()).filter(|&i| base[i] != after[i]).collect();
        let pick = |w: &[ConvWork]| touched.iter().map(|&i| w[i]).sum::<ConvWork>();
        let (b, a) = (pick(&base), pick(&after));
        eprintln!("{name}: {} calls", touched.len());
        eprintln!("{}", line("  before (those calls)", &b));
        eprintln!("{}", line("  after", &a));
        eprintln!("{}", line("  whole step after", &total(&after)));
        assert!(!touched.is_empty(), "{name} changes nothing");
        assert_eq!(a.useful_macs, b.useful_macs, "{name}: same convolutions");
        previous_best = previous_best.min(total(&after).mmas);
        match name {
            // The stride-2 data gradients: about a quarter of the taps were useful, now nearly
            // all (tile edges aside).
            "dgrad_phase" => {
                assert_eq!(touched.len(), 6, "the six strided dgrads");
                assert!(b.useful_fraction() < 0.3 && a.useful_fraction() > 0.8);
                assert!(a.mmas < b.mmas);
            }
            // The stem's weight gradient leaves the plain kernel (CUDA-core FMAs with an integer
            // division per pixel) for the tensor cores, which issue more multiply-adds than it
            // needs (8 channels for 3, a 64-wide tile over 72 columns and 32 rows), but as MMAs.
            "stem_wgrad_tc" => {
                assert_eq!((b.mmas, a.plain_macs), (0, 0));
                assert_eq!(b.plain_macs, b.useful_macs);
                assert_eq!(touched.len(), 1);
            }
            // 32-wide GEMMs stop paying for 64-wide tiles.
            _ => assert!(a.mmas < b.mmas && a.useful_fraction() > b.useful_fraction()),
        }
    }
    let lean = total(&step.conv_work_per_call(&calls, &target(KernelPaths::LEAN)));
    eprintln!("{}", line("lean (whole step)", &lean));
    assert_eq!(lean.plain_macs, 0);
    assert_eq!(lean.useful_macs, baseline.useful_macs);
    assert!(lean.mmas < previous_best);
    assert!(lean.tc_macs() >= lean.useful_macs && MACS_PER_MMA == 2048);
}

/// The stem's weight gradient is handed the padded input at O2 and O3, never at O0 (where the
/// stem is not padded and every convolution runs on the plain kernels).
#[test]
fn only_the_padded_stem_wgrad_gets_the_padded_input() {
    for amp in [Amp::O2, Amp::O3, Amp::O0] {
        let (step, calls) = v4_step(2, 75, amp);
        let padded: Vec<&Call> = calls
            .iter()
            .map(|(_, c)| c)
            .filter(|c| matches!(c, Call::ConvWgrad(w) if w.x_padded.is_some()))
            .collect();
        if amp == Amp::O0 {
            assert!(padded.is_empty() && step.ptr.stem.is_none());
            continue;
        }
        assert_eq!(padded.len(), 1, "{amp:?}");
        let Call::ConvWgrad(w) = padded[0] else {
            unreachable!()
        };
        assert_eq!((w.s.conv.cin, w.s.h), (3, 75));
        assert_eq!(w.x_padded, step.ptr.stem.map(|(x, _)| x));
    }
}
