//! The u8 batch upload of `KernelPaths::u8_input`: a copy stream, two pinned host images and two
//! device images (double buffering), and the events that order them against the compute stream.
//!
//! Step k uses buffer `i = k % 2`. The host refills pinned image `i` once its previous upload
//! (step k - 2's) has finished; the copy stream waits until the compute stream has finished
//! reading device image `i` (the normalisation of step k - 2), uploads, and records `uploaded`;
//! the compute stream waits for that event, normalises device image `i` into the trainer's f32
//! staging image (`bufs.images`, which the step's calls or graph read) and records `consumed`.
//! So batch k + 1 crosses the bus on the copy stream while step k computes, a quarter of the
//! f32 bytes. The normalisation runs outside the captured graph: the graph replays the
//! program's calls only, on fixed addresses, and the u8 image it reads alternates.

use anyhow::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use rayon::prelude::*;
use std::sync::Arc;

use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::ops::normalize::cuda::NormalizeU8;
use crate::ops::normalize::Factors;

/// One of the two image buffers and its events.
struct Slot {
    host: PinnedHostSlice<u8>,
    device: CudaSlice<u8>,
    /// Recorded on the copy stream after the upload: the host may refill `host`, the compute
    /// stream may read `device`, once it fires.
    uploaded: CudaEvent,
    /// Recorded on the compute stream after the normalisation read `device`.
    consumed: CudaEvent,
}

pub struct U8Staging {
    copy: Arc<CudaStream>,
    slots: [Slot; 2],
    /// The slot the next batch goes to.
    next: usize,
}

impl U8Staging {
    /// Buffers for batches of `count` u8 values.
    pub fn new(dev: &CudaDevice, count: usize) -> Result<Self> {
        let copy = dev.stream.fork()?;
        let slot = || -> Result<Slot> {
            let event = || {
                dev.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            };
            let (uploaded, consumed) = (event()?, event()?);
            // Both events start recorded, so the first waits on them return at once.
            uploaded.record(&copy)?;
            consumed.record(&dev.stream)?;
            Ok(Slot {
                // SAFETY: the host writes the buffer before any copy reads it.
                host: unsafe { dev.ctx.alloc_pinned(count)? },
                device: copy.alloc_zeros(count)?,
                uploaded,
                consumed,
            })
        };
        let slots = [slot()?, slot()?];
        copy.synchronize()?;
        Ok(Self {
            copy,
            slots,
            next: 0,
        })
    }

    /// Queues the upload of `pixels` on the copy stream and, on the compute stream after it, the
    /// normalisation into the f32 image at `dst`. Returns without waiting unless the pinned
    /// buffer's previous upload (two batches ago) is still running.
    pub fn stage(
        &mut self,
        dev: &CudaDevice,
        pixels: &[u8],
        norm: Factors,
        dst: DevPtr,
    ) -> Result<()> {
        let slot = &mut self.slots[self.next];
        self.next = 1 - self.next;
        slot.uploaded.synchronize()?;
        let host = slot.host.as_mut_slice()?;
        host.par_chunks_mut(1 << 18)
            .zip(pixels.par_chunks(1 << 18))
            .for_each(|(d, s)| d.copy_from_slice(s));
        self.copy.wait(&slot.consumed)?;
        self.copy.memcpy_htod(&slot.host, &mut slot.device)?;
        slot.uploaded.record(&self.copy)?;
        dev.stream.wait(&slot.uploaded)?;
        NormalizeU8 {
            src: slot.device.device_ptr(&dev.stream).0,
            count: pixels.len(),
            factors: norm,
            dst,
        }
        .launch(dev)?;
        slot.consumed.record(&dev.stream)?;
        Ok(())
    }

    /// Waits for both streams' staging work (before the buffers are freed).
    pub fn synchronize(&self) -> Result<()> {
        self.copy.synchronize()?;
        Ok(())
    }
}
