//! The CUDA trainer's allocations: every device buffer of a step (allocated once, zeroed), the
//! pinned host buffers of the async copies and step reports, the memory checks that turn an
//! out-of-memory into a clear error quoting the plan's estimate, and the checks that a model
//! state or a batch fits those buffers before anything is copied into them.

use anyhow::{bail, Result};
use cudarc::driver::sys::{CUevent_flags, CUresult};
use cudarc::driver::{
    CudaEvent, CudaSlice, DevicePtr, DeviceRepr, DriverError, PinnedHostSlice, ValidAsZeroBits,
};
use half::f16;

use super::arena::{self, MemoryEstimate, ParamSlots};
use super::layout::{Ptrs, REPORT_WORDS};
use crate::gpu::CudaDevice;
use crate::optim::RmsProp;
use crate::params::{ModelState, ParamLayout};
use crate::plan::memory::MemoryPlan;
use crate::plan::Plan;

/// Every device buffer of a training step.
pub struct DeviceBuffers {
    pub arena: CudaSlice<u8>,
    pub master: CudaSlice<f32>,
    pub w16: CudaSlice<f16>,
    pub grads: CudaSlice<f32>,
    pub ms: CudaSlice<f32>,
    pub mom: CudaSlice<f32>,
    pub decay: CudaSlice<u8>,
    pub states: CudaSlice<f32>,
    pub ws: CudaSlice<f32>,
    pub images: CudaSlice<f32>,
    pub labels: CudaSlice<f32>,
    pub row_loss: CudaSlice<f32>,
    pub report: CudaSlice<u32>,
    pub stem: Option<(CudaSlice<f16>, CudaSlice<f16>)>,
}

/// Pinned host buffers: the async input copies and the step report, with our own events. cudarc
/// records its pinned-buffer events only when a context runs several streams, and this backend
/// uses one, so the waits are explicit here.
pub struct Pinned {
    pub images: PinnedHostSlice<f32>,
    pub labels: PinnedHostSlice<f32>,
    /// Two report slots, each with the event recorded after its copy (valid once it fires):
    /// under dynamic scaling step k's report is read while step k + 1 runs.
    pub reports: [(PinnedHostSlice<u32>, CudaEvent); 2],
    /// Recorded after the uploads of a batch: the host may refill the input buffers once it fires.
    pub inputs_read: CudaEvent,
}

impl DeviceBuffers {
    pub fn alloc(
        be: &CudaDevice,
        plan: &Plan,
        mem: &MemoryPlan,
        params: &ParamSlots,
        states: &ParamSlots,
        ws_elems: usize,
        train: bool,
    ) -> std::result::Result<Self, DriverError> {
        let stem = match arena::stem_padded_elems(plan) {
            Some((x, w)) => Some((zeros(be, x)?, zeros(be, w)?)),
            None => None,
        };
        // Inference allocates no gradient or optimizer buffers (one element, never touched).
        let opt_len = if train { params.len } else { 1 };
        Ok(DeviceBuffers {
            arena: zeros(be, mem.peak_bytes)?,
            master: zeros(be, params.len)?,
            w16: zeros(be, params.len)?,
            grads: zeros(be, opt_len)?,
            ms: zeros(be, opt_len)?,
            mom: zeros(be, opt_len)?,
            decay: zeros(be, opt_len)?,
            states: zeros(be, states.len)?,
            ws: zeros(be, ws_elems)?,
            images: zeros(be, plan.tensor(plan.input).numel())?,
            labels: zeros(be, plan.batch())?,
            row_loss: zeros(be, plan.batch())?,
            report: zeros(be, REPORT_WORDS)?,
            stem,
        })
    }

