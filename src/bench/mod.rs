//! Kernel microbenchmarks on the GPU: every distinct InceptionV4 convolution (forward, data and
//! weight gradient) against cuDNN, the classifier against cuBLAS, and the memory-bound kernels
//! (batchnorm, pooling, softmax cross-entropy, RMSProp) against the measured device copy
//! bandwidth. One suite, two front ends: `inception-engine bench kernels` (the GPU machine has no
//! Rust toolchain, so it runs the release binary) and `cargo bench --bench kernels` (criterion).
//!
//! - [`cases`]: what is measured, derived from the plan (pure, tested without a GPU);
//! - [`cudnn`]: the cuDNN reference convolutions on raw device addresses;
//! - [`gpu`]: buffers, CUDA-event timing and the prepared cases;
//! - [`limit`]: each case's useful work, timed against the card's measured matrix rate and copy
//!   bandwidth;
//! - this file: the CLI arguments, the run and its report (text rows, JSON).

pub mod cases;
pub mod cudnn;
pub mod gpu;
pub mod limit;
pub mod overlap;
pub mod prepare;
pub mod prepare_conv;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backend::cuda::cost::{Cost, Rates};
use crate::gpu::KernelPaths;
use gpu::{Case, Gpu, Work};

#[derive(clap::Args, Debug, Clone)]
pub struct KernelArgs {
    /// Print the whole report as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Only the cases whose id (`group/layer/direction`, e.g. `conv/features.3.conv.conv/wgrad`)
    /// contains this string. The copy and matrix references always run (the limits need them).
    #[arg(long)]
    pub filter: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 299)]
    pub image_size: usize,
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
    pub plan: String,
    /// Timed samples per implementation (the median is reported).
    #[arg(long, default_value_t = 15)]
    pub samples: usize,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the ids of the cases (after --filter) and exit; needs no GPU.
    #[arg(long)]
    pub list: bool,
    /// Kernel paths to time, each a spec as `INCEPTION_KERNELS` takes it (`lean`, `baseline`,
    /// `lean,-bn_vec`); repeat to time several in one run (the references run once). Default:
    /// `INCEPTION_KERNELS`, else lean.
    #[arg(long = "kernels")]
    pub kernels: Vec<String>,
}

/// One implementation's figures on one case.
#[derive(Clone, Debug, Serialize)]
pub struct Measure {
    pub label: String,
    pub median_ms: f64,
    pub min_ms: f64,
    /// TFLOP/s for convolutions and GEMMs, GB/s for the memory-bound kernels.
    pub rate: f64,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub id: String,
    pub group: String,
    pub shape: String,
    /// "TFLOP/s" or "GB/s".
    pub unit: &'static str,
    pub custom: Option<Measure>,
    pub reference: Option<Measure>,
    /// custom rate / reference rate (above 1: ours is faster); None without a reference.
    pub ratio: Option<f64>,
    /// For GB/s rows: the fraction of the measured device-to-device copy bandwidth.
    pub copy_fraction: Option<f64>,
    /// The kernel paths the custom implementation ran (`KernelPaths::spec`).
    pub kernels: String,
    /// The time the case's useful work takes at the measured matrix rate and copy bandwidth
    /// (whichever binds), and that limit over the custom median (1 = at the limit).
    pub limit_ms: Option<f64>,
    pub of_limit: Option<f64>,
    pub note: Option<String>,
    /// An implementation failed to launch (its error is in the note).
    pub failed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub plan: String,
    pub batch: usize,
    pub image_size: usize,
    pub samples: usize,
    /// Read + write bandwidth of a 1 GiB cuMemcpyDtoD, GB/s.
    pub copy_gbps: Option<f64>,
    /// TFLOP/s of an 8192^3 cuBLAS fp16 product (fp32 compute).
    pub matrix_tflops: Option<f64>,
    /// The kernel paths timed, in order.
    pub kernels: Vec<String>,
    /// Tensor-core conv shapes that failed the check against the plain kernels (they run plain).
    pub unverified_shapes: usize,
    pub rows: Vec<Row>,
}

