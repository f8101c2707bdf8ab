//! The CPU training backend: the reference executor plus the host RMSProp.

use super::executor::{CpuExecutor, Mode};
use crate::backend::{Backend, StepOutcome};
use crate::optim::{has_overflow, LossScaler, RmsProp};
use crate::params::ModelState;
use crate::plan::Plan;
use anyhow::{bail, Result};

pub struct CpuTrainer {
    exec: CpuExecutor,
    model: ModelState,
    optim: RmsProp,
    grads: Vec<f32>,
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
        })
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
        images: &[f32],
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<Vec<StepOutcome>> {
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
        let overflow = scaler.checks_overflow() && has_overflow(&self.grads);
        let decision = scaler.update(overflow);
        if !decision.skip {
            self.optim
                .step(&mut self.model.params, &self.grads, lr, 1.0 / scale);
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
}
