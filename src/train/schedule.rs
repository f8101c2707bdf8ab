//! The learning-rate schedule of the recipe (facts.md section 2): linear warmup from `lr_init`
//! to `lr_max`, then cosine decay to `lr_end`, evaluated per global step.
//!
//! The rate is a pure function of the global step, so resuming at any step needs no special
//! case (MindSpore slices its precomputed array instead, which gives the same values).

/// The base learning rate for a global batch: 0.4 at 1024, scaled linearly.
pub fn lr_max_for_batch(global_batch: usize) -> f32 {
    (0.4 * global_batch as f64 / 1024.0) as f32
}

/// Warmup + cosine schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr_init: f32,
    pub lr_max: f32,
    pub lr_end: f32,
    pub warmup_epochs: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
}

impl Schedule {
    /// The recipe's defaults (lr_init 4e-5, lr_end 4e-6, warmup 1 epoch) with `lr_max` scaled
    /// to `global_batch`.
    pub fn for_batch(global_batch: usize, steps_per_epoch: usize, epochs: usize) -> Self {
        Schedule {
            lr_init: 4e-5,
            lr_max: lr_max_for_batch(global_batch),
            lr_end: 4e-6,
            warmup_epochs: 1,
            steps_per_epoch,
            epochs,
        }
    }

    pub fn total_steps(&self) -> u64 {
        (self.steps_per_epoch * self.epochs) as u64
    }

    pub fn warmup_steps(&self) -> u64 {
        (self.steps_per_epoch * self.warmup_epochs) as u64
    }

    /// The learning rate of global step `step` (0-based), computed in f64 like the recipe's
    /// Python and rounded to f32 once. Steps past the end stay at `lr_end`.
    pub fn lr(&self, step: u64) -> f32 {
        let (init, max, end) = (self.lr_init as f64, self.lr_max as f64, self.lr_end as f64);
        let (warm, total) = (self.warmup_steps(), self.total_steps());
        let lr = if step < warm {
            init + (max - init) / warm as f64 * (step + 1) as f64
        } else if step >= total {
            end
        } else {
            let progress = (step - warm) as f64 / (total - warm) as f64;
            end + (max - end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        lr as f32
    }
}
