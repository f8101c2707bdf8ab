//! The kernel benchmark's convolution rows that a GPU visit times differently under the lean and
//! the baseline kernel paths (`bench kernels --kernels baseline --kernels lean`), run once on the
//! emulated GPU (v4 at batch 1, 75x75): every such case prepares and launches under both paths,
//! on the lean implementation under `lean` and on the one the step ran before under `baseline`.
//! The timings are the emulator's and mean nothing; the labels are checked. In-process (it sets
//! the driver variable before the first CUDA call), so a test binary of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::bench::cases;
use inception_engine::bench::gpu::{lean_differs, Case, Gpu};
use inception_engine::bench::measure;
use inception_engine::bench::prepare_conv::pad8;
use inception_engine::gpu::KernelPaths;
use inception_engine::ops::conv::cuda::ConvMode;

#[test]
fn the_conv_cases_the_lean_paths_change_run_under_both_paths() {
    if !emu_env::nvrtc_available("the benchmark's conv rows on the emulated GPU") {
        return;
    }
    // SAFETY of the environment change: this binary runs one test, before any CUDA call.
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    let cases = cases::derive("v4", 1, 75).unwrap();
    // The cases a leaner-step change affects, with the shape they run.
    let picked: Vec<(Case, _)> = Case::all(&cases)
        .into_iter()
        .filter_map(|case| {
            let (shape, mode) = match &case {
                Case::Conv(c, m) => (c.shape, *m),
                Case::ConvPad8(c) => (pad8(&c.shape), ConvMode::Fprop),
                _ => return None,
            };
            lean_differs(&shape, mode).then_some((case, shape))
        })
        .collect();
    // The six stride-2 data gradients, the stem's weight gradient, and the 32-wide GEMMs.
    assert_eq!(picked.len(), 12);
    let mut gpu = Gpu::open(1).unwrap();
    let shapes: Vec<_> = picked.iter().map(|(_, s)| *s).collect();
    for paths in [KernelPaths::LEAN, KernelPaths::BASELINE] {
        gpu.be.paths = paths;
        assert_eq!(gpu.verify(&shapes).unwrap(), 0, "a conv check failed");
        for (case, _) in &picked {
            let row = measure(&gpu, case, &cases, None, false).unwrap();
            let label = row
                .custom
                .as_ref()
                .map(|m| m.label.clone())
                .unwrap_or_default();
            assert!(!row.failed, "{}: {:?}", row.id, row.note);
            // The phase kernel, the padded stem wgrad or a narrow tile under the lean paths;
            // none of them under the baseline.
            let lean_kind = ["TcPhase", "TcPad8", "T128x32", "T32x64"]
                .iter()
                .any(|k| label.contains(k));
            assert_eq!(lean_kind, paths == KernelPaths::LEAN, "{}: {label}", row.id);
            eprintln!("{:<44} {:<10} {label}", row.id, paths.spec());
        }
    }
}
