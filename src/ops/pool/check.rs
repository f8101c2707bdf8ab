//! Self-test case of the pool launchers: forward and backward of one max or average pool shape
//! against the CPU reference in this folder.

use anyhow::Result;

use super::cuda::{PoolBackward, PoolForward};
use super::PoolShape;
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

/// The CPU pool forward.
pub fn reference_forward(s: &PoolShape, max: bool, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; s.n * s.oh() * s.ow() * s.c];
    match max {
        true => super::max_forward(s, x, &mut y),
        false => super::avg_forward(s, x, &mut y),
    }
    y
}

/// The CPU pool backward (overwriting).
pub fn reference_backward(s: &PoolShape, max: bool, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    match max {
        true => super::max_backward(s, x, dy, &mut dx, false),
        false => super::avg_backward(s, dy, &mut dx, false),
    }
    dx
}

impl SelfTest<'_> {
    /// Forward and backward of one max or average pool shape.
    pub fn pool(&mut self, s: &PoolShape, max: bool) -> Result<()> {
        let x = self.random(s.n * s.h * s.w * s.c, 1.0);
        let dy = self.random(s.n * s.oh() * s.ow() * s.c, 1.0);
        let (xb, dyb) = (self.act(&x)?, self.act(&dy)?);
        let (y, dx) = (self.poisoned_act(dy.len())?, self.poisoned_act(x.len())?);
        let (s, xp) = (*s, xb.ptr());
        let (ldy, yoff) = (s.c, 0);
        PoolForward {
            s,
            max,
            x: xp,
            y: y.ptr(),
            ldy,
            yoff,
        }
        .launch(self.dev)?;
        let bwd = PoolBackward {
            s,
            max,
            x: xp,
            dy: dyb.ptr(),
            ldy,
            yoff,
            dx: dx.ptr(),
            accumulate: false,
        };
        bwd.launch(self.dev)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let kind = if max { "maxpool" } else { "avgpool" };
        let tol = self.tol();
        let p = s.pool;
        let label = format!(
            "n{} {}x{}x{} k{} s{} p{}",
            s.n, s.h, s.w, s.c, p.k, p.stride, p.pad
        );
        let name = self.at_level(&format!("{kind}_fwd"));
        let want_y = reference_forward(&s, max, &x);
        self.record(&name, &label, "cpu", &got_y, Some(&want_y), tol);
        let name = self.at_level(&format!("{kind}_bwd"));
        let want_dx = reference_backward(&s, max, &x, &dy);
        self.record(&name, &label, "cpu", &got_dx, Some(&want_dx), tol);
        Ok(())
    }
}
