//! The host-side launch count of a CUDA training step ([`Call::kernel_launches`] summed over the
//! step's calls, the figure quoted for v4) against the launches the launchers really queue, on
//! the emulated GPU: with the lean kernel paths launched call by call (a u8 batch, normalised on
//! the device, and an f32 one), replayed from a CUDA graph, and with the baseline paths (the leaner convolutions and batchnorm run in the lean
//! step only).
//! In-process (it sets the driver variable before the first CUDA call), so it has a test binary
//! of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{Amp, Backend, Images};
use inception_engine::data::Normalization;
use inception_engine::gpu::device::{launches_matching, launches_queued};
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};

/// What three training steps on a fresh trainer under kernel paths `spec` queued.
struct Steps {
    /// Launches queued by each step.
    queued: Vec<usize>,
    /// What the trainer says a step runs.
    per_step: usize,
    /// Launches of the entry points containing each of the parts, in the first step.
    parts: Vec<u64>,
}

fn three_steps(spec: &str, plan: &plan::Plan, parts: &[&str]) -> Steps {
    // SAFETY of the environment change: this binary runs one test, on one thread, and the
    // change comes before the device that reads it opens.
    std::env::set_var("INCEPTION_KERNELS", spec);
    let model = ModelState::init(plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CudaTrainer::new(plan.clone(), model, optim, Amp::O2).unwrap();
    let pixels: Vec<u8> = (0..plan.tensor(plan.input).numel())
        .map(|i| ((i * 7919) % 255) as u8)
        .collect();
    let images = Images::U8 {
        pixels: &pixels,
        norm: Normalization::IMAGENET.factors(),
    };
    let mut scaler = LossScaler::for_amp(Amp::O2);
    let (mut queued, mut first_parts) = (Vec::new(), Vec::new());
    for step in 0..3 {
        let before = launches_queued();
        let parts_before: Vec<u64> = parts.iter().map(|p| launches_matching(p)).collect();
        trainer
            .train_step(images, &[3, 7], step, 0.01, &mut scaler)
            .unwrap();
        queued.push((launches_queued() - before) as usize);
        if step == 0 {
            first_parts = parts
                .iter()
                .zip(parts_before)
                .map(|(p, b)| launches_matching(p) - b)
                .collect();
        }
    }
    trainer.settle(&mut scaler).unwrap();
    std::env::remove_var("INCEPTION_KERNELS");
    Steps {
        queued,
        per_step: trainer.launches_per_step().unwrap(),
        parts: first_parts,
    }
}

#[test]
fn a_training_step_queues_the_launches_its_calls_count() {
    if !emu_env::nvrtc_available("the launch count on the emulated GPU") {
        return;
    }
    // SAFETY of the environment changes: as in `three_steps`.
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
    // The leaner convolutions run in the lean step (tiny has two strided data gradients, a stem
    // and 8-channel layers), the baseline's step runs none of them.
    let lean_parts = [
        "conv_dgrad_phase_tc",
        "conv_wgrad_reduce_drop_f32",
        "_tc_128x32",
    ];
    // Call by call: every step queues every kernel.
    let calls = three_steps("lean,-graph", &plan, &lean_parts);
    assert_eq!(calls.queued, vec![calls.per_step; 3]);
    // The u8 batch's normalisation is one launch (the baseline normalises on the host).
    let f32_input = three_steps("lean,-graph,-u8_input", &plan, &lean_parts);
    assert_eq!(f32_input.queued, vec![f32_input.per_step; 3]);
    assert_eq!(calls.per_step, f32_input.per_step + 1);
    assert_eq!(calls.parts[..2], [2, 1], "{:?}", calls.parts);
    assert!(calls.parts[2] > 0, "{:?}", calls.parts);
    let baseline = three_steps("baseline", &plan, &lean_parts);
    assert_eq!(baseline.queued, vec![baseline.per_step; 3]);
    assert_eq!(baseline.parts, [0, 0, 0]);
    // tiny's BN layers take the vectorised kernels where their channels allow (2 launches a
    // call instead of 3) and fall back elsewhere.
    assert!(
        calls.per_step < baseline.per_step,
        "lean {} baseline {}",
        calls.per_step,
        baseline.per_step
    );
    // From a graph: the first step captures every kernel and writes its step values; later
    // steps queue only that write and the batch's normalisation (outside the graph, as the u8
    // image it reads alternates), and the graph runs the rest.
    let graph = three_steps("lean", &plan, &lean_parts);
    assert_eq!(graph.per_step, calls.per_step + 1);
    assert_eq!(graph.queued, vec![graph.per_step, 2, 2]);
    assert_eq!(graph.parts, calls.parts);
}
