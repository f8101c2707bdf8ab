//! The device step program: the ordered list of stages a CUDA training step (or inference pass)
//! runs, derived from the plan once; each stage resolves to one or a few kernel calls
//! (calls.rs). Each stage runs at its own time (its position in the training program); the
//! arena's lifetimes are computed from what the stages read and write ([`program_lifetimes`]),
//! and [`check_program`] proves on the host that the program covers the plan and reads nothing
//! before it is written (tests/cuda_executor.rs).
//!
//! Departures from "one node, one launch":
//! - the loss node has no forward launch: softmax_ce computes the loss and the logits' gradient in
//!   one kernel, run as the loss's backward step, which writes that gradient;
//! - a batchnorm absorbs the ReLU after it, forward and backward, and concatenations whose inputs
//!   are all channel slices of their output launch nothing (see [`Fusion`]).

use super::fusion::Fusion;
use crate::plan::backward::{backward_reads, BackwardPlan};
use crate::plan::memory::Interval;
use crate::plan::{Op, Plan, TensorId};
use anyhow::{bail, Result};

/// One stage of the step program: a launch or a small group of launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Copy the staged fp32 batch into the input tensor (as fp16 below O0). The labels stay in
    /// their staging buffer: the plan's label tensor is never placed in the arena.
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
    /// The device loss scaler's update from the overflow flag (dynamic scaling only).
    ScaleUpdate,
}

/// The launches of a training step and of an inference pass.
#[derive(Clone, Debug)]
pub struct StepProgram {
    pub train: Vec<Stage>,
    pub infer: Vec<Stage>,
}

impl StepProgram {
    /// Derive the program: load, (pad), forward nodes but the loss and those fused away, backward
    /// steps but those fused away, overflow check, update, scaler update.
    pub fn new(plan: &Plan, bwd: &BackwardPlan, fusion: &Fusion, stem: Option<usize>) -> Self {
        let mut forward = vec![Stage::LoadInput];
        for (i, node) in plan.nodes.iter().enumerate() {
            if matches!(node.op, Op::SoftmaxCrossEntropy { .. }) || !launches(plan, bwd, fusion, i)
            {
                continue;
            }
            if stem == Some(i) {
                forward.push(Stage::PadStem { node: i });
            }
            forward.push(Stage::Forward { node: i });
        }
        let mut train = forward.clone();
        train.extend(
            (0..bwd.steps.len())
                .filter(|&j| launches(plan, bwd, fusion, bwd.steps[j].node))
                .map(|step| Stage::Backward { step }),
        );
        train.extend([Stage::OverflowCheck, Stage::Update, Stage::ScaleUpdate]);
        StepProgram {
            train,
            infer: forward,
        }
    }
}

/// Whether a node has launches of its own (absorbed ReLUs and copy-free concats have none).
fn launches(plan: &Plan, bwd: &BackwardPlan, fusion: &Fusion, node: usize) -> bool {
    match plan.nodes[node].op {
        Op::Relu => !fusion.absorbed[node],
        Op::Concat => fusion.concat_copies(plan, bwd, node),
        _ => true,
    }
}

/// Arena tensors a launch reads and writes, as (reads, writes), before mapping slices to their
/// roots; parameters and state are outside the arena and not listed. `train` selects the training
/// forward (BN writes saved statistics, a max pool on the `pool_argmax` path its argmax).
pub fn accesses(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    launch: Stage,
    train: bool,
) -> (Vec<TensorId>, Vec<TensorId>) {
    match launch {
        Stage::LoadInput => (vec![], vec![plan.input]),
        Stage::PadStem { .. } => (vec![plan.input], vec![]),
        Stage::Forward { node } => {
            let n = &plan.nodes[node];
            let mut writes = vec![fusion.effective_output(plan, node)];
            if train {
                writes.extend(&n.saved);
                writes.extend(fusion.argmax[node]);
            }
            let mut reads = n.inputs.clone();
            if n.op == Op::Concat {
                // Slices are already in place: only the other inputs are copied.
                reads.retain(|&x| fusion.view[x].is_none());
            }
            (reads, writes)
        }
        Stage::Backward { step } => backward_accesses(plan, bwd, fusion, step),
        Stage::OverflowCheck | Stage::Update | Stage::ScaleUpdate => (vec![], vec![]),
    }
}

