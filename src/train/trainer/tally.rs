//! The running loss tally of an epoch (saved in mid-epoch checkpoints) and the interval records
//! of metrics.jsonl, written as the steps' outcomes settle.

// The trainer's types and imports (this is part of its module).
use super::*;

/// A [`Tally`] as a checkpoint stores it (JSON has no NaN).
#[derive(Serialize, Deserialize)]
pub(super) struct TallyState {
    pub(super) sum: f64,
    pub(super) count: usize,
    pub(super) last_loss: Option<f32>,
}

impl From<&Tally> for TallyState {
    fn from(t: &Tally) -> Self {
        TallyState {
            sum: t.sum,
            count: t.count,
            last_loss: t.last_loss.is_finite().then_some(t.last_loss),
        }
    }
}

impl From<TallyState> for Tally {
    fn from(t: TallyState) -> Self {
        Tally {
            sum: t.sum,
            count: t.count,
            last_loss: t.last_loss.unwrap_or(f32::NAN),
            ..Tally::default()
        }
    }
}

/// The losses of an epoch's settled steps, with the checks each outcome gets.
#[derive(Clone)]
pub(super) struct Tally {
    pub(super) sum: f64,
    pub(super) count: usize,
    pub(super) last_loss: f32,
    /// Losses since the last metrics line (not kept in a checkpoint: the next line after a
    /// resume covers the steps since the resume).
    pub(super) interval_sum: f64,
    pub(super) interval_count: usize,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sum: 0.0,
            count: 0,
            last_loss: f32::NAN,
            interval_sum: 0.0,
            interval_count: 0,
        }
    }
}

impl Tally {
    /// Logs a scale change, stops on a non-finite loss that was not skipped, and counts the loss
    /// of every applied step.
    pub(super) fn record(
        &mut self,
        out: StepOutcome,
        log: &mut RunLog,
        epoch: usize,
        last_ckpt: Option<&Path>,
    ) -> Result<()> {
        let step = out.step + 1;
        if let Some((old, new)) = out.scale_changed {
            say!("step {step}: loss scale {old} -> {new}");
            log.metrics(json!({"event": "loss_scale", "step": step, "from": old, "to": new}))?;
        }
        if !out.loss.is_finite() && !out.skipped {
            let kept = last_ckpt
                .map(|p| format!("; the last good checkpoint is {}", p.display()))
                .unwrap_or_default();
            bail!(
                "the loss became {} at step {step} (epoch {epoch}): stopping{kept}",
                out.loss
            );
        }
        if !out.skipped {
            self.sum += out.loss as f64;
            self.count += 1;
            self.last_loss = out.loss;
            self.interval_sum += out.loss as f64;
            self.interval_count += 1;
        }
        Ok(())
    }

    /// The mean loss of the steps settled since the last call (None if there were none).
    pub(super) fn take_interval(&mut self) -> Option<f64> {
        let mean =
            (self.interval_count > 0).then(|| self.interval_sum / self.interval_count as f64);
        self.interval_sum = 0.0;
        self.interval_count = 0;
        mean
    }
}

/// Where an epoch's interval records go: every `log_every`-th step counted from the epoch's first
/// step.
pub(super) struct Intervals<'a> {
    pub(super) log_every: usize,
    pub(super) schedule: &'a Schedule,
    pub(super) epoch: usize,
    pub(super) first_step: u64,
}

impl Intervals<'_> {
    /// Takes in settled outcomes: the tally's checks, then, for every `log_every`-th step, its
    /// "step" record with its own step number, loss and learning rate and the mean loss of the
    /// interval's settled steps. The record is written when the outcome settles: on CUDA a step's
    /// outcome arrives during the next step, so the loop's current values would be one step off
    /// (and the first step's loss missing).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &self,
        outcomes: Vec<StepOutcome>,
        tally: &mut Tally,
        log: &mut RunLog,
        scale: f32,
        last_ckpt: Option<&Path>,
        ips: f64,
    ) -> Result<()> {
        for out in outcomes {
            tally.record(out, log, self.epoch, last_ckpt)?;
            if !(out.step - self.first_step + 1).is_multiple_of(self.log_every as u64) {
                continue;
            }
            let mean = tally.take_interval();
            log.metrics(json!({"event": "step", "epoch": self.epoch, "step": out.step + 1, "loss": out.loss, "skipped": out.skipped, "mean_loss": mean, "lr": self.schedule.lr(out.step), "loss_scale": scale, "images_per_sec": ips}))?;
        }
        Ok(())
    }
}
