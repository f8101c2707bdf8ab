//! Host-side checks of the CUDA training executor: the arena layout per AMP level, the padded
//! parameter slots, the device step program against the plan, the memory estimate and the device
//! resolution without a GPU. The GPU-side comparisons live in `selftest --device cuda`; the one test
//! here that needs a GPU skips with a message when there is none.

use inception_engine::backend::cuda::arena::{
    self, elem_bytes, ParamSlots, PARAM_ELEM_BYTES, SLOT_ALIGN,
};
use inception_engine::backend::cuda::buffers::{check_batch, check_state};
use inception_engine::backend::cuda::fusion::{channels, Fusion};
use inception_engine::backend::cuda::program::{
    accesses, check_program, program_lifetimes, Stage, StepProgram,
};
use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{self, cuda_probe, resolve_device, Amp, Device};
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::params::ParamLayout;
use inception_engine::plan::backward::{derive, BackwardPlan};
use inception_engine::plan::memory::{MemoryPlan, ALIGN};
use inception_engine::plan::{self, Op, Plan, PlanConfig, TensorKind};

fn build(name: &str, batch: usize, size: usize) -> (Plan, BackwardPlan) {
    let config = PlanConfig {
        batch,
        image_size: size,
        num_classes: 10,
        ..PlanConfig::default()
    };
    let plan = plan::build(name, config).unwrap();
    let bwd = derive(&plan);
    (plan, bwd)
}

fn plans() -> Vec<(Plan, BackwardPlan)> {
    vec![build("tiny", 8, 32), build("v4", 8, 299)]
}

/// The device program and arena of a plan with the executor's fusion, or with none.
fn device(
    plan: &Plan,
    bwd: &BackwardPlan,
    fused: bool,
    amp: Amp,
) -> (Fusion, StepProgram, MemoryPlan) {
    device_with(plan, bwd, fused, false, amp)
}

/// As [`device`], with the max pools' saved argmax (the `pool_argmax` path) when `argmax`.
fn device_with(
    plan: &Plan,
    bwd: &BackwardPlan,
    fused: bool,
    argmax: bool,
    amp: Amp,
) -> (Fusion, StepProgram, MemoryPlan) {
    let mut fusion = if fused {
        Fusion::new(plan, bwd)
    } else {
        Fusion::none(plan, bwd)
    };
    if argmax {
        fusion = fusion.with_pool_argmax(plan, bwd);
    }
    let program = StepProgram::new(plan, bwd, &fusion, arena::stem_conv(plan));
    let mem = arena::arena_plan(plan, bwd, &fusion, &program.train, amp, true);
    (fusion, program, mem)
}

/// Tensors alive at the same time never share bytes; every offset is 256-aligned and in the arena.
fn assert_no_overlap(mem: &MemoryPlan) {
    for p in &mem.placements {
        assert_eq!(p.offset % ALIGN, 0, "tensor {} misaligned", p.tensor);
        assert!(p.offset + p.bytes <= mem.peak_bytes);
    }
    let mut by_start: Vec<_> = mem.placements.iter().collect();
    by_start.sort_by_key(|p| p.offset);
    for (i, a) in by_start.iter().enumerate() {
        for b in &by_start[i + 1..] {
            if b.offset >= a.offset + a.bytes {
                break;
            }
            assert!(
                !a.life.overlaps(&b.life),
                "tensors {} and {} share memory while both alive",
                a.tensor,
                b.tensor
            );
        }
    }
}

#[test]
fn arena_fits_every_tensor_without_live_overlap_at_each_amp_level() {
    for (plan, bwd) in plans() {
        for amp in [Amp::O0, Amp::O2, Amp::O3] {
            for (fused, argmax) in [(false, false), (true, false), (true, true)] {
                let (fusion, program, mem) = device_with(&plan, &bwd, fused, argmax, amp);
                let life = program_lifetimes(&plan, &bwd, &fusion, &program.train, true);
                assert_eq!(mem.placements.len(), life.iter().flatten().count());
                assert_no_overlap(&mem);
            }
        }
    }
}

