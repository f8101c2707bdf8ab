//! The CPU training backend: the reference executor plus the host RMSProp.

use super::executor::{CpuExecutor, Mode};
use crate::backend::{Backend, Images, StepOutcome};
use crate::dist::GradReducer;
use crate::optim::{has_overflow, LossScaler, RmsProp};
use crate::params::ModelState;
use crate::plan::Plan;
use anyhow::{bail, Result};
use std::rc::Rc;

pub struct CpuTrainer {
    exec: CpuExecutor,
    model: ModelState,
    optim: RmsProp,
    grads: Vec<f32>,
    /// Sums the gradients over the ranks of a distributed run (None: one process).
    reducer: Option<Rc<dyn GradReducer>>,
}

impl CpuTrainer {
    pub fn new(plan: Plan, model: ModelState, optim: RmsProp) -> Result<Self> {
        let exec = CpuExecutor::new(plan);
        if model.params.len() != exec.param_len()
            || model.states.len() != exec.state_len()
            || optim.len() != exec.param_len()
        {
            bail!(
                "the model state does not fit the plan '{}'",
                exec.plan().name
            );
        }
        let grads = vec![0.0; exec.param_len()];
        Ok(CpuTrainer {
            exec,
            model,
            optim,
            grads,
            reducer: None,
        })
    }

    /// Data-parallel training: every step sums the gradients over the ranks with `reducer`
    /// before the overflow check and the update, and the update divides by the world size.
    pub fn with_reducer(mut self, reducer: Rc<dyn GradReducer>) -> Self {
        self.reducer = Some(reducer);
        self
    }

    pub fn executor_mut(&mut self) -> &mut CpuExecutor {
        &mut self.exec
    }
}

impl Backend for CpuTrainer {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn train_step(
        &mut self,
        images: Images<'_>,
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<Vec<StepOutcome>> {
        // The CPU asks for f32 batches (its packing normalises); a u8 batch is normalised here.
        let images = images.to_f32();
        let images = &images[..];
        // The scale these gradients carry; `update` may change the scaler for the next step.
        let scale = scaler.scale();
        let loss = self.exec.forward(
            &self.model.params,
            &mut self.model.states,
            images,
            labels,
            Mode::Train,
            step,
        );
        self.exec
            .backward(&self.model.params, &mut self.grads, scale);
        // Reduced before the overflow check, so every rank sees the same sum and skips the
        // same steps; the mean's 1/world rides on the unscale factor instead of its own pass.
        let world = match &self.reducer {
            Some(r) => {
                r.all_reduce_sum(&mut self.grads)?;
                r.world()
            }
            None => 1,
        };
        let overflow = scaler.checks_overflow() && has_overflow(&self.grads);
        let decision = scaler.update(overflow);
        if !decision.skip {
            self.optim.step(
                &mut self.model.params,
                &self.grads,
                lr,
                1.0 / (scale * world as f32),
            );
        }
        Ok(vec![StepOutcome {
            step,
            loss,
            skipped: decision.skip,
            scale_changed: decision.scale_changed,
        }])
    }

    fn infer(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        let labels = vec![0; self.exec.plan().batch()];
        self.exec.forward(
            &self.model.params,
            &mut self.model.states,
            images,
            &labels,
            Mode::Eval,
            0,
        );
        Ok(self.exec.logits().to_vec())
    }

    fn state(&mut self) -> Result<(ModelState, RmsProp)> {
        Ok((self.model.clone(), self.optim.clone()))
    }

    fn bn_states(&mut self) -> Result<Vec<f32>> {
        Ok(self.model.states.clone())
    }

    fn set_bn_states(&mut self, states: &[f32]) -> Result<()> {
        if states.len() != self.model.states.len() {
            bail!(
                "{} BN statistics given for {}",
                states.len(),
                self.model.states.len()
            );
        }
        self.model.states.copy_from_slice(states);
        Ok(())
    }
}
