//! Self-test case of the batchnorm launchers: inference forward, training forward (output, batch
//! statistics, running statistics) and backward, with and without the fused ReLU, against the
//! CPU reference in this folder.

use anyhow::Result;
use half::f16;

use super::cuda::{bn_workspace, BnArgs, BnBackward, BnForwardInfer, BnForwardTrain};
use super::BnParams;
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

/// One BN problem on the host: activations [m][c] and the layer's parameters and statistics.
struct Case {
    m: usize,
    c: usize,
    eps: f32,
    momentum: f32,
    relu: bool,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

impl Case {
    fn params(&self) -> BnParams<'_> {
        BnParams {
            gamma: &self.gamma,
            beta: &self.beta,
            eps: self.eps,
        }
    }

    fn relu(&self, y: &mut [f32]) {
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }

    fn infer(&self) -> Vec<f32> {
        let mut y = vec![0.0; self.m * self.c];
        let (rm, rv) = (&self.running_mean, &self.running_var);
        super::forward_infer(&self.x, &self.params(), self.c, rm, rv, &mut y);
        self.relu(&mut y);
        y
    }

    /// (y, mean, inv_std, running_mean, running_var) of the training forward.
    fn train(&self) -> [Vec<f32>; 5] {
        let c = self.c;
        let (mut y, mut mean, mut inv_std) = (vec![0.0; self.m * c], vec![0.0; c], vec![0.0; c]);
        let (mut rm, mut rv) = (self.running_mean.clone(), self.running_var.clone());
        let p = self.params();
        let stats = (&mut mean, &mut inv_std, &mut rm, &mut rv);
        super::forward_train(
            &self.x,
            &p,
            self.momentum,
            c,
            &mut y,
            stats.0,
            stats.1,
            stats.2,
            stats.3,
        );
        self.relu(&mut y);
        [y, mean, inv_std, rm, rv]
    }

    /// (dx, dgamma, dbeta); `y` is the forward output the fused ReLU backward masks with.
    fn backward(&self, y: &[f32], dy: &[f32], mean: &[f32], inv_std: &[f32]) -> [Vec<f32>; 3] {
        let c = self.c;
        let dy_eff: Vec<f32> = match self.relu {
            true => dy
                .iter()
                .zip(y)
                .map(|(&g, &o)| if o > 0.0 { g } else { 0.0 })
                .collect(),
            false => dy.to_vec(),
        };
        let (mut dx, mut dg, mut db) = (vec![0.0; self.m * c], vec![0.0; c], vec![0.0; c]);
        super::backward(
            &self.x,
            &dy_eff,
            &self.gamma,
            mean,
            inv_std,
            c,
            &mut dx,
            &mut dg,
            &mut db,
            false,
        );
        [dx, dg, db]
    }
}

impl SelfTest<'_> {
    fn bn_case(&mut self, m: usize, c: usize, relu: bool) -> Case {
        // Shifted, then rounded again: the reference must see exactly the fp16 values the device
        // does (with a single row, BN's output is pure cancellation and any difference shows).
        let x = self
            .random(m * c, 2.0)
            .iter()
            .map(|v| f16::from_f32(v + 0.5).to_f32())
            .collect();
        Case {
            m,
            c,
            eps: 1e-3,
            momentum: 0.1,
            relu,
            x,
            gamma: self.random(c, 1.0),
            beta: self.random(c, 0.5),
            running_mean: self.random(c, 0.1),
            running_var: self.random(c, 0.5).iter().map(|v| v + 1.0).collect(),
        }
    }

    /// Training forward and backward of one BN shape, with or without the fused ReLU.
    pub fn batchnorm(&mut self, m: usize, c: usize, relu: bool) -> Result<()> {
        let case = self.bn_case(m, c, relu);
        let (xb, gb, bb) = (
            self.act(&case.x)?,
            self.bn_param(&case.gamma)?,
            self.bn_param(&case.beta)?,
        );
        // Running statistics are fp32 at every level.
        let (rmb, rvb) = (self.buf(&case.running_mean)?, self.buf(&case.running_var)?);
        let (mean, inv_std, y) = (
            self.poisoned_bn_stat(c)?,
            self.poisoned_bn_stat(c)?,
            self.poisoned_act(m * c)?,
        );
        let ws = self.poisoned_f32(bn_workspace(m, c))?;
        let a = BnArgs {
            m,
            c,
            eps: case.eps,
            momentum: case.momentum,
            relu,
            gamma: gb.ptr(),
            beta: bb.ptr(),
            save_mean: mean.ptr(),
            save_inv_std: inv_std.ptr(),
            running_mean: rmb.ptr,
            running_var: rvb.ptr,
            ldy: c,
            yoff: 0,
        };
        let label = format!("m{m} c{c} relu{}", relu as u8);
        let (tol, tol_r) = (self.tol(), self.tol_reduction());
        // Inference first, while the running statistics still hold the case's values.
        let yi = self.poisoned_act(m * c)?;
        let (x, y_ptr) = (xb.ptr(), yi.ptr());
        BnForwardInfer { a, x, y: y_ptr }.launch(self.dev)?;
        let got_yi = self.read(&yi)?;
        let name = self.at_level("bn_infer");
        self.record(&name, &label, "cpu", &got_yi, Some(&case.infer()), tol);

        let (y_ptr, ws_ptr) = (y.ptr(), ws.ptr);
        BnForwardTrain {
            a,
            x,
            y: y_ptr,
            ws: ws_ptr,
        }
        .launch(self.dev)?;
        let fwd = [
            self.read(&y)?,
            self.read(&mean)?,
            self.read(&inv_std)?,
            self.read_f32(&rmb)?,
            self.read_f32(&rvb)?,
        ];
        let want = case.train();
        let names = [
            "bn_apply",
            "bn_stats(mean)",
            "bn_stats(inv_std)",
            "bn_stats(running_mean)",
            "bn_stats(running_var)",
        ];
        for (i, (g, w)) in fwd.iter().zip(&want).enumerate() {
            let t = if i == 0 { tol } else { tol_r };
            let name = self.at_level(names[i]);
            self.record(&name, &label, "cpu", g, Some(w), t);
        }

        let dy = self.random(m * c, 1.0);
        let dyb = self.act(&dy)?;
        let (dg, db, dx) = (
            self.poisoned_f32(c)?,
            self.poisoned_f32(c)?,
            self.poisoned_act(m * c)?,
        );
        let bwd = BnBackward {
            a,
            x,
            y: y_ptr,
            dy: dyb.ptr(),
            dgamma: dg.ptr,
            dbeta: db.ptr,
            dx: dx.ptr(),
            accumulate: false,
            ws: ws_ptr,
        };
        bwd.launch(self.dev)?;
        let got = [self.read(&dx)?, self.read_f32(&dg)?, self.read_f32(&db)?];
        let want = case.backward(&fwd[0], &dy, &fwd[1], &fwd[2]);
        let names = ["bn_bwd_dx", "bn_bwd(dgamma)", "bn_bwd(dbeta)"];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let t = if i == 0 { tol } else { tol_r };
            let name = self.at_level(names[i]);
            self.record(&name, &label, "cpu", g, Some(w), t);
        }
        Ok(())
    }
}
