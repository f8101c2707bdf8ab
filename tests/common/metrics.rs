//! Reading a run's metrics.jsonl back in tests (included with `#[path]`).

#![allow(dead_code)]
use std::path::Path;

/// The training loss of every logged step of the run in `run`.
pub fn step_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}
