//! The device step program: the ordered list of launches a CUDA training step (or inference pass)
//! makes, derived from the plan once. One launch per forward node and per backward step, so every
//! launch runs at its own time in the memory planner's timeline and reads and writes only tensors
//! the planner keeps alive then; [`check_program`] proves that on the host (tests/cuda_step.rs).
//!
//! Two departures from "one node, one launch", both because of the fused kernels:
//! - the loss node has no forward launch: softmax_ce computes the loss and the logits' gradient in
//!   one kernel, run as the loss's backward step (time `nodes.len()`), whose gradient it writes;
//! - concatenation copies each branch into its channel slice (`copy_channels`) and copies the
//!   gradient slices back; writing branches straight into their slice needs the planner to alias
//!   them, which is a follow-up (see docs/ARCHITECTURE.md).

use crate::plan::backward::{backward_reads, BackwardPlan};
use crate::plan::memory::lifetimes;
use crate::plan::{Op, Plan, TensorId};
use anyhow::{bail, Result};

/// One launch (or small group of launches) of the step program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Copy the staged fp32 batch into the input tensor as fp16. The labels stay in their staging
    /// buffer: the plan's label tensor lives only from the loss node on, so writing it at time 0
    /// could clobber an earlier tensor sharing its memory.
    LoadInput,
    /// Pad the 3-channel stem's input and fp16 weights to 8 channels (tensor-core friendly).
    PadStem { node: usize },
    /// Forward of plan node `node`.
    Forward { node: usize },
    /// Backward step `step` of the backward plan (the loss step runs the fused softmax-CE).
    Backward { step: usize },
    /// Zero-or-set the device overflow flag from the parameter gradients (dynamic scaling only).
    OverflowCheck,
    /// The fused RMSProp update over the flat buffers (skips itself when the flag is set).
    Update,
}

/// The launches of a training step and of an inference pass.
#[derive(Clone, Debug)]
pub struct StepProgram {
    pub train: Vec<Launch>,
    pub infer: Vec<Launch>,
}

impl StepProgram {
    /// Derive the program: load, (pad), forward nodes but the loss, backward steps, update.
    pub fn new(plan: &Plan, bwd: &BackwardPlan, stem: Option<usize>) -> Self {
        let mut forward = vec![Launch::LoadInput];
        for (i, node) in plan.nodes.iter().enumerate() {
            if matches!(node.op, Op::SoftmaxCrossEntropy { .. }) {
                continue;
            }
            if stem == Some(i) {
                forward.push(Launch::PadStem { node: i });
            }
            forward.push(Launch::Forward { node: i });
        }
        let mut train = forward.clone();
        train.extend((0..bwd.steps.len()).map(|step| Launch::Backward { step }));
        train.extend([Launch::OverflowCheck, Launch::Update]);
        StepProgram {
            train,
            infer: forward,
        }
    }
}

/// Arena tensors a launch reads and writes, as (reads, writes); parameters and state are outside
/// the arena and not listed. `train` selects the training forward (BN writes saved statistics).
pub fn accesses(
    plan: &Plan,
    bwd: &BackwardPlan,
    launch: Launch,
    train: bool,
) -> (Vec<TensorId>, Vec<TensorId>) {
    match launch {
        Launch::LoadInput => (vec![], vec![plan.input]),
        Launch::PadStem { .. } => (vec![plan.input], vec![]),
        Launch::Forward { node } => {
            let n = &plan.nodes[node];
            let mut writes = n.outputs.clone();
            if train {
                writes.extend(&n.saved);
            }
            (n.inputs.clone(), writes)
        }
        Launch::Backward { step } => backward_accesses(plan, bwd, step),
        Launch::OverflowCheck | Launch::Update => (vec![], vec![]),
    }
}

fn backward_accesses(
    plan: &Plan,
    bwd: &BackwardPlan,
    step: usize,
) -> (Vec<TensorId>, Vec<TensorId>) {
    let s = &bwd.steps[step];
    let node = &plan.nodes[s.node];
    if matches!(node.op, Op::SoftmaxCrossEntropy { .. }) {
        // The fused kernel: forward (the loss) and backward (the logits' gradient) in one.
        // Labels are read from the staging buffer (see `Launch::LoadInput`) and the loss goes to
        // the step report beside the overflow flag, so one copy brings both back: of the arena it
        // reads the logits and writes their gradient.
        let writes = s.grad_inputs.iter().flatten().copied();
        let reads = node.inputs.iter().copied().filter(|&t| t != plan.labels);
        return (reads.collect(), writes.collect());
    }
    let (reads_in, reads_out, reads_saved) = backward_reads(&node.op);
    let mut reads: Vec<TensorId> = s.grad_output.into_iter().collect();
    for (flag, list) in [
        (reads_in, &node.inputs),
        (reads_out, &node.outputs),
        (reads_saved, &node.saved),
    ] {
        if flag {
            reads.extend(list);
        }
    }
    // An accumulated gradient is read as well as written.
    for (g, &acc) in s.grad_inputs.iter().zip(&s.accumulate) {
        if let (Some(g), true) = (g, acc) {
            reads.push(*g);
        }
    }
    (reads, s.grad_inputs.iter().flatten().copied().collect())
}

