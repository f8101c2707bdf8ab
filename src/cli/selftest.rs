//! `inception-engine selftest`: compile the CUDA kernels, or check them against the CPU reference.
//!
//! - `--compile-only --arch sm_90a|sm_80 [--json]` compiles every kernel with NVRTC (no GPU needed)
//!   and prints registers, spill bytes and shared memory; fails on a compile error or any spill.
//! - `--device cuda [--json]` runs every op's check case (src/ops/<op>/check.rs) on the GPU at the
//!   plan's distinct shapes (the O2 kernels, then the fp32 O0 and fp16-BN O3 variants), then
//!   whole training steps against the CPU backend (src/selftest/step.rs); fails on any mismatch
//!   or when there is no GPU.

use anyhow::{bail, Result};

use crate::gpu::device::launched_entry_points;
use crate::gpu::nvrtc::{compile_all, KernelInfo};
use crate::gpu::CudaDevice;
use crate::plan::{self, PlanConfig};
use crate::selftest;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only compile the kernels with NVRTC and report their resources (no GPU needed).
    #[arg(long)]
    pub compile_only: bool,
    /// Target architecture for --compile-only.
    #[arg(long, default_value = "sm_90a")]
    pub arch: String,
    /// Run the kernels on this device against the reference (`cuda`).
    #[arg(long)]
    pub device: Option<String>,
    /// Print a JSON summary as the last line.
    #[arg(long)]
    pub json: bool,
    /// Plan whose layer shapes are tested.
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
    pub plan: String,
    /// Batch size of the test shapes (small keeps the CPU reference quick) [default: 4 at full
    /// shapes, 1 at reduced ones].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Input image size of the test plan [default: 299 at full shapes, 75 at reduced ones].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Shapes of the checks: `full` (every InceptionV4 layer at 299x299, whole steps at batch 8),
    /// `reduced` (v4 at 75x75 and batch 1, whole steps of tiny and of v4 at 139x139 and batch 2,
    /// chosen so every kernel entry point and code path still runs), or `auto`: reduced on the
    /// emulated GPU, full on a real one.
    #[arg(long, default_value = "auto", value_parser = ["auto", "full", "reduced"])]
    pub shapes: String,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the whole-training-step checks (tiny and v4 against the CPU backend).
    #[arg(long)]
    pub skip_steps: bool,
    /// Run only the whole-training-step checks.
    #[arg(long, conflicts_with = "skip_steps")]
    pub steps_only: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.compile_only {
        return compile_only(&args);
    }
    match args.device.as_deref() {
        Some("cuda") => device_cuda(&args),
        Some(other) => bail!("unknown device '{other}': selftest checks the 'cuda' device"),
        None => bail!("choose --compile-only or --device cuda"),
    }
}

fn compile_only(args: &Args) -> Result<()> {
    let compiled = compile_all(&args.arch)?;
    let kernels: Vec<&KernelInfo> = compiled.iter().flat_map(|c| &c.kernels).collect();
    println!(
        "{:<28} {:>6} {:>9} {:>8} {:>7}  arch",
        "kernel", "regs", "spill(B)", "smem(B)", "stack"
    );
    for k in &kernels {
        println!(
            "{:<28} {:>6} {:>9} {:>8} {:>7}  {}",
            k.name, k.registers, k.spill_bytes, k.shared_bytes, k.stack_bytes, k.arch
        );
    }
    println!(
        "{} kernels in {} files compiled for {}",
        kernels.len(),
        compiled.len(),
        args.arch
    );
    if args.json {
        println!("{}", serde_json::json!({ "kernels": kernels }));
    }
    let spilling: Vec<&str> = kernels
        .iter()
        .filter(|k| k.spill_bytes > 0)
        .map(|k| k.name.as_str())
        .collect();
    if !spilling.is_empty() {
        bail!("register spills on {}: {spilling:?}", args.arch);
    }
    Ok(())
}

fn device_cuda(args: &Args) -> Result<()> {
    let mut be = CudaDevice::new(0)?;
    println!(
        "device: {}, {} SMs, compiled for {}, {} kernels loaded",
        be.device_name,
        be.num_sms,
        be.arch,
        be.kernel_names().len()
    );
    let reduced = match args.shapes.as_str() {
        "reduced" => true,
        "full" => false,
        _ => be.is_emulated(),
    };
    let (batch, image_size) = if reduced { (1, 75) } else { (4, 299) };
    let config = PlanConfig {
        batch: args.batch.unwrap_or(batch),
        image_size: args.image_size.unwrap_or(image_size),
        ..PlanConfig::default()
    };
    println!(
        "shapes: {} ({} at {}x{}, batch {})",
        if reduced { "reduced" } else { "full" },
        args.plan,
        config.image_size,
        config.image_size,
        config.batch
    );
    let plan = plan::build(&args.plan, config)?;
    let mut checks = Vec::new();
    let ops = if args.steps_only {
        Ok(())
    } else {
        selftest::run_levels(&mut be, &plan, args.seed, &mut checks)
    };
    let outcome = ops.and_then(|()| {
        // Persist the verified fast shapes first, so the whole-step trainers reuse them.
        be.save_verified()?;
        if !args.skip_steps {
            checks.extend(selftest::step::run(args.seed, reduced)?);
        }
        Ok(())
    });
    let failed = selftest::failed(&checks);
    print!("{}", selftest::table(&checks));
    let compiled = be.kernel_names();
    let run = launched_entry_points();
    let never: Vec<&String> = compiled.iter().filter(|k| !run.contains(k)).collect();
    println!(
        "entry points run: {} of {} compiled{}",
        run.len(),
        compiled.len(),
        if never.is_empty() {
            String::new()
        } else {
            format!(" (never run: {never:?})")
        }
    );
    if args.json {
        let summary = serde_json::json!({
            "device": be.device_name,
            "arch": be.arch,
            "plan": args.plan,
            "batch": plan.config.batch,
            "image_size": plan.config.image_size,
            "shapes": if reduced { "reduced" } else { "full" },
            "failed": failed,
            "entry_points_compiled": compiled,
            "entry_points_run": run,
            "checks": checks,
        });
        println!("{summary}");
    }
    outcome?;
    be.save_verified()?;
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}