#[test]
fn element_sizes_follow_the_amp_level() {
    let (plan, bwd) = build("tiny", 8, 32);
    let saved = plan
        .tensors
        .iter()
        .position(|t| t.kind == TensorKind::Saved)
        .unwrap();
    let act = plan.nodes[0].outputs[0];
    let grad = bwd.first_grad;
    for (amp, half, stats) in [(Amp::O0, 4, 4), (Amp::O2, 2, 4), (Amp::O3, 2, 2)] {
        assert_eq!(elem_bytes(&plan, amp, plan.input), half);
        assert_eq!(elem_bytes(&plan, amp, act), half);
        assert_eq!(elem_bytes(&plan, amp, grad), half);
        assert_eq!(elem_bytes(&plan, amp, saved), stats);
        assert_eq!(elem_bytes(&plan, amp, plan.labels), 4);
        assert_eq!(elem_bytes(&plan, amp, plan.loss), 4);
    }
    let bytes = |amp| device(&plan, &bwd, true, amp).2.total_bytes;
    assert!(bytes(Amp::O2) < bytes(Amp::O0));
}

#[test]
fn v4_fuses_every_bn_relu_and_concatenates_without_copies() {
    let (plan, bwd) = build("v4", 8, 299);
    let fusion = Fusion::new(&plan, &bwd);
    for (i, node) in plan.nodes.iter().enumerate() {
        match node.op {
            Op::BatchNorm { .. } => assert!(fusion.relu_after[i].is_some(), "{}", node.name),
            Op::Relu => assert!(fusion.absorbed[i], "{}", node.name),
            Op::Concat => {
                assert!(!fusion.concat_copies(&plan, &bwd, i), "{}", node.name);
                let (y, gy) = (node.outputs[0], bwd.grad_of[node.outputs[0]].unwrap());
                let mut channel = 0;
                for &x in &node.inputs {
                    // Each branch and its gradient are their channels of the block output.
                    let (v, g) = (
                        fusion.view[x].unwrap(),
                        fusion.view[bwd.grad_of[x].unwrap()].unwrap(),
                    );
                    assert_eq!(
                        (v.root, v.channel, v.ld),
                        (y, channel, channels(&plan, &bwd, y))
                    );
                    assert_eq!((g.root, g.channel, g.ld), (gy, channel, v.ld));
                    channel += channels(&plan, &bwd, x);
                }
            }
            _ => {}
        }
    }
    let program = StepProgram::new(&plan, &bwd, &fusion, arena::stem_conv(&plan));
    let fused_away = |l: &Stage| match *l {
        Stage::Forward { node } => matches!(plan.nodes[node].op, Op::Relu | Op::Concat),
        Stage::Backward { step } => {
            matches!(plan.nodes[bwd.steps[step].node].op, Op::Relu | Op::Concat)
        }
        _ => false,
    };
    assert!(!program.train.iter().any(fused_away));
    // Fewer tensors and no copies: the fused arena is smaller.
    let peak = |fused| device(&plan, &bwd, fused, Amp::O2).2.peak_bytes;
    let (plain, fused) = (peak(false), peak(true));
    eprintln!(
        "v4 b8 O2 arena: {:.1} MiB unfused, {:.1} MiB fused",
        plain as f64 / 1048576.0,
        fused as f64 / 1048576.0
    );
    assert!(fused * 10 < plain * 9, "{fused} vs {plain}");
}

/// Replays a training program on a model of the arena. Every write stamps the 2-byte units it
/// covers with the writer's root tensor; every read checks that each unit it covers still carries
/// its own root's stamp. A placement overlap, a lifetime that ends too early, a tensor read before
/// it is written, or a concatenation whose slices leave channels unwritten fails here. Saved
/// argmax tensors (one byte per element, 256-aligned like every placement) stamp the units their
/// bytes touch.
fn replay(
    plan: &Plan,
    bwd: &BackwardPlan,
    fusion: &Fusion,
    program: &[Stage],
    mem: &MemoryPlan,
    amp: Amp,
    train: bool,
) -> Result<(), String> {
    let offsets = arena::offsets(plan, mem, fusion, amp);
    let mut stamp = vec![usize::MAX; mem.peak_bytes / 2 + 1];
    let units = |t: usize| -> Vec<usize> {
        let (elem, ld) = (
            arena::id_elem_bytes(plan, fusion, amp, t),
            fusion.ld(plan, bwd, t),
        );
        // An argmax is dense: its channels are its row stride.
        let c = match fusion.argmax_node(t) {
            Some(_) => ld,
            None => channels(plan, bwd, t),
        };
        let count = arena::numel(plan, bwd, fusion, t);
        let off = offsets[t].unwrap_or_else(|| panic!("tensor {t} has no storage"));
        let mut u: Vec<usize> = (0..count)
            .flat_map(|i| {
                let byte = off + (i / c * ld + i % c) * elem;
                byte / 2..(byte + elem).div_ceil(2)
            })
            .collect();
        u.dedup();
        u
    };
    for (time, &launch) in program.iter().enumerate() {
        let (reads, writes) = accesses(plan, bwd, fusion, launch, train);
        for t in reads {
            let root = fusion.root(t);
            if let Some(u) = units(t).into_iter().find(|&u| stamp[u] != root) {
                return Err(format!(
                    "{launch:?} (time {time}) reads tensor {t} at unit {u}, stamped {}",
                    stamp[u] as isize
                ));
            }
        }
        for t in writes {
            let root = fusion.root(t);
            units(t).into_iter().for_each(|u| stamp[u] = root);
        }
    }
    Ok(())
}