    pub fn ptrs(&self, be: &CudaDevice) -> Ptrs {
        let s = &be.stream;
        Ptrs {
            arena: self.arena.device_ptr(s).0,
            master: self.master.device_ptr(s).0,
            w16: self.w16.device_ptr(s).0,
            grads: self.grads.device_ptr(s).0,
            ms: self.ms.device_ptr(s).0,
            mom: self.mom.device_ptr(s).0,
            decay: self.decay.device_ptr(s).0,
            states: self.states.device_ptr(s).0,
            ws: self.ws.device_ptr(s).0,
            images: self.images.device_ptr(s).0,
            labels: self.labels.device_ptr(s).0,
            row_loss: self.row_loss.device_ptr(s).0,
            report: self.report.device_ptr(s).0,
            stem: self
                .stem
                .as_ref()
                .map(|(x, w)| (x.device_ptr(s).0, w.device_ptr(s).0)),
        }
    }
}

impl Pinned {
    pub fn alloc(be: &CudaDevice, plan: &Plan) -> Result<Self> {
        let ctx = &be.ctx;
        // SAFETY: the buffers are written by the host before any copy reads them. The input
        // buffers are write-combined (the host only writes them); the report is read by the host,
        // so it is plain page-locked memory.
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC));
        let report = || -> Result<_> {
            Ok((
                unsafe { ctx.alloc_pinned_with_flags(REPORT_WORDS, 0)? },
                event()?,
            ))
        };
        unsafe {
            Ok(Pinned {
                images: ctx.alloc_pinned(plan.tensor(plan.input).numel())?,
                labels: ctx.alloc_pinned(plan.batch())?,
                reports: [report()?, report()?],
                inputs_read: event()?,
            })
        }
    }
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaDevice,
    len: usize,
) -> std::result::Result<CudaSlice<T>, DriverError> {
    be.stream.alloc_zeros::<T>(len.max(1))
}

/// Refuses up front when the card has less free memory than the estimate.
pub fn check_free_memory(be: &CudaDevice, plan: &Plan, est: &MemoryEstimate) -> Result<()> {
    let (free, total) = be.ctx.mem_get_info()?;
    if est.total() > free {
        bail!(
            "not enough device memory for plan '{}' at batch {}: the step needs about {}, the GPU \
             has {:.0} MiB free of {:.0} MiB; use a smaller --batch-size",
            plan.name,
            plan.batch(),
            est.describe(),
            free as f64 / (1 << 20) as f64,
            total as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// An allocation failure, with the plan's estimate when the device ran out of memory.
pub fn oom_error(e: DriverError, plan: &Plan, est: &MemoryEstimate) -> anyhow::Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        anyhow::anyhow!(
            "out of device memory allocating plan '{}' at batch {}: the step needs about {}; use a \
             smaller --batch-size",
            plan.name,
            plan.batch(),
            est.describe()
        )
    } else {
        anyhow::anyhow!("device allocation failed: {e:?}")
    }
}

/// Checks that a model and optimizer state fit the plan's layout (every buffer the upload
/// scatters), so a mismatch is an error rather than an out-of-range panic.
pub fn check_state(
    plan: &Plan,
    layout: &ParamLayout,
    model: &ModelState,
    optim: &RmsProp,
) -> Result<()> {
    let n = layout.param_len;
    let fits = model.layout == *layout
        && model.params.len() == n
        && model.states.len() == layout.state_len
        && optim.ms.len() == n
        && optim.mom.len() == n
        && optim
            .decay
            .iter()
            .all(|(r, _)| r.start <= r.end && r.end <= n);
    if !fits {
        bail!("the model state does not fit the plan '{}'", plan.name);
    }
    Ok(())
}

/// Checks a batch against the plan before it is staged: the image and label counts, and labels
/// inside the class range (softmax-CE would silently train on an out-of-range label).
pub fn check_batch(plan: &Plan, values: usize, labels: Option<&[u32]>) -> Result<()> {
    if values != plan.tensor(plan.input).numel() {
        bail!(
            "image batch has {} values, plan '{}' takes {}",
            values,
            plan.name,
            plan.tensor(plan.input).numel()
        );
    }
    let Some(labels) = labels else {
        return Ok(());
    };
    if labels.len() != plan.batch() {
        bail!(
            "label batch has {} labels, plan '{}' takes {}",
            labels.len(),
            plan.name,
            plan.batch()
        );
    }
    let classes = *plan.shape(plan.logits).last().unwrap_or(&0);
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} is out of range for {classes} classes");
    }
    Ok(())
}
