//! Where everything a CUDA step touches lives: [`StepLayout`] holds the plan, its step program
//! (program.rs), the fusion, the arena offsets, the parameter slots and the buffers' base
//! addresses, and answers "what is the device address of this tensor". calls.rs turns the program
//! into kernel calls over these addresses.

use anyhow::Result;
use std::collections::HashMap;

use super::arena::{self, ParamSlots};
use super::fusion::Fusion;
use super::program::{check_program, StepProgram};
use crate::gpu::{DevPtr, KernelPaths};
use crate::ops::softmax_ce::cuda::ScaleArg;
use crate::optim::RmsPropConfig;
use crate::params::ParamLayout;
use crate::plan::backward::{derive, BackwardPlan};
use crate::plan::memory::MemoryPlan;
use crate::plan::{Plan, TensorId};
use crate::precision::Amp;

/// Report words: the mean loss (f32 bits), the overflow flag, softmax-CE's block counter, the
/// device loss scaler's state (scale as f32 bits, clean steps) and BN's block counter.
pub const REPORT_LOSS: usize = 0;
pub const REPORT_OVERFLOW: usize = 1;
pub const REPORT_COUNTER: usize = 2;
pub const REPORT_SCALE: usize = 3;
pub const REPORT_CLEAN: usize = 4;
/// The vectorised BN reductions' ticket counter (zero between launches, as REPORT_COUNTER).
pub const REPORT_BN_COUNTER: usize = 5;
/// The step's own values in the same buffer, written by `step_args_set` before a step replayed
/// from a CUDA graph: the step number (a u64 over words 6 and 7, 8-byte aligned) and the
/// learning rate (f32 bits).
pub const ARG_STEP: usize = 6;
pub const ARG_LR: usize = 8;
pub const REPORT_WORDS: usize = 16;

/// Base addresses of the device buffers (the trainer's allocations), taken once: the calls
/// carry raw pointers. 0 where a buffer does not exist.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ptrs {
    pub arena: DevPtr,
    pub master: DevPtr,
    pub w16: DevPtr,
    pub grads: DevPtr,
    pub ms: DevPtr,
    pub mom: DevPtr,
    pub decay: DevPtr,
    pub states: DevPtr,
    pub ws: DevPtr,
    pub images: DevPtr,
    pub labels: DevPtr,
    pub row_loss: DevPtr,
    pub report: DevPtr,
    pub stem: Option<(DevPtr, DevPtr)>,
}

/// Per-step values the calls need.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs {
    pub train: bool,
    pub step: u64,
    pub lr: f32,
    /// The loss scale: a value, or the device scaler's (dynamic scaling).
    pub scale: ScaleArg,
    /// Dynamic scaling: the scaler's growth interval (the device checks overflow and updates it).
    pub growth: Option<u32>,
    /// The kernels read the step number and learning rate from device memory ([`ARG_STEP`],
    /// [`ARG_LR`]) rather than from their arguments: the calls then stay valid from step to
    /// step, as a captured CUDA graph needs.
    pub on_device: bool,
}

impl StepArgs {
    /// An inference pass.
    pub fn infer() -> Self {
        StepArgs {
            train: false,
            step: 0,
            lr: 0.0,
            scale: ScaleArg::Value(1.0),
            growth: None,
            on_device: false,
        }
    }
}

/// A plan's step program and where everything it touches lives.
pub struct StepLayout {
    pub plan: Plan,
    pub bwd: BackwardPlan,
    pub program: StepProgram,
    /// BN+ReLU fusion, the concat slices and the saved max-pool argmax the program and arena
    /// were built with.
    pub fusion: Fusion,
    pub amp: Amp,
    /// Which path of each leaner-step change the calls take (the device's).
    pub paths: KernelPaths,
    /// Padded device slots of the parameters and of the BN running statistics.
    pub params: ParamSlots,
    pub states: ParamSlots,
    /// Device element offset of each parameter and state tensor.
    slot_of: HashMap<TensorId, usize>,
    /// Byte offset of each arena tensor (None where this arena does not store it).
    pub offsets: Vec<Option<usize>>,
    /// The padded stem convolution, when the 3-channel stem is padded for the tensor cores.
    pub stem: Option<usize>,
    pub ws_elems: usize,
    pub optim: RmsPropConfig,
    /// Base addresses of the buffers; all 0 until the trainer has allocated them.
    pub ptr: Ptrs,
    /// Ranks whose gradients are summed into the buffer before the update (1 unless the
    /// trainer reduces over a data-parallel job): the update divides by it.
    pub world: usize,
}