#[test]
fn replaying_the_program_on_the_arena_finds_every_read_intact() {
    let cases = [build("tiny", 2, 32), build("v4", 1, 75)];
    for (plan, bwd) in &cases {
        for (fused, argmax, amp) in [
            (true, false, Amp::O2),
            (false, false, Amp::O2),
            (true, false, Amp::O0),
            (true, false, Amp::O3),
            (true, true, Amp::O2),
            (true, true, Amp::O0),
        ] {
            let (fusion, program, mem) = device_with(plan, bwd, fused, argmax, amp);
            replay(plan, bwd, &fusion, &program.train, &mem, amp, true).unwrap_or_else(|e| {
                panic!("{} fused={fused} argmax={argmax} {amp:?}: {e}", plan.name)
            });
        }
    }
}

#[test]
fn the_inference_arena_serves_the_forward_pass_in_less_memory() {
    let (plan, bwd) = build("v4", 8, 299);
    let (fusion, program, train_mem) = device(&plan, &bwd, true, Amp::O2);
    let mem = arena::arena_plan(&plan, &bwd, &fusion, &program.infer, Amp::O2, false);
    replay(&plan, &bwd, &fusion, &program.infer, &mem, Amp::O2, false).unwrap();
    let layout = ParamLayout::new(&plan);
    let (p, s) = (
        ParamSlots::new(&layout.params),
        ParamSlots::new(&layout.states),
    );
    let train = arena::estimate(&plan, &train_mem, &p, &s, 132, true);
    let infer = arena::estimate(&plan, &mem, &p, &s, 132, false);
    eprintln!(
        "v4 b8 O2 training {}\ninference {}",
        train.describe(),
        infer.describe()
    );
    assert!(
        infer.arena * 3 < train.arena,
        "{} vs {}",
        infer.arena,
        train.arena
    );
    assert!(infer.params * 3 < train.params);
    assert!(infer.total() * 3 < train.total());
}

#[test]
fn replay_catches_two_live_tensors_sharing_memory() {
    // Move the first block output onto the input image, which the first convolution's backward
    // still reads at the end of the step: the replay must notice the overwritten image.
    let (plan, bwd) = build("tiny", 2, 32);
    let (fusion, program, mut mem) = device(&plan, &bwd, true, Amp::O2);
    replay(&plan, &bwd, &fusion, &program.train, &mem, Amp::O2, true).unwrap();
    let cat = plan
        .nodes
        .iter()
        .find(|n| n.op == Op::Concat)
        .unwrap()
        .outputs[0];
    let input = mem
        .placements
        .iter()
        .find(|p| p.tensor == plan.input)
        .unwrap()
        .offset;
    let moved = mem.placements.iter_mut().find(|p| p.tensor == cat).unwrap();
    moved.offset = input;
    mem.peak_bytes = mem.peak_bytes.max(input + moved.bytes);
    assert!(replay(&plan, &bwd, &fusion, &program.train, &mem, Amp::O2, true).is_err());
}