fn backward_accesses(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    step: usize,
) -> (Vec<TensorId>, Vec<TensorId>) {
    let s = &bwd.steps[step];
    let node = &plan.nodes[s.node];
    if matches!(node.op, Op::SoftmaxCrossEntropy { .. }) {
        // The fused kernel: forward (the loss) and backward (the logits' gradient) in one.
        // Labels are read from the staging buffer (see `Stage::LoadInput`) and the loss goes to
        // the step report beside the overflow flag, so one copy brings both back: of the arena it
        // reads the logits and writes their gradient.
        let writes = s.grad_inputs.iter().flatten().copied();
        let reads = node.inputs.iter().copied().filter(|&t| t != plan.labels);
        return (reads.collect(), writes.collect());
    }
    // An absorbing BN's backward reads its ReLU's output and that output's gradient.
    let out = fusion.effective_output(plan, s.node);
    let grad_out = bwd.grad_of[out].filter(|_| s.grad_output.is_some());
    let (reads_in, reads_out, reads_saved) = backward_reads(&node.op);
    let mut reads: Vec<TensorId> = grad_out.into_iter().collect();
    // A max pool that saved its argmax reads that instead of its input.
    match fusion.argmax[s.node] {
        Some(argmax) => reads.push(argmax),
        None if reads_in => reads.extend(&node.inputs),
        None => {}
    }
    if reads_out || fusion.relu_after[s.node].is_some() {
        reads.push(out);
    }
    if reads_saved {
        reads.extend(&node.saved);
    }
    let mut writes = Vec::new();
    for ((g, &acc), &x) in s.grad_inputs.iter().zip(&s.accumulate).zip(&node.inputs) {
        let Some(g) = *g else { continue };
        if node.op == Op::Concat && fusion.view[x].is_some() {
            continue; // the slice of the output gradient already is this gradient
        }
        // An accumulated gradient is read as well as written.
        if acc {
            reads.push(g);
        }
        writes.push(g);
    }
    (reads, writes)
}

/// Whether launch reads or writes `t` with a row stride other than its own channel count. Only
/// the kernels that take a stride may touch a slice: BN (its output, and in backward the output
/// and its gradient), the window pools (output, output gradient) and the concat copies.
fn takes_stride(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    launch: Stage,
    t: TensorId,
) -> bool {
    let node = match launch {
        Stage::Forward { node } => node,
        Stage::Backward { step } => bwd.steps[step].node,
        _ => return false,
    };
    let strided_op = matches!(
        plan.nodes[node].op,
        Op::BatchNorm { .. } | Op::MaxPool(_) | Op::AvgPool(_) | Op::Concat
    );
    let out = fusion.effective_output(plan, node);
    strided_op && (t == out || bwd.grad_of[out] == Some(t))
}

/// Lifetimes of the arena's storage over a program (`train`: a training step, else an inference
/// pass): each launch runs at its position, and an access to a slice is an access to its root.
/// Slices and never-materialised tensors get no interval of their own; the input and logits are
/// kept to the end (read by the host).
pub fn program_lifetimes(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    program: &[Stage],
    train: bool,
) -> Vec<Option<Interval>> {
    let mut life: Vec<Option<Interval>> = vec![None; fusion.view.len()];
    let mut touch = |t: TensorId, time: usize| {
        let e = life[fusion.root(t)].get_or_insert(Interval {
            start: time,
            end: time,
        });
        e.start = e.start.min(time);
        e.end = e.end.max(time);
    };
    for (time, &launch) in program.iter().enumerate() {
        let (reads, writes) = accesses(plan, bwd, fusion, launch, train);
        for t in reads.into_iter().chain(writes) {
            touch(t, time);
        }
    }
    let last = program.len();
    for t in [plan.input, plan.logits] {
        touch(t, last);
    }
    life
}

