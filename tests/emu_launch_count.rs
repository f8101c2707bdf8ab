//! The host-side launch count of a CUDA training step ([`Call::kernel_launches`] summed over the
//! step's calls, the figure quoted for v4) against the launches the launchers really queue, on
//! the emulated GPU, with the step launched call by call and replayed from a CUDA graph. In-process
//! (it sets the driver variable before the first CUDA call), so it has a test binary of its own.

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

/// Launches queued by each of three training steps of `tiny`, and what the trainer says a step
/// runs, under the kernel paths `spec`.
fn queued_per_step(spec: &str) -> (Vec<usize>, Option<usize>) {
    // SAFETY of the environment change: this binary runs one test, on one thread.
    std::env::set_var("INCEPTION_KERNELS", spec);
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
    let mut queued = Vec::new();
    for step in 0..3 {
        let before = launches_queued();
        trainer
            .train_step(&images, &[3, 7], step, 0.01, &mut scaler)
            .unwrap();
        queued.push((launches_queued() - before) as usize);
    }
    trainer.settle(&mut scaler).unwrap();
    (queued, trainer.launches_per_step())
}

#[test]
fn a_training_step_queues_the_launches_its_calls_count() {
    if !emu_env::nvrtc_available("the launch count on the emulated GPU") {
        return;
    }
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    // Call by call: every step queues every kernel.
    let (queued, per_step) = queued_per_step("lean,-graph");
    let per_step = per_step.unwrap();
    assert_eq!(queued, vec![per_step; 3]);
    // From a graph: the first step captures every kernel and writes its step values; later
    // steps queue only that write, and the graph runs the rest.
    let (queued, graph_per_step) = queued_per_step("lean");
    assert_eq!(graph_per_step, Some(per_step + 1));
    assert_eq!(queued, vec![per_step + 1, 1, 1]);
}