#[test]
fn a_saved_argmax_lives_from_its_pool_forward_to_its_backward() {
    let (plan, bwd) = build("v4", 8, 299);
    let (fusion, program, mem) = device_with(&plan, &bwd, true, true, Amp::O2);
    check_program(&plan, &bwd, &fusion, &program.train).unwrap();
    let life = program_lifetimes(&plan, &bwd, &fusion, &program.train, true);
    let at = |l: Stage| program.train.iter().position(|&x| x == l).unwrap();
    let pools: Vec<usize> = (0..plan.nodes.len())
        .filter(|&i| matches!(plan.nodes[i].op, Op::MaxPool(_)))
        .collect();
    assert_eq!(pools.len(), 4, "v4's max pools: Mixed_3a, 5a, 6a, 7a");
    for &i in &pools {
        let t = fusion.argmax[i].expect("every v4 max pool saves its argmax");
        assert_eq!(fusion.argmax_node(t), Some(i));
        let step = bwd.steps.iter().position(|s| s.node == i).unwrap();
        let (fwd, back) = (at(Stage::Forward { node: i }), at(Stage::Backward { step }));
        let l = life[t].unwrap();
        assert_eq!((l.start, l.end), (fwd, back), "{}", plan.nodes[i].name);
        // One byte per output, and the backward reads it instead of the pool's input.
        let p = mem.placements.iter().find(|p| p.tensor == t).unwrap();
        assert_eq!(p.bytes, plan.tensor(plan.nodes[i].outputs[0]).numel());
        let (reads, _) = accesses(&plan, &bwd, &fusion, Stage::Backward { step }, true);
        assert!(reads.contains(&t) && !reads.contains(&plan.nodes[i].inputs[0]));
        // Inference saves nothing.
        let (_, writes) = accesses(&plan, &bwd, &fusion, Stage::Forward { node: i }, false);
        assert!(!writes.contains(&t));
    }
    let plain = device(&plan, &bwd, true, Amp::O2).0;
    assert!(plain.argmax.iter().all(Option::is_none));
}

#[test]
fn replay_catches_an_argmax_overwritten_before_its_backward() {
    let (plan, bwd) = build("tiny", 2, 32);
    let (fusion, program, mut mem) = device_with(&plan, &bwd, true, true, Amp::O2);
    replay(&plan, &bwd, &fusion, &program.train, &mem, Amp::O2, true).unwrap();
    // Place the first argmax over a tensor alive at the same time.
    let t = fusion.argmax.iter().flatten().copied().next().unwrap();
    let p = mem.placements.iter().position(|p| p.tensor == t).unwrap();
    let life = mem.placements[p].life;
    let other = mem
        .placements
        .iter()
        .find(|q| q.tensor != t && q.life.overlaps(&life))
        .unwrap()
        .offset;
    mem.placements[p].offset = other;
    let err = replay(&plan, &bwd, &fusion, &program.train, &mem, Amp::O2, true).unwrap_err();
    eprintln!("{err}");
}

#[test]
fn param_slots_are_aligned_and_round_trip() {
    let (plan, _) = build("tiny", 2, 32);
    let layout = ParamLayout::new(&plan);
    let slots = ParamSlots::new(&layout.params);
    assert!(slots.len >= layout.param_len);
    for &(_, dev, _) in &slots.slots {
        assert_eq!(dev % SLOT_ALIGN, 0);
    }
    let host: Vec<f32> = (0..layout.param_len).map(|i| i as f32).collect();
    let dev = slots.scatter(&host, -1.0);
    assert_eq!(dev.len(), slots.len);
    assert_eq!(slots.gather(&dev), host);
    // The gaps hold the fill value only.
    let filled = dev.iter().filter(|&&v| v == -1.0).count();
    assert_eq!(filled, slots.len - layout.param_len);
    let first = &layout.params[1];
    assert_eq!(
        slots.device_offset(first.tensor),
        Some(slots.slots[1].1),
        "device offset by tensor id"
    );
}

#[test]
fn step_program_covers_every_node_and_step_once_in_a_valid_order() {
    for (plan, bwd) in plans() {
        let stem = arena::stem_conv(&plan);
        assert_eq!(stem, Some(0), "{}: the 3-channel stem is padded", plan.name);
        for fused in [false, true] {
            let (fusion, program, _) = device(&plan, &bwd, fused, Amp::O2);
            check_program(&plan, &bwd, &fusion, &program.train).unwrap();
            let loss_fwd = program.infer.iter().any(|l| {
                matches!(l, Stage::Forward { node } if matches!(plan.nodes[*node].op, Op::SoftmaxCrossEntropy { .. }))
            });
            assert!(!loss_fwd, "inference computes no loss");
            // Load, pad, and every node but the loss and those fused away.
            let gone = |op: &Op| fused && matches!(op, Op::Relu | Op::Concat);
            let kept = plan.nodes.iter().filter(|n| !gone(&n.op)).count();
            assert_eq!(program.infer.len(), kept + 1);
        }
    }
}

