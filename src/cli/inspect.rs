//! `inception-engine inspect`: the per-layer table of a plan (name, op, output shape, parameters,
//! MACs) with totals, the memory planner's arena size for a training step, and the device memory
//! the CUDA backend would allocate at a batch size (worked out on the host; no GPU needed). With
//! `--list-models`, the table of models instead.

use crate::backend::cuda::arena;
use crate::backend::Amp;
use crate::plan::{self, backward::derive, memory::plan_memory, models, Plan, PlanConfig};
use anyhow::Result;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Plan to build.
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
    pub plan: String,
    /// Input image size (square); v4 needs at least 75.
    #[arg(long, default_value_t = 299)]
    pub image_size: usize,
    /// Number of classes of the classifier head.
    #[arg(long, default_value_t = 1000)]
    pub num_classes: usize,
    /// Batch size of the CUDA device-memory estimate.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// List the models `--plan` accepts (name, timm counterpart, summary) and exit.
    #[arg(long)]
    pub list_models: bool,
}

/// Size and cost figures of a plan, per image.
pub struct Summary {
    pub params: usize,
    pub macs: u64,
    pub arena_bytes_per_image: usize,
    pub arena_bytes_no_reuse_per_image: usize,
}

/// Totals for one image: parameters, MACs, and the f32 training-step arena from the planner.
pub fn summarize(plan: &Plan) -> Summary {
    let bwd = derive(plan);
    let mem = plan_memory(plan, &bwd, |_| 4);
    let b = plan.batch();
    Summary {
        params: plan.param_count(),
        macs: plan.macs_per_image(),
        arena_bytes_per_image: mem.peak_bytes / b,
        arena_bytes_no_reuse_per_image: mem.total_bytes / b,
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.list_models {
        list_models(args.json);
        return Ok(());
    }
    let cfg = PlanConfig {
        batch: 1,
        image_size: args.image_size,
        num_classes: args.num_classes,
        ..Default::default()
    };
    let plan = plan::build(&args.plan, cfg)?;
    let s = summarize(&plan);
    let device = device_memory(&args)?;
    if args.json {
        let layers: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| json!({"name": n.name, "op": n.op.kind_name(), "output": plan.shape(n.outputs[0]), "params": plan.node_params(n), "macs": plan.node_macs(n)}))
            .collect();
        let out = json!({
            "plan": plan.name, "image_size": args.image_size, "num_classes": args.num_classes,
            "params": s.params, "macs": s.macs, "layers_count": plan.nodes.len(),
            "arena_bytes_per_image": s.arena_bytes_per_image, "arena_bytes_no_reuse_per_image": s.arena_bytes_no_reuse_per_image,
            "arena_dtype": "f32", "layers": layers,
            "cuda_batch_size": args.batch_size, "cuda_memory_bytes": device.iter().map(|(k, b)| (k.clone(), json!(b))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{:<36} {:<15} {:<20} {:>12} {:>16}",
        "name", "op", "output", "params", "MACs"
    );
    for n in &plan.nodes {
        let shape = format!("{:?}", &plan.shape(n.outputs[0])[1..]);
        println!(
            "{:<36} {:<15} {:<20} {:>12} {:>16}",
            n.name,
            n.op.kind_name(),
            shape,
            group(plan.node_params(n) as u64),
            group(plan.node_macs(n))
        );
    }
    println!();
    println!(
        "plan {} at {}x{}, {} classes: {} nodes",
        plan.name,
        args.image_size,
        args.image_size,
        args.num_classes,
        plan.nodes.len()
    );
    println!("parameters:            {}", group(s.params as u64));
    println!(
        "forward MACs / image:  {} (convolutions and fully connected)",
        group(s.macs)
    );
    println!(
        "training arena / image: {:.1} MiB f32 activations and gradients ({:.1} MiB without reuse)",
        mib(s.arena_bytes_per_image),
        mib(s.arena_bytes_no_reuse_per_image)
    );
    let figures: Vec<String> = device
        .iter()
        .map(|(k, b)| format!("{k} {:.0} MiB", mib(*b)))
        .collect();
    println!(
        "CUDA device memory at batch {} (host estimate, H200): {}",
        args.batch_size,
        figures.join(", ")
    );
    Ok(())
}

/// One line per model, or a JSON array of them.
fn list_models(json: bool) {
    if json {
        let rows: Vec<_> = models::MODELS
            .iter()
            .map(|m| json!({"name": m.name, "timm_name": m.timm_name, "summary": m.summary}))
            .collect();
        println!("{}", json!(rows));
        return;
    }
    for m in models::MODELS {
        let timm = m.timm_name.unwrap_or("-");
        let default = if m.name == models::DEFAULT {
            " (default)"
        } else {
            ""
        };
        println!("{:<8} timm: {timm:<14} {}{default}", m.name, m.summary);
    }
}

/// What the CUDA executor would allocate at `--batch-size`, per use and precision level.
fn device_memory(args: &Args) -> Result<Vec<(String, usize)>> {
    let cfg = PlanConfig {
        batch: args.batch_size,
        image_size: args.image_size,
        num_classes: args.num_classes,
        ..Default::default()
    };
    let plan = plan::build(&args.plan, cfg)?;
    let cases = [
        ("train_O2", Amp::O2, true),
        ("train_O3", Amp::O3, true),
        ("train_O0", Amp::O0, true),
        ("infer_O2", Amp::O2, false),
    ];
    cases
        .iter()
        .map(|&(k, amp, train)| {
            let e = arena::plan_estimate(&plan, amp, train, arena::H200_SMS)?;
            Ok((k.to_string(), e.total()))
        })
        .collect()
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// 12253974624 -> "12,253,974,624".
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
