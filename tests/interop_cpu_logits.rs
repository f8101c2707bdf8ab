//! A tool for `tools/timm_check.py`, run as an ignored test so it needs no binary of its own:
//! the engine's CPU logits of a checkpoint on real images, and the exact inputs it used.
//!
//! ```text
//! INTEROP_CKPT=ck.safetensors INTEROP_OUT=dir [INTEROP_N=8] \
//!   cargo test --release --test interop_cpu_logits -- --ignored
//! ```
//! writes `dir/input.f32` (normalised NCHW float32, `[n, 3, s, s]` at the checkpoint's image
//! size) and `dir/logits.f32` (`[n, classes]`), little-endian, and `dir/shape.txt` (`n s k`).

use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::checkpoint::Checkpoint;
use inception_engine::data::{bundled_dataset, transform::eval_transform, Dataset, Normalization};
use inception_engine::export::model_from_checkpoint;
use std::path::PathBuf;

const IMAGENET: Normalization = Normalization::IMAGENET;

fn write_f32(path: PathBuf, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
#[ignore = "a tool for tools/timm_check.py, driven by environment variables"]
fn cpu_logits_for_timm_check() {
    let ckpt = Checkpoint::load(std::env::var("INTEROP_CKPT").unwrap()).unwrap();
    let out = PathBuf::from(std::env::var("INTEROP_OUT").unwrap());
    let n: usize = std::env::var("INTEROP_N").map_or(8, |v| v.parse().unwrap());
    let (plan, model) = model_from_checkpoint(&ckpt, n).unwrap();
    let (s, k) = (plan.config.image_size, plan.config.num_classes);
    let ds = Dataset::open(&bundled_dataset().unwrap().join("val")).unwrap();
    let stride = ds.len() / n;
    let images: Vec<f32> = (0..n)
        .flat_map(|i| eval_transform(&ds.read(i * stride).unwrap(), s, &IMAGENET))
        .collect();
    let mut states = model.states.clone();
    let mut cpu = CpuExecutor::new(plan);
    cpu.forward(
        &model.params,
        &mut states,
        &images,
        &vec![0; n],
        Mode::Eval,
        0,
    );
    let mut nchw = vec![0.0; images.len()];
    for (i, v) in images.iter().enumerate() {
        let (b, p, c) = (i / (s * s * 3), (i / 3) % (s * s), i % 3);
        nchw[(b * 3 + c) * s * s + p] = *v;
    }
    write_f32(out.join("input.f32"), &nchw);
    write_f32(out.join("logits.f32"), cpu.logits());
    std::fs::write(out.join("shape.txt"), format!("{n} {s} {k}")).unwrap();
}