#[test]
fn step_program_check_rejects_broken_programs() {
    let (plan, bwd) = build("tiny", 2, 32);
    let fusion = Fusion::new(&plan, &bwd);
    let good = StepProgram::new(&plan, &bwd, &fusion, None).train;
    check_program(&plan, &bwd, &fusion, &good).unwrap();
    let bad = |program: &[Stage]| check_program(&plan, &bwd, &fusion, program).is_err();
    let mut missing = good.clone();
    missing.retain(|l| *l != Stage::Forward { node: 3 });
    assert!(bad(&missing));
    let mut twice = good.clone();
    twice.insert(5, Stage::Backward { step: 0 });
    assert!(bad(&twice));
    let pos = |l: Stage| good.iter().position(|&x| x == l).unwrap();
    let mut swapped = good.clone();
    swapped.swap(
        pos(Stage::Forward { node: 0 }),
        pos(Stage::Forward { node: 1 }),
    );
    assert!(bad(&swapped));
    let mut late_update = good.clone();
    let upd = late_update.remove(pos(Stage::Update));
    late_update.insert(1, upd);
    assert!(bad(&late_update));
    // A ReLU the BN absorbed must not run again (its input is never materialised).
    let relu = plan.nodes.iter().position(|n| n.op == Op::Relu).unwrap();
    let mut unfused = good.clone();
    unfused.insert(
        pos(Stage::Forward { node: relu - 1 }) + 1,
        Stage::Forward { node: relu },
    );
    assert!(bad(&unfused));
    // The unfused program reads tensors the fused layout never stores.
    let plain = StepProgram::new(&plan, &bwd, &Fusion::none(&plan, &bwd), None).train;
    assert!(bad(&plain));
}

#[test]
fn step_program_check_rejects_a_misplaced_tail_or_stem_padding() {
    let (plan, bwd) = build("tiny", 2, 32);
    let stem = arena::stem_conv(&plan);
    let fusion = Fusion::new(&plan, &bwd);
    let good = StepProgram::new(&plan, &bwd, &fusion, stem).train;
    check_program(&plan, &bwd, &fusion, &good).unwrap();
    let bad = |program: &[Stage]| check_program(&plan, &bwd, &fusion, program).is_err();
    let mut no_check = good.clone();
    no_check.retain(|l| *l != Stage::OverflowCheck);
    assert!(bad(&no_check));
    let mut check_after_update = no_check.clone();
    check_after_update.push(Stage::OverflowCheck);
    assert!(bad(&check_after_update));
    let mut scale_first = good.clone();
    scale_first.retain(|l| *l != Stage::ScaleUpdate);
    let u = scale_first
        .iter()
        .position(|l| *l == Stage::Update)
        .unwrap();
    scale_first.insert(u, Stage::ScaleUpdate);
    assert!(bad(&scale_first));
    let node = stem.unwrap();
    let mut late_pad = good.clone();
    let p = late_pad
        .iter()
        .position(|l| *l == Stage::PadStem { node })
        .unwrap();
    let pad = late_pad.remove(p);
    let f = late_pad
        .iter()
        .position(|l| *l == Stage::Forward { node })
        .unwrap();
    late_pad.insert(f + 1, pad);
    assert!(bad(&late_pad));
}

#[test]
fn memory_estimate_adds_up() {
    let (plan, bwd) = build("v4", 128, 299);
    let (_, _, mem) = device(&plan, &bwd, true, Amp::O2);
    let layout = ParamLayout::new(&plan);
    let (p, s) = (
        ParamSlots::new(&layout.params),
        ParamSlots::new(&layout.states),
    );
    let est = arena::estimate(&plan, &mem, &p, &s, 132, true);
    assert_eq!(est.arena, mem.peak_bytes);
    assert!(est.params >= layout.param_len * PARAM_ELEM_BYTES);
    assert!(
        est.params
            < (layout.param_len + SLOT_ALIGN * layout.params.len()) * PARAM_ELEM_BYTES + ALIGN
    );
    assert!(est.staging >= plan.tensor(plan.input).numel() * 4);
    assert_eq!(
        est.total(),
        est.arena + est.params + est.states + est.workspace + est.staging
    );
    eprintln!("v4 batch 128 O2: {}", est.describe());
    // v4 at batch 128 in fp16 needs gigabytes, and fits an 80 GB card.
    assert!(
        est.total() > 4 << 30 && est.total() < 70 << 30,
        "{}",
        est.describe()
    );
    assert!(est.describe().contains("MiB"));
}

