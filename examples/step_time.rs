use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::plan::{build, PlanConfig};
use std::time::Instant;
fn main() {
    let cfg = PlanConfig {
        batch: 16,
        image_size: 96,
        ..Default::default()
    };
    let mut exec = CpuExecutor::new(build("v4", cfg).unwrap());
    let params: Vec<f32> = (0..exec.param_len())
        .map(|i| ((i % 97) as f32 - 48.0) * 0.001)
        .collect();
    let mut states = vec![1.0; exec.state_len()];
    let images: Vec<f32> = (0..16 * 96 * 96 * 3)
        .map(|i| ((i % 13) as f32) * 0.1)
        .collect();
    let labels: Vec<u32> = (0..16).collect();
    let mut grads = vec![0.0; params.len()];
    for s in 0..8 {
        let t = Instant::now();
        exec.forward(&params, &mut states, &images, &labels, Mode::Train, s);
        let f = t.elapsed();
        exec.backward(&params, &mut grads, 1.0);
        println!(
            "fwd {:?} total {:?} -> {:.1} img/s",
            f,
            t.elapsed(),
            16.0 / t.elapsed().as_secs_f64()
        );
    }
}