/// Checks a training program against the plan: every forward node and backward step that has
/// launches runs exactly once (and fused ones never), no launch touches a never-materialised
/// tensor, only stride-taking kernels touch slices, every arena tensor is written before it is
/// read, and the overflow check, update and scaler update run in that order after the backward.
/// The arena's lifetimes come from the same accesses ([`program_lifetimes`]), so placement then
/// keeps every tensor intact from its first write to its last read.
pub fn check_program(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    program: &[Stage],
) -> Result<()> {
    check_coverage(plan, bwd, fusion, program)?;
    let mut written = vec![false; fusion.view.len()];
    for &launch in program {
        let (reads, writes) = accesses(plan, bwd, fusion, launch, true);
        for &t in reads.iter().chain(&writes) {
            if fusion.elided[t] {
                bail!("{launch:?} touches tensor {t}, which the fusion never materialises");
            }
            if fusion.view[t].is_some() && !takes_stride(plan, bwd, fusion, launch, t) {
                bail!(
                    "{launch:?} touches the channel slice {t} with a kernel that takes no stride"
                );
            }
        }
        for &t in &reads {
            if !written[t] {
                bail!("{launch:?} reads tensor {t} before any launch writes it");
            }
        }
        for t in writes {
            written[t] = true;
        }
        propagate_written(plan, bwd, fusion, &mut written);
    }
    Ok(())
}

/// A concatenation's output is complete once all its inputs are written (slices or copies), and
/// a slice of a gradient is written once the whole gradient is.
fn propagate_written(plan: &Plan, bwd: &BackwardPlan, fusion: &Fusion, written: &mut [bool]) {
    for node in plan.nodes.iter().filter(|n| n.op == Op::Concat) {
        if node.inputs.iter().all(|&x| written[x]) {
            written[node.outputs[0]] = true;
        }
    }
    for t in bwd.first_grad..written.len() {
        if fusion.view[t].is_some_and(|v| written[v.root]) {
            written[t] = true;
        }
    }
}

fn check_coverage(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    program: &[Stage],
) -> Result<()> {
    let mut fwd = vec![0usize; plan.nodes.len()];
    let mut back = vec![0usize; bwd.steps.len()];
    for &launch in program {
        match launch {
            Stage::Forward { node } => fwd[node] += 1,
            Stage::Backward { step } => {
                back[step] += 1;
                let node = bwd.steps[step].node;
                if matches!(plan.nodes[node].op, Op::SoftmaxCrossEntropy { .. }) {
                    fwd[node] += 1;
                }
            }
            _ => {}
        }
    }
    let want = |node: usize| launches(plan, bwd, fusion, node) as usize;
    if let Some(i) = (0..fwd.len()).find(|&i| fwd[i] != want(i)) {
        bail!(
            "forward node {i} ({}) runs {} times, expected {}",
            plan.nodes[i].name,
            fwd[i],
            want(i)
        );
    }
    if let Some(j) = (0..back.len()).find(|&j| back[j] != want(bwd.steps[j].node)) {
        bail!("backward step {j} runs {} times", back[j]);
    }
    check_tail(program)?;
    // The stem forward reads the padded copies, which only PadStem writes (outside the arena, so
    // the written-before-read check cannot see them).
    for (i, &l) in program.iter().enumerate() {
        if let Stage::PadStem { node } = l {
            let fwd = positions(program, |x| x == Stage::Forward { node });
            if fwd.iter().any(|&f| f < i) {
                bail!("the stem padding of node {node} must precede its forward");
            }
        }
    }
    Ok(())
}

/// The overflow check, the update and the scaler update run once each, in that order, after the
/// last backward step: the update skips itself on the device overflow flag and the scaler reads
/// the same flag, so a check anywhere else would let an overflowed step through.
fn check_tail(program: &[Stage]) -> Result<()> {
    let last_bwd = program
        .iter()
        .rposition(|l| matches!(l, Stage::Backward { .. }));
    let once = |l: Stage| -> Result<usize> {
        match positions(program, |x| x == l)[..] {
            [p] => Ok(p),
            _ => bail!("{l:?} must run exactly once"),
        }
    };
    let (check, update, scale) = (
        once(Stage::OverflowCheck)?,
        once(Stage::Update)?,
        once(Stage::ScaleUpdate)?,
    );
    if Some(check) < last_bwd || check > update || update > scale {
        bail!(
            "the overflow check, update and scaler update must follow the backward, in that order"
        );
    }
    Ok(())
}

fn positions(program: &[Stage], f: impl Fn(Stage) -> bool) -> Vec<usize> {
    (0..program.len()).filter(|&i| f(program[i])).collect()
}
