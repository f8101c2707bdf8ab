//! Self-test case of the standalone ReLU launchers, against this folder's CPU reference.

use anyhow::Result;

use super::cuda::{ReluBackward, ReluForward};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Forward, and backward accumulating onto existing values.
    pub fn relu(&mut self, count: usize) -> Result<()> {
        let x = self.random(count, 1.0);
        let prev = self.random(count, 1.0);
        let dy = self.random(count, 1.0);
        let (xb, y) = (self.act(&x)?, self.poisoned_act(count)?);
        ReluForward {
            count,
            x: xb.ptr(),
            y: y.ptr(),
        }
        .launch(self.dev)?;
        let got_y = self.read(&y)?;
        let mut want_y = vec![0.0; count];
        super::forward(&x, &mut want_y);
        let (label, tol) = (format!("{count}"), self.tol());
        let name = self.at_level("relu_fwd");
        self.record(&name, &label, "cpu", &got_y, Some(&want_y), tol);
        let (dyb, dx) = (self.act(&dy)?, self.act(&prev)?);
        let (y_ptr, dy_ptr, dx_ptr) = (y.ptr(), dyb.ptr(), dx.ptr());
        ReluBackward {
            count,
            y: y_ptr,
            dy: dy_ptr,
            dx: dx_ptr,
            accumulate: true,
        }
        .launch(self.dev)?;
        let got_dx = self.read(&dx)?;
        let mut want_dx = prev.clone();
        super::backward(&want_y, &dy, &mut want_dx, true);
        let name = self.at_level("relu_bwd");
        self.record(&name, &label, "cpu", &got_dx, Some(&want_dx), tol);
        Ok(())
    }
}
