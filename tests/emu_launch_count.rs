//! The host-side launch count of a CUDA training step ([`Call::kernel_launches`] summed over the
//! step's calls, the figure quoted for v4) against the launches the launchers really queue, on
//! the emulated GPU, with the lean kernel paths and the baseline ones (the leaner convolutions
//! run in the lean step only). In-process (it sets the driver variable before the first CUDA call), so it
//! has a test binary of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{Amp, Backend};
use inception_engine::gpu::device::{launches_matching, launches_queued};
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};

/// One training step of `plan` on a fresh trainer (its device reads `INCEPTION_KERNELS` now):
/// the launches its calls count must be the launches queued, step after step. Returns the
/// launches per step queued of entry points containing each of `parts`.
fn step_launches(plan: &plan::Plan, parts: &[&str]) -> Vec<u64> {
    let model = ModelState::init(plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CudaTrainer::new(plan.clone(), model, optim, Amp::O2).unwrap();
    let images: Vec<f32> = (0..plan.tensor(plan.input).numel())
        .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    let mut scaler = LossScaler::for_amp(Amp::O2);
    let mut per_step = vec![0; parts.len()];
    for step in 0..2 {
        let before = launches_queued();
        let parts_before: Vec<u64> = parts.iter().map(|p| launches_matching(p)).collect();
        trainer
            .train_step(&images, &[3, 7], step, 0.01, &mut scaler)
            .unwrap();
        let queued = (launches_queued() - before) as usize;
        assert_eq!(Some(queued), trainer.launches_per_step(), "step {step}");
        for (i, p) in parts.iter().enumerate() {
            per_step[i] = launches_matching(p) - parts_before[i];
        }
    }
    trainer.settle(&mut scaler).unwrap();
    per_step
}

#[test]
fn a_training_step_queues_the_launches_its_calls_count() {
    if !emu_env::nvrtc_available("the launch count on the emulated GPU") {
        return;
    }
    // SAFETY of the environment changes: this binary runs one test, and each change comes before
    // the CUDA call that reads it (the driver before the first, the paths before a device opens).
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    let config = PlanConfig {
        batch: 2,
        image_size: 32,
        num_classes: 10,
        ..PlanConfig::default()
    };
    let plan = plan::build("tiny", config).unwrap();
    // The leaner convolutions run in the step (tiny has two strided data gradients, a stem and
    // 8-channel layers), the baseline's step runs none of them, with the same launch count.
    let lean_parts = [
        "conv_dgrad_phase_tc",
        "conv_wgrad_reduce_drop_f32",
        "_tc_128x32",
    ];
    std::env::set_var("INCEPTION_KERNELS", "lean");
    let lean = step_launches(&plan, &lean_parts);
    assert_eq!(lean[..2], [2, 1], "{lean:?}");
    assert!(lean[2] > 0, "{lean:?}");
    std::env::set_var("INCEPTION_KERNELS", "baseline");
    assert_eq!(step_launches(&plan, &lean_parts), [0, 0, 0]);
    std::env::remove_var("INCEPTION_KERNELS");
}