#[test]
fn default_precision_and_loss_scale_per_device() {
    assert_eq!(Amp::default_for(Device::Cuda), Amp::O2);
    assert_eq!(Amp::default_for(Device::Cpu), Amp::O0);
    assert_eq!(LossScaler::for_amp(Amp::O0), LossScaler::None);
    for amp in [Amp::O2, Amp::O3] {
        assert!(matches!(
            LossScaler::for_amp(amp),
            LossScaler::Dynamic { .. }
        ));
    }
}

#[test]
fn resolve_device_without_a_gpu_is_a_clear_error_and_auto_falls_back() {
    if cuda_probe().is_ok() {
        eprintln!("skipped: a GPU is present (this test covers machines without one)");
        return;
    }
    let err = resolve_device(Device::Cuda).unwrap_err().to_string();
    assert!(
        err.contains("CUDA") || err.contains("GPU") || err.contains("nvrtc"),
        "unclear message: {err}"
    );
    assert_eq!(resolve_device(Device::Auto).unwrap(), Device::Cpu);
    assert_eq!(resolve_device(Device::Cpu).unwrap(), Device::Cpu);
}

#[test]
fn building_the_cuda_trainer_without_a_gpu_is_an_error_not_a_panic() {
    if cuda_probe().is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let (plan, _) = build("tiny", 2, 32);
    let model = ModelState::init(&plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    for amp in [Amp::O0, Amp::O2, Amp::O3] {
        let trainer = CudaTrainer::new(plan.clone(), model.clone(), optim.clone(), amp);
        assert!(trainer.is_err(), "{amp:?}");
        let infer = CudaTrainer::for_inference(plan.clone(), model.clone(), optim.clone(), amp);
        assert!(infer.is_err(), "{amp:?}");
    }
    let cpu_o2 = backend::build(Device::Cpu, Amp::O2, plan, model, optim);
    assert!(cpu_o2.err().unwrap().to_string().contains("CUDA"));
    let resolved = backend::resolve_amp(Device::Cpu, Some(Amp::O3));
    assert!(resolved.unwrap_err().to_string().contains("CUDA"));
    assert_eq!(backend::resolve_amp(Device::Cuda, None).unwrap(), Amp::O2);
}

#[test]
fn whole_tiny_step_matches_the_cpu_on_a_gpu() {
    if cuda_probe().is_err() {
        eprintln!("skipped: no usable GPU (run `selftest --device cuda` on the GPU machine)");
        return;
    }
    use inception_engine::gpu::check::Status;
    use inception_engine::gpu::KernelPaths;
    use inception_engine::plan::models;
    use inception_engine::selftest::step::{self, StepCase, LEVELS};
    let tiny = StepCase::of(models::find("tiny").unwrap(), false);
    let paths = [KernelPaths::LEAN, KernelPaths::BASELINE];
    let checks = step::run_case(tiny, &LEVELS, 1, &paths).unwrap();
    for c in &checks {
        assert_eq!(c.status, Status::Pass, "{c:?}");
    }
}

#[test]
fn mismatched_model_or_optimizer_state_is_an_error_not_a_panic() {
    let (plan, _) = build("tiny", 2, 32);
    let layout = ParamLayout::new(&plan);
    let model = ModelState::init(&plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    check_state(&plan, &layout, &model, &optim).unwrap();
    let mut short_mom = optim.clone();
    short_mom.mom.pop();
    assert!(check_state(&plan, &layout, &model, &short_mom).is_err());
    let mut long_decay = optim.clone();
    long_decay
        .decay
        .push((layout.param_len..layout.param_len + 4, true));
    assert!(check_state(&plan, &layout, &model, &long_decay).is_err());
    let mut short_params = model.clone();
    short_params.params.pop();
    assert!(check_state(&plan, &layout, &short_params, &optim).is_err());
    let mut short_states = model;
    short_states.states.pop();
    assert!(check_state(&plan, &layout, &short_states, &optim).is_err());
}

#[test]
fn batches_are_checked_before_staging() {
    let (plan, _) = build("tiny", 2, 32);
    let images = vec![0.0; plan.tensor(plan.input).numel()];
    check_batch(&plan, images.len(), Some(&[0, 9])).unwrap();
    check_batch(&plan, images.len(), None).unwrap();
    assert!(check_batch(&plan, images.len() - 1, None).is_err());
    assert!(check_batch(&plan, images.len(), Some(&[0])).is_err());
    // 10 classes: label 10 would make softmax-CE train on garbage without an error.
    let err = check_batch(&plan, images.len(), Some(&[0, 10])).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}
