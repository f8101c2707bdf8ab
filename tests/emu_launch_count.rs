//! The host-side launch count of a CUDA training step ([`Call::kernel_launches`] summed over the
//! step's calls, the figure quoted for v4) against the launches the launchers really queue, on
//! the emulated GPU. In-process (it sets the driver variable before the first CUDA call), so it
//! has a test binary of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{Amp, Backend};
use inception_engine::gpu::device::launches_queued;
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};

#[test]
fn a_training_step_queues_the_launches_its_calls_count() {
    if !emu_env::nvrtc_available("the launch count on the emulated GPU") {
        return;
    }
    // SAFETY of the environment change: this binary runs one test, before any CUDA call.
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
    let model = ModelState::init(&plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CudaTrainer::new(plan.clone(), model, optim, Amp::O2).unwrap();
    let images: Vec<f32> = (0..plan.tensor(plan.input).numel())
        .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    let mut scaler = LossScaler::for_amp(Amp::O2);
    for step in 0..2 {
        let before = launches_queued();
        trainer
            .train_step(&images, &[3, 7], step, 0.01, &mut scaler)
            .unwrap();
        let queued = (launches_queued() - before) as usize;
        assert_eq!(Some(queued), trainer.launches_per_step(), "step {step}");
    }
    trainer.settle(&mut scaler).unwrap();
}
