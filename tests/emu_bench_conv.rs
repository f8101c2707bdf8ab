//! The kernel benchmark's convolution rows that a GPU visit times for the leaner-step changes,
//! run once on the emulated GPU (v4 at batch 1, 75x75): every affected case and its baseline
//! row prepares and launches, the case on the lean implementation, the baseline row on the one
//! the step ran before. The timings are the emulator's and mean nothing; the labels are checked.
//! In-process (it sets the driver variable before the first CUDA call), so a test binary of its
//! own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::bench::cases;
use inception_engine::bench::gpu::{Case, Gpu};
use inception_engine::bench::measure;

#[test]
fn the_lean_conv_cases_and_their_baseline_rows_run() {
    if !emu_env::nvrtc_available("the benchmark's conv rows on the emulated GPU") {
        return;
    }
    // SAFETY of the environment change: this binary runs one test, before any CUDA call.
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    std::env::remove_var("INCEPTION_KERNELS");
    let cases = cases::derive("v4", 1, 75).unwrap();
    let all = Case::all(&cases);
    let ids: Vec<String> = all.iter().map(Case::id).collect();
    // The baseline rows and the cases they follow.
    let picked: Vec<&Case> = all
        .iter()
        .filter(|c| {
            let id = c.id();
            id.ends_with("/baseline") || ids.contains(&format!("{id}/baseline"))
        })
        .collect();
    assert_eq!(picked.len(), 24);
    let gpu = Gpu::open(1).unwrap();
    let shapes: Vec<_> = picked
        .iter()
        .map(|c| match c {
            Case::Conv(c, _) | Case::ConvBaseline(c, _) => c.shape,
            Case::ConvPad8(c) | Case::ConvPad8Baseline(c) => {
                inception_engine::bench::prepare_conv::pad8(&c.shape)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(gpu.verify(&shapes).unwrap(), 0, "a conv check failed");
    for case in picked {
        let row = measure(&gpu, case, &cases, None).unwrap();
        let label = row
            .custom
            .as_ref()
            .map(|m| m.label.clone())
            .unwrap_or_default();
        assert!(!row.failed, "{}: {:?}", row.id, row.note);
        let baseline = row.id.ends_with("/baseline");
        // What each row must run: the phase kernel, the padded stem wgrad or a narrow tile in the
        // lean rows; none of them in the baseline rows.
        let lean_kind = ["TcPhase", "TcPad8", "T128x32", "T32x64"]
            .iter()
            .any(|k| label.contains(k));
        assert_eq!(lean_kind, !baseline, "{}: {label}", row.id);
        eprintln!("{:<44} {label}", row.id);
    }
}