/// `inception-engine bench kernels`.
pub fn run_kernels(a: &KernelArgs) -> Result<()> {
    let cases = cases::derive(&a.plan, a.batch, a.image_size)?;
    let selected: Vec<Case> = Case::all(&cases)
        .into_iter()
        .filter(|c| {
            matches!(c, Case::Copy | Case::Matrix)
                || a.filter.as_deref().is_none_or(|f| c.id().contains(f))
        })
        .collect();
    if selected.len() == 2 && a.filter.is_some() {
        bail!(
            "--filter {:?} matches no case (see --list)",
            a.filter.as_deref().unwrap_or("")
        );
    }
    if a.list {
        for c in &selected {
            println!("{}", c.id());
        }
        return Ok(());
    }
    let specs = kernel_specs(&a.kernels)?;
    let mut gpu = Gpu::open(a.samples).map_err(|e| anyhow::anyhow!("`bench kernels`: {e:#}"))?;
    let device = gpu.describe();
    eprintln!(
        "bench kernels: {} batch {} at {}x{} on {device}",
        a.plan, a.batch, a.image_size, a.image_size
    );
    // The shapes about to run, checked as the executor does before it trusts the fast kernels.
    let mut shapes: Vec<_> = Vec::new();
    for case in &selected {
        let shape = match case {
            Case::Conv(c, _) => c.shape,
            Case::ConvPad8(c) => prepare_conv::pad8(&c.shape),
            Case::Fc(_) => cases.fc_shape(),
            _ => continue,
        };
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
    }
    let mut unverified = 0;
    for spec in &specs {
        gpu.be.paths = *spec;
        unverified += gpu
            .verify(&shapes)
            .context("checking the tensor-core kernels")?;
    }
    let mut report = Report {
        device,
        plan: a.plan.clone(),
        batch: a.batch,
        image_size: a.image_size,
        samples: a.samples,
        copy_gbps: None,
        matrix_tflops: None,
        kernels: specs.iter().map(|s| s.spec()).collect(),
        unverified_shapes: unverified,
        rows: Vec::new(),
    };
    println!("{}", text_header());
    let mut failed = 0;
    for case in &selected {
        // The references (cuDNN, cuBLAS, the copy) run with the first paths only; later rows
        // are compared with that measurement.
        let mut reference = None;
        for (i, spec) in specs.iter().enumerate() {
            let reference_row = matches!(case, Case::Copy | Case::Matrix);
            if i > 0 && reference_row {
                continue;
            }
            gpu.be.paths = *spec;
            // A case that fails is reported and the suite goes on (a launch error that poisons
            // the context will make the following cases fail too, which the notes then show).
            let mut row = measure(&gpu, case, &cases, report.copy_gbps, i == 0)
                .unwrap_or_else(|e| Row::failed(case, format!("{e:#}")));
            let rates = Rates {
                matrix_tflops: report.matrix_tflops,
                copy_gbps: report.copy_gbps,
            };
            if i == 0 {
                reference = row.reference.clone();
            } else {
                row.compare_with(reference.clone());
            }
            row.set_limit(limit::case_cost(case, &cases), rates, spec);
            failed += row.failed as usize;
            let rate = row.reference.as_ref().map(|m| m.rate);
            match case {
                Case::Copy => report.copy_gbps = rate,
                Case::Matrix => report.matrix_tflops = rate,
                _ => {}
            }
            println!("{}", text_row(&row));
            report.rows.push(row);
        }
    }
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &a.out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    }
    if failed > 0 {
        bail!(
            "{failed} of {} cases failed (see their notes)",
            selected.len()
        );
    }
    Ok(())
}

/// The kernel paths of `--kernels` (each parsed), or the environment's when none is given.
fn kernel_specs(given: &[String]) -> Result<Vec<KernelPaths>> {
    if given.is_empty() {
        return Ok(vec![KernelPaths::from_env()?]);
    }
    given
        .iter()
        .map(|s| KernelPaths::parse(s).map_err(|e| e.context("--kernels")))
        .collect()
}

/// Prepares one case and times each of its implementations.
/// Without `references`, only our implementations run (a second set of kernel paths).
pub fn measure(
    gpu: &Gpu,
    case: &Case,
    cases: &cases::Cases,
    copy_gbps: Option<f64>,
    references: bool,
) -> Result<Row> {
    let mut prep = gpu.prepare(case, cases)?;
    prep.variants.retain(|v| references || !v.reference);
    let (unit, amount) = match prep.work {
        Work::Flop(f) => ("TFLOP/s", f / 1e12),
        Work::Bytes(b) => ("GB/s", b / 1e9),
    };
    let mut custom = None;
    let mut reference = None;
    let mut notes: Vec<String> = prep.note.take().into_iter().collect();
    let mut failed = false;
    for v in &mut prep.variants {
        let t = match gpu.time(&mut v.run) {
            Ok(t) => t,
            Err(e) => {
                notes.push(format!("{} failed: {e:#}", v.label));
                failed = true;
                continue;
            }
        };
        let m = Measure {
            label: v.label.clone(),
            median_ms: t.median_ms,
            min_ms: t.min_ms,
            rate: amount / (t.median_ms / 1000.0),
        };
        if v.reference {
            reference = Some(m);
        } else {
            custom = Some(m);
        }
    }
    gpu.be.synchronize()?;
    let ratio = match (&custom, &reference) {
        (Some(c), Some(r)) => Some(c.rate / r.rate),
        _ => None,
    };
    let copy_fraction = match (unit, &custom, copy_gbps) {
        ("GB/s", Some(c), Some(copy)) => Some(c.rate / copy),
        _ => None,
    };
    Ok(Row {
        id: prep.id,
        group: prep.group.to_string(),
        shape: prep.shape,
        unit,
        custom,
        reference,
        ratio,
        copy_fraction,
        kernels: String::new(),
        limit_ms: None,
        of_limit: None,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        failed,
    })
}

