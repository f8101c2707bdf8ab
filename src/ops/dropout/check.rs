//! Self-test case of the dropout launchers: the forward's mask must match the CPU reference bit
//! for bit, and the backward must apply the same mask. The forward takes the step as an argument
//! and the backward reads it from device memory (as a step replayed from a CUDA graph does), so
//! the comparison also proves the two ways of passing it agree.

use anyhow::Result;

use super::cuda::{DropoutBackward, DropoutForward};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Forward against the CPU; backward checked as: backward of dy = x equals forward of x.
    pub fn dropout(&mut self, count: usize, p: f32) -> Result<()> {
        let (seed, step) = (0x1234_5678_9abc_def0, 17);
        let x = self.random(count, 1.0);
        let xb = self.act(&x)?;
        let (y, dx) = (self.poisoned_act(count)?, self.poisoned_act(count)?);
        let xp = xb.ptr();
        let step_dev = self.buf(&[step])?;
        DropoutForward {
            count,
            p,
            seed,
            step,
            step_dev: 0,
            x: xp,
            y: y.ptr(),
        }
        .launch(self.dev)?;
        let bwd = DropoutBackward {
            count,
            p,
            seed,
            // Not the step: the kernel must read the one in device memory.
            step: step + 1,
            step_dev: step_dev.ptr,
            dy: xp,
            dx: dx.ptr(),
            accumulate: false,
        };
        bwd.launch(self.dev)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let label = format!("{count} p{p}");
        let mut want = vec![0.0; count];
        super::forward(&x, p, seed, step, &mut want);
        let (fwd, bwd) = (self.at_level("dropout_fwd"), self.at_level("dropout_bwd"));
        let tol = self.tol();
        self.record(&fwd, &label, "cpu", &got_y, Some(&want), tol);
        self.record(&bwd, &label, "dropout_fwd", &got_dx, Some(&got_y), 0.0);
        Ok(())
    }
}