impl StepLayout {
    /// Derives the step program, checks it and places the arena, for a training step (`train`)
    /// or inference only, on a GPU with `num_sms` SMs (the split-K workspace depends on it),
    /// with the kernel `paths` (the `pool_argmax` path adds arena tensors).
    /// Returns the arena's memory plan beside the layout.
    pub fn new(
        plan: Plan,
        amp: Amp,
        train: bool,
        num_sms: u32,
        optim: RmsPropConfig,
        paths: KernelPaths,
    ) -> Result<(Self, MemoryPlan)> {
        let bwd = derive(&plan);
        let mut fusion = Fusion::new(&plan, &bwd);
        if paths.pool_argmax {
            fusion = fusion.with_pool_argmax(&plan, &bwd);
        }
        // The stem is padded for the tensor cores, which O0 (fp32, plain kernels) never uses.
        let stem = arena::stem_conv(&plan).filter(|_| amp != Amp::O0);
        // Cheap, and it turns a program/plan mismatch into an error before anything launches.
        let program = StepProgram::new(&plan, &bwd, &fusion, stem);
        check_program(&plan, &bwd, &fusion, &program.train)?;
        let run = if train {
            &program.train
        } else {
            &program.infer
        };
        let mem = arena::arena_plan(&plan, &bwd, &fusion, run, amp, train);
        let layout = ParamLayout::new(&plan);
        let (params, states) = (
            ParamSlots::new(&layout.params),
            ParamSlots::new(&layout.states),
        );
        let slot_of = params
            .tensors
            .iter()
            .zip(&params.slots)
            .chain(states.tensors.iter().zip(&states.slots))
            .map(|(&t, s)| (t, s.1))
            .collect();
        let ws_elems = match train {
            true => arena::workspace_elems(&plan, num_sms),
            false => 1,
        };
        let step = StepLayout {
            offsets: arena::offsets(&plan, &mem, &fusion, amp),
            plan,
            bwd,
            program,
            fusion,
            amp,
            paths,
            params,
            states,
            slot_of,
            stem,
            ws_elems,
            optim,
            ptr: Ptrs::default(),
            world: 1,
        };
        Ok((step, mem))
    }

    pub fn report_word(&self, word: usize) -> DevPtr {
        self.ptr.report + 4 * word as u64
    }

    /// Where the dropout kernels read the step: in device memory when `a.on_device`, else 0 (the
    /// launch argument).
    pub(super) fn step_word(&self, a: StepArgs) -> DevPtr {
        if a.on_device {
            self.report_word(ARG_STEP)
        } else {
            0
        }
    }

    /// Address of an arena tensor (forward or gradient id); a slice's address is its first
    /// channel in its root.
    pub(super) fn t(&self, id: TensorId) -> DevPtr {
        let off = self.offsets[id].expect("tensor has an arena placement");
        self.ptr.arena + off as u64
    }

    /// Address of an arena tensor, or 0 (null) when this arena does not store it.
    pub(super) fn t_or_null(&self, id: TensorId) -> DevPtr {
        self.offsets[id].map_or(0, |off| self.ptr.arena + off as u64)
    }

    /// Row stride of an arena tensor in elements (a slice's is its root's channel count).
    pub fn ld(&self, id: TensorId) -> usize {
        self.fusion.ld(&self.plan, &self.bwd, id)
    }

    pub(super) fn slot(&self, id: TensorId) -> u64 {
        self.slot_of[&id] as u64
    }

    pub(super) fn w32(&self, id: TensorId) -> DevPtr {
        self.ptr.master + 4 * self.slot(id)
    }

    pub(super) fn w16(&self, id: TensorId) -> DevPtr {
        self.ptr.w16 + 2 * self.slot(id)
    }

    /// The copy of a conv or FC weight the kernels read: the fp16 working copy, or in O0 the fp32
    /// master itself.
    pub(super) fn weight(&self, id: TensorId) -> DevPtr {
        match self.amp {
            Amp::O0 => self.w32(id),
            _ => self.w16(id),
        }
    }

    /// The copy of a BN parameter the kernels read: fp16 in O3, fp32 otherwise.
    pub(super) fn bn_param(&self, id: TensorId) -> DevPtr {
        match self.amp {
            Amp::O3 => self.w16(id),
            _ => self.w32(id),
        }
    }

    pub(super) fn grad(&self, id: TensorId) -> DevPtr {
        self.ptr.grads + 4 * self.slot(id)
    }

    pub(super) fn state(&self, id: TensorId) -> DevPtr {
        self.ptr.states + 4 * self.slot(id)
    }
}
