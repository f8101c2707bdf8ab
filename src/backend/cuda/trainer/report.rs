//! A training step's report: its `REPORT_WORDS` words (loss, overflow flag, loss scale, clean-step
//! count) copied after the step's last launch into one of two pinned slots and read a step later,
//! so the GPU never waits for the host; under dynamic scaling the host's scaler replays the
//! reported flags and must land where the device's did.

use anyhow::{bail, Result};

use super::super::layout::{REPORT_CLEAN, REPORT_LOSS, REPORT_OVERFLOW, REPORT_SCALE};
use super::CudaTrainer;
use crate::backend::StepOutcome;
use crate::optim::LossScaler;

/// A step whose report has not been read yet.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pending {
    pub step: u64,
    pub slot: usize,
    /// Run under dynamic scaling (its overflow flag drives the scaler).
    pub dynamic: bool,
}

/// What a step report says.
struct Report {
    loss: f32,
    overflow: bool,
    scale: f32,
    clean: u32,
}

impl CudaTrainer {
    /// Queues the copy of the step report to pinned slot `slot`, in stream order.
    pub(super) fn queue_report(&mut self, slot: usize) -> Result<()> {
        let s = self.dev.stream.clone();
        let (host, written) = &mut self.pinned.reports[slot];
        s.memcpy_dtoh(&self.bufs.report, host)?;
        written.record(&s)?;
        Ok(())
    }

    /// Waits for the last report copied to `slot` (not for later work).
    fn read_report(&self, slot: usize) -> Result<Report> {
        let (host, written) = &self.pinned.reports[slot];
        written.synchronize()?;
        let r = host.as_slice()?;
        Ok(Report {
            loss: f32::from_bits(r[REPORT_LOSS]),
            overflow: r[REPORT_OVERFLOW] != 0,
            scale: f32::from_bits(r[REPORT_SCALE]),
            clean: r[REPORT_CLEAN],
        })
    }

    /// Starts the device scaler from the host's state (nothing may be in flight: the device
    /// would otherwise continue from its own, newer state).
    pub(super) fn upload_scaler(&mut self, scaler: &LossScaler) -> Result<()> {
        let LossScaler::Dynamic {
            scale, clean_steps, ..
        } = *scaler
        else {
            return Ok(());
        };
        let words = [scale.to_bits(), clean_steps];
        let mut dst = self.bufs.report.slice_mut(REPORT_SCALE..REPORT_CLEAN + 1);
        self.dev.stream.memcpy_htod(&words, &mut dst)?;
        Ok(())
    }

    /// Reads the report of the pending step. Under dynamic scaling it replays the overflow flag on
    /// the host scaler and checks that the host lands where the device did.
    pub(super) fn settle_pending(
        &mut self,
        scaler: &mut LossScaler,
    ) -> Result<Option<StepOutcome>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let r = self.read_report(p.slot)?;
        if !p.dynamic {
            return Ok(Some(StepOutcome {
                step: p.step,
                loss: r.loss,
                skipped: false,
                scale_changed: None,
            }));
        }
        let decision = scaler.update(r.overflow);
        let host = match *scaler {
            LossScaler::Dynamic {
                scale, clean_steps, ..
            } => (scale, clean_steps),
            _ => bail!("the loss scaler changed kind while a dynamic-scaling step was in flight"),
        };
        if host != (r.scale, r.clean) {
            bail!(
                "after step {} the device loss scaler holds scale {} (clean steps {}) but the host \
                 holds {} ({})",
                p.step,
                r.scale,
                r.clean,
                host.0,
                host.1
            );
        }
        Ok(Some(StepOutcome {
            step: p.step,
            loss: r.loss,
            skipped: decision.skip,
            scale_changed: decision.scale_changed,
        }))
    }
}
