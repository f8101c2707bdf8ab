//! Self-test case of the pool launchers: forward and backward of one max or average pool shape
//! against the CPU reference in this folder; max pools on both paths (`pool_argmax` off and on).

use anyhow::Result;

use super::cuda::{argmax_bytes, PoolBackward, PoolForward};
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
    /// Forward and backward of one max or average pool shape; a max pool on both paths (the
    /// baseline, then saving the argmax), whose input gradients must agree exactly.
    pub fn pool(&mut self, s: &PoolShape, max: bool) -> Result<()> {
        let x = self.random(s.n * s.h * s.w * s.c, 1.0);
        let dy = self.random(s.n * s.oh() * s.ow() * s.c, 1.0);
        let baseline = self.pool_path(s, max, &x, &dy, false)?;
        if max {
            let with_argmax = self.pool_path(s, max, &x, &dy, true)?;
            let name = self.at_level("maxpool_bwd_argmax (vs baseline)");
            let label = label(s);
            self.record(
                &name,
                &label,
                "baseline",
                &with_argmax,
                Some(&baseline),
                0.0,
            );
        }
        Ok(())
    }

    /// One path's forward and backward against the CPU; returns the input gradient.
    fn pool_path(
        &mut self,
        s: &PoolShape,
        max: bool,
        x: &[f32],
        dy: &[f32],
        save_argmax: bool,
    ) -> Result<Vec<f32>> {
        let (xb, dyb) = (self.act(x)?, self.act(dy)?);
        let (y, dx) = (self.poisoned_act(dy.len())?, self.poisoned_act(x.len())?);
        // Poisoned too (255: a position no 3x3 window has): every output's argmax must be
        // written before the backward reads it.
        let am = self.buf(&vec![u8::MAX; argmax_bytes(s)])?;
        let argmax = if save_argmax { am.ptr } else { 0 };
        let (s, xp) = (*s, xb.ptr());
        let (ldy, yoff) = (s.c, 0);
        PoolForward {
            s,
            max,
            x: xp,
            y: y.ptr(),
            ldy,
            yoff,
            argmax,
        }
        .launch(self.dev)?;
        let bwd = PoolBackward {
            s,
            max,
            // With the argmax the backward reads no x: give it none.
            x: if save_argmax { 0 } else { xp },
            dy: dyb.ptr(),
            ldy,
            yoff,
            dx: dx.ptr(),
            accumulate: false,
            argmax,
        };
        bwd.launch(self.dev)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let (kind, path) = match (max, save_argmax) {
            (false, _) => ("avgpool", ""),
            (true, false) => ("maxpool", ""),
            (true, true) => ("maxpool", "_argmax"),
        };
        let tol = self.tol();
        let label = label(&s);
        let name = self.at_level(&format!("{kind}_fwd{path}"));
        let want_y = reference_forward(&s, max, x);
        self.record(&name, &label, "cpu", &got_y, Some(&want_y), tol);
        let name = self.at_level(&format!("{kind}_bwd{path}"));
        let want_dx = reference_backward(&s, max, x, dy);
        self.record(&name, &label, "cpu", &got_dx, Some(&want_dx), tol);
        Ok(got_dx)
    }
}

fn label(s: &PoolShape) -> String {
    let p = s.pool;
    format!(
        "n{} {}x{}x{} k{} s{} p{}",
        s.n, s.h, s.w, s.c, p.k, p.stride, p.pad
    )
}
