//! A training step replayed from a captured CUDA graph (`KernelPaths::graph`) against the same
//! step launched call by call, on the emulated GPU: several steps with a changing learning rate
//! and dropout masks (which the graph's kernels read from device memory) must give bit-identical
//! weights, BN statistics and optimizer state, under the dynamic loss scaler and a fixed scale.
//! The batches arrive as u8: normalised on the device (`u8_input`, two device images in turn)
//! in both runs, and a third run normalising on the host and uploading f32 must match them too.
//! In-process (it sets the driver variable before the first CUDA call), so it has a test binary
//! of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{Amp, Backend, Images};
use inception_engine::data::Normalization;
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};

/// Every float the trainer holds after `steps` steps of `tiny` under the kernel paths `spec`, and
/// the step losses.
fn train(spec: &str, amp: Amp, scaler: LossScaler, steps: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
    // SAFETY of the environment change: this binary runs one test, on one thread.
    std::env::set_var("INCEPTION_KERNELS", spec);
    let config = PlanConfig {
        batch: 4,
        image_size: 32,
        num_classes: 10,
        dropout: 0.5,
        ..PlanConfig::default()
    };
    let plan = plan::build("tiny", config).unwrap();
    let model = ModelState::init(&plan, 7);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CudaTrainer::new(plan.clone(), model, optim, amp).unwrap();
    let mut scaler = scaler;
    let mut losses = Vec::new();
    for step in 0..steps {
        let pixels: Vec<u8> = (0..plan.tensor(plan.input).numel())
            .map(|i| ((i as u64 * 7919 + step * 104729) % 256) as u8)
            .collect();
        let images = Images::U8 {
            pixels: &pixels,
            norm: Normalization::IMAGENET.factors(),
        };
        let labels = [step as u32 % 10, 3, 7, (step as u32 + 5) % 10];
        // A rate that changes every step, as warmup does.
        let lr = 0.01 * (step + 1) as f32;
        let settled = trainer
            .train_step(images, &labels, step, lr, &mut scaler)
            .unwrap();
        losses.extend(settled.iter().map(|o| o.loss));
    }
    losses.extend(trainer.settle(&mut scaler).unwrap().iter().map(|o| o.loss));
    let (model, optim) = trainer.state().unwrap();
    (
        vec![model.params, model.states, optim.ms, optim.mom],
        losses,
    )
}

#[test]
fn a_step_replayed_from_a_graph_equals_the_step_launched_call_by_call() {
    if !emu_env::nvrtc_available("the CUDA graph replay on the emulated GPU") {
        return;
    }
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    let cases = [
        (Amp::O2, LossScaler::for_amp(Amp::O2)),
        (Amp::O0, LossScaler::Fixed(128.0)),
    ];
    for (amp, scaler) in cases {
        let (calls, calls_losses) = train("lean,-graph", amp, scaler, 4);
        let (graph, graph_losses) = train("lean", amp, scaler, 4);
        // The batches normalised on the host and uploaded as f32: the device's normalisation
        // (two buffers used in turn, uploaded on the copy stream) must give the same bits.
        let (host, host_losses) = train("lean,-u8_input", amp, scaler, 4);
        assert_eq!(calls_losses.len(), 4, "{amp:?}: every step settles");
        assert_eq!(graph_losses, calls_losses, "{amp:?}: step losses");
        assert_eq!(
            host_losses, calls_losses,
            "{amp:?}: step losses, f32 upload"
        );
        let names = ["weights", "BN statistics", "ms", "mom"];
        for (other, what) in [(&graph, "the graph"), (&host, "the f32 upload")] {
            for ((a, b), name) in calls.iter().zip(other).zip(names) {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{amp:?}: {name} differ between {what} and the calls");
            }
        }
    }
}
