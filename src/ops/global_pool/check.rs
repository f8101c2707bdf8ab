//! Self-test case of the global average pool launchers, against this folder's CPU reference.

use anyhow::Result;

use super::cuda::{GlobalAvgPoolBackward, GlobalAvgPoolForward};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Forward and backward over [n, hw, c].
    pub fn global_avgpool(&mut self, n: usize, hw: usize, c: usize) -> Result<()> {
        let x = self.random(n * hw * c, 1.0);
        let dy = self.random(n * c, 1.0);
        let (xb, dyb) = (self.act(&x)?, self.act(&dy)?);
        let (y, dx) = (self.poisoned_act(n * c)?, self.poisoned_act(n * hw * c)?);
        GlobalAvgPoolForward {
            n,
            hw,
            c,
            x: xb.ptr(),
            y: y.ptr(),
        }
        .launch(self.dev)?;
        let (dy_ptr, dx_ptr) = (dyb.ptr(), dx.ptr());
        let bwd = GlobalAvgPoolBackward {
            n,
            hw,
            c,
            dy: dy_ptr,
            dx: dx_ptr,
            accumulate: false,
        };
        bwd.launch(self.dev)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let mut want_y = vec![0.0; n * c];
        super::forward(&x, n, hw, c, &mut want_y);
        let mut want_dx = vec![0.0; n * hw * c];
        super::backward(&dy, n, hw, c, &mut want_dx, false);
        let (label, tol) = (format!("n{n} {hw}px {c}ch"), self.tol());
        let name = self.at_level("global_avgpool_fwd");
        self.record(&name, &label, "cpu", &got_y, Some(&want_y), tol);
        let name = self.at_level("global_avgpool_bwd");
        self.record(&name, &label, "cpu", &got_dx, Some(&want_dx), tol);
        Ok(())
    }
}