impl Row {
    fn failed(case: &Case, why: String) -> Self {
        Row {
            id: case.id(),
            group: case.id().split('/').next().unwrap_or("").to_string(),
            shape: String::new(),
            unit: "",
            custom: None,
            reference: None,
            ratio: None,
            copy_fraction: None,
            kernels: String::new(),
            limit_ms: None,
            of_limit: None,
            note: Some(format!("failed: {why}")),
            failed: true,
        }
    }

    /// Takes `reference` (measured with the first kernel paths) as this row's reference.
    fn compare_with(&mut self, reference: Option<Measure>) {
        self.ratio = self
            .custom
            .as_ref()
            .zip(reference.as_ref())
            .map(|(c, r)| c.rate / r.rate);
        self.reference = reference;
    }

    /// Records the kernel paths and the case's limit at `rates`, and how close ours came to it.
    fn set_limit(&mut self, cost: Option<Cost>, rates: Rates, paths: &KernelPaths) {
        self.kernels = paths.spec();
        self.limit_ms = cost.and_then(|c| c.limit_ms(rates));
        self.of_limit = self
            .limit_ms
            .zip(self.custom.as_ref())
            .map(|(limit, c)| limit / c.median_ms);
    }
}

fn text_header() -> String {
    format!(
        "{:<44} {:<34} {:>10} {:>10} {:>7} {:>6} {:>9} {:>5}  {}",
        "case",
        "shape",
        "custom",
        "reference",
        "ratio",
        "copy%",
        "limit ms",
        "lim%",
        "implementations"
    )
}

fn text_row(r: &Row) -> String {
    let rate = |m: &Option<Measure>| m.as_ref().map_or("-".into(), |m| format!("{:.2}", m.rate));
    let labels: Vec<String> = [&r.custom, &r.reference]
        .iter()
        .filter_map(|m| {
            m.as_ref()
                .map(|m| format!("{} {:.3} ms", m.label, m.median_ms))
        })
        .collect();
    let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.0}", 100.0 * x));
    format!(
        "{:<44} {:<34} {:>10} {:>10} {:>7} {:>6} {:>9} {:>5}  {} [{}, {}]{}",
        r.id,
        r.shape,
        rate(&r.custom),
        rate(&r.reference),
        r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
        pct(r.copy_fraction),
        r.limit_ms.map_or("-".into(), |x| format!("{x:.3}")),
        pct(r.of_limit),
        labels.join(" | "),
        r.unit,
        r.kernels,
        r.note
            .as_ref()
            .map_or(String::new(), |n| format!(" (note: {n})"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        let m = |label: &str, rate: f64| Measure {
            label: label.into(),
            median_ms: 1.0,
            min_ms: 0.9,
            rate,
        };
        Row {
            id: "conv/features.0.conv/fprop".into(),
            group: "conv".into(),
            shape: "299x299x3->32 k3x3 s2 p0,0,0,0".into(),
            unit: "TFLOP/s",
            custom: Some(m("custom Plain", 10.0)),
            reference: Some(m("cudnn fwd algo 1 (tc)", 40.0)),
            ratio: Some(0.25),
            copy_fraction: None,
            kernels: "lean".into(),
            limit_ms: Some(0.5),
            of_limit: Some(0.5),
            note: None,
            failed: false,
        }
    }

    #[test]
    fn text_row_shows_rates_ratio_and_kernels() {
        let t = text_row(&row());
        assert!(t.starts_with("conv/features.0.conv/fprop"));
        for part in [
            "10.00",
            "40.00",
            "0.25",
            "custom Plain 1.000 ms",
            "cudnn fwd algo 1",
            "0.500",
            "TFLOP/s, lean]",
        ] {
            assert!(t.contains(part), "{part} missing: {t}");
        }
    }

    /// tools/bench_table.py reads these keys: keep them in step.
    #[test]
    fn json_report_has_the_keys_bench_table_reads() {
        let report = Report {
            device: "test".into(),
            plan: "v4".into(),
            batch: 128,
            image_size: 299,
            samples: 15,
            copy_gbps: Some(3000.0),
            matrix_tflops: Some(790.0),
            kernels: vec!["lean".into()],
            unverified_shapes: 0,
            rows: vec![row()],
        };
        let v: serde_json::Value = serde_json::to_value(&report).unwrap();
        for k in [
            "device",
            "plan",
            "batch",
            "image_size",
            "samples",
            "copy_gbps",
            "matrix_tflops",
            "kernels",
            "unverified_shapes",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        let r = &v["rows"][0];
        for k in [
            "id",
            "group",
            "shape",
            "unit",
            "ratio",
            "copy_fraction",
            "note",
            "failed",
            "kernels",
            "limit_ms",
            "of_limit",
        ] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert_eq!(r["custom"]["rate"], 10.0);
        assert_eq!(r["reference"]["label"], "cudnn fwd algo 1 (tc)");
    }
}