/// The planner time of a launch: forward node i runs at i, backward step j at `nodes.len() + j`.
pub fn launch_time(plan: &Plan, launch: Launch) -> Option<usize> {
    match launch {
        Launch::LoadInput => Some(0),
        Launch::PadStem { node } | Launch::Forward { node } => Some(node),
        Launch::Backward { step } => Some(plan.nodes.len() + step),
        Launch::OverflowCheck | Launch::Update => None,
    }
}

/// Checks a training program against the plan: every forward node and backward step is covered
/// exactly once, every arena tensor is written before it is read, and every tensor a launch touches
/// is alive (in the planner's lifetimes) at that launch's time, so no launch can clobber a tensor
/// that shares its memory.
pub fn check_program(plan: &Plan, bwd: &BackwardPlan, program: &[Launch]) -> Result<()> {
    check_coverage(plan, bwd, program)?;
    let life = lifetimes(plan, bwd);
    let mut written = vec![false; life.len()];
    for &launch in program {
        let (reads, writes) = accesses(plan, bwd, launch, true);
        for &t in &reads {
            if !written[t] {
                bail!("{launch:?} reads tensor {t} before any launch writes it");
            }
        }
        let time = launch_time(plan, launch);
        for &t in reads.iter().chain(&writes) {
            let (Some(time), Some(l)) = (time, life[t]) else {
                continue;
            };
            if time < l.start || time > l.end {
                bail!("{launch:?} at time {time} touches tensor {t} outside its lifetime {l:?}");
            }
        }
        for t in writes {
            written[t] = true;
        }
    }
    Ok(())
}

fn check_coverage(plan: &Plan, bwd: &BackwardPlan, program: &[Launch]) -> Result<()> {
    let mut fwd = vec![0usize; plan.nodes.len()];
    let mut back = vec![0usize; bwd.steps.len()];
    for &launch in program {
        match launch {
            Launch::Forward { node } => fwd[node] += 1,
            Launch::Backward { step } => {
                back[step] += 1;
                let node = bwd.steps[step].node;
                if matches!(plan.nodes[node].op, Op::SoftmaxCrossEntropy { .. }) {
                    fwd[node] += 1;
                }
            }
            _ => {}
        }
    }
    if let Some(i) = fwd.iter().position(|&c| c != 1) {
        bail!(
            "forward node {i} ({}) runs {} times",
            plan.nodes[i].name,
            fwd[i]
        );
    }
    if let Some(j) = back.iter().position(|&c| c != 1) {
        bail!("backward step {j} runs {} times", back[j]);
    }
    let update = program.iter().position(|&l| l == Launch::Update);
    let last_bwd = program
        .iter()
        .rposition(|l| matches!(l, Launch::Backward { .. }));
    if update.is_none() || update < last_bwd {
        bail!("the update must run once, after every backward step");
    }
    // The update skips itself on the device overflow flag: a check after it (or none) would let
    // an overflowed step through on the device while the host scaler counts it as skipped.
    let checks: Vec<usize> = positions(program, |l| l == Launch::OverflowCheck);
    if checks.len() != 1 || Some(checks[0]) < last_bwd || Some(checks[0]) > update {
        bail!("the overflow check must run once, between the last backward step and the update");
    }
    // The stem forward reads the padded copies, which only PadStem writes (outside the arena, so
    // the written-before-read check cannot see them).
    for (i, &l) in program.iter().enumerate() {
        if let Launch::PadStem { node } = l {
            let fwd = positions(program, |x| x == Launch::Forward { node });
            if fwd.iter().any(|&f| f < i) {
                bail!("the stem padding of node {node} must precede its forward");
            }
        }
    }
    Ok(())
}

fn positions(program: &[Launch], f: impl Fn(Launch) -> bool) -> Vec<usize> {
    (0..program.len()).filter(|&i| f(program[i])).collect()
}
