//! Self-test case of the fully connected launchers (GEMMs on the conv kernels plus the bias
//! kernels) against this folder's CPU reference: y = x W^T + b, dx = dy W, dW = dy^T x,
//! db = sum dy.

use anyhow::Result;

use super::cuda::{linear_workspace, LinearBackwardData, LinearBackwardWeight, LinearForward};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Forward and both backward launches of one layer.
    pub fn linear(&mut self, n: usize, in_f: usize, out_f: usize) -> Result<()> {
        let x = self.random(n * in_f, 1.0);
        let w = self.random(out_f * in_f, 1.0 / (in_f as f32).sqrt());
        let b = self.random(out_f, 0.5);
        let dy = self.random(n * out_f, 1.0);
        let (xb, wb, dyb, bb) = (self.act(&x)?, self.act(&w)?, self.act(&dy)?, self.buf(&b)?);
        let (y, dx) = (self.poisoned_act(n * out_f)?, self.poisoned_act(n * in_f)?);
        let (dw, db) = (self.poisoned_f32(out_f * in_f)?, self.poisoned_f32(out_f)?);
        let ws_elems = linear_workspace(n, in_f, out_f, self.dev.num_sms);
        let ws = self.poisoned_f32(ws_elems)?;
        let (xp, wp, dyp, imp) = (xb.ptr(), wb.ptr(), dyb.ptr(), None);
        let (y_ptr, b_ptr) = (y.ptr(), bb.ptr);
        LinearForward {
            n,
            in_f,
            out_f,
            x: xp,
            w: wp,
            b: b_ptr,
            y: y_ptr,
            imp,
        }
        .launch(self.dev)?;
        let data = LinearBackwardData {
            n,
            in_f,
            out_f,
            dy: dyp,
            w: wp,
            dx: dx.ptr(),
            accumulate: false,
            imp,
        };
        data.launch(self.dev)?;
        let weight = LinearBackwardWeight {
            n,
            in_f,
            out_f,
            x: xp,
            dy: dyp,
            dw: dw.ptr,
            db: db.ptr,
            ws: ws.ptr,
            ws_elems,
            imp,
        };
        weight.launch(self.dev)?;
        let mut want_y = vec![0.0; n * out_f];
        super::forward(&x, &w, &b, n, in_f, out_f, &mut want_y);
        let mut want_dx = vec![0.0; n * in_f];
        let (mut want_dw, mut want_db) = (vec![0.0; out_f * in_f], vec![0.0; out_f]);
        let grads = (Some(&mut want_dx[..]), &mut want_dw[..], &mut want_db[..]);
        super::backward(
            &x, &w, &dy, n, in_f, out_f, grads.0, grads.1, grads.2, false,
        );
        let label = format!("n{n} {in_f}->{out_f}");
        let (tol, tol_r) = (self.tol(), self.tol_reduction());
        let results = [
            ("linear_forward", self.read(&y)?, want_y, tol),
            ("linear_backward_data", self.read(&dx)?, want_dx, tol),
            (
                "linear_backward_weight(dw)",
                self.read_f32(&dw)?,
                want_dw,
                tol_r,
            ),
            (
                "linear_backward_weight(db)",
                self.read_f32(&db)?,
                want_db,
                tol_r,
            ),
        ];
        for (kernel, got, want, tol) in results {
            let name = self.at_level(kernel);
            self.record(&name, &label, "cpu", &got, Some(&want), tol);
        }
        Ok(())
    }
}
