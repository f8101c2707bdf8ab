//! Self-test cases of the non-convolution kernels (see selftest.rs for the harness). Each runs the
//! kernel into poisoned outputs and compares with the CPU reference hook (SKIP when not wired), or
//! with a host computation where the hook has no such op (channel copies, the FC layer). The cases
//! that take activations run at the backend's precision level (buffers from `act`/`bn_param`).

use anyhow::Result;

use half::f16;
use rand::Rng;

use super::conv::{self, ConvImpl, ConvMode, ConvOut, ConvShape};
use super::ops::{bn_workspace, BnArgs, Labels, PoolShape, RmspropParams, ScaleArg};
use super::selftest::{BnCase, RmspropHyper, SelfTest, TOL};
use crate::plan::{Op, Plan};

impl SelfTest<'_> {
    /// Training forward and backward of one BN shape, with and without the fused ReLU.
    pub fn batchnorm(&mut self, m: usize, c: usize, relu: bool) -> Result<()> {
        let (eps, momentum) = (1e-3, 0.1);
        // Shifted, then rounded again: the reference must see exactly the fp16 values the device
        // does (with a single row, BN's output is pure cancellation and any difference shows).
        let x: Vec<f32> = self
            .random(m * c, 2.0)
            .iter()
            .map(|v| f16::from_f32(v + 0.5).to_f32())
            .collect();
        let gamma = self.random(c, 1.0);
        let beta = self.random(c, 0.5);
        let rm = self.random(c, 0.1);
        let rv: Vec<f32> = self.random(c, 0.5).iter().map(|v| v + 1.0).collect();
        let case = BnCase {
            m,
            c,
            eps,
            momentum,
            relu,
            x: &x,
            gamma: &gamma,
            beta: &beta,
            running_mean: &rm,
            running_var: &rv,
        };
        let (xb, gb, bb) = (self.act(&x)?, self.bn_param(&gamma)?, self.bn_param(&beta)?);
        // Running statistics are fp32 at every level.
        let (rmb, rvb) = (self.buf(&rm)?, self.buf(&rv)?);
        let (mean, inv_std, y) = (
            self.poisoned_bn_stat(c)?,
            self.poisoned_bn_stat(c)?,
            self.poisoned_act(m * c)?,
        );
        let ws = self.poisoned_f32(bn_workspace(m, c))?;
        let a = BnArgs {
            m,
            c,
            eps,
            momentum,
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
        // Inference first, while the running statistics still hold the case's values.
        let yi = self.poisoned_act(m * c)?;
        self.be.bn_forward_infer(&a, xb.ptr(), yi.ptr())?;
        let got_yi = self.read(&yi)?;
        let want_yi = self.reference.bn_forward_infer(&case);
        let label = format!("m{m} c{c} relu{}", relu as u8);
        let (tol, tol_r) = (self.tol(), self.tol_reduction());
        self.record(
            &self.at_level("bn_infer"),
            &label,
            "cpu",
            &got_yi,
            want_yi.as_deref(),
            tol,
        );
        self.be.bn_forward_train(&a, xb.ptr(), y.ptr(), ws.ptr)?;
        let got_y = self.read(&y)?;
        let (got_mean, got_is) = (self.read(&mean)?, self.read(&inv_std)?);
        let (got_rm, got_rv) = (self.read_f32(&rmb)?, self.read_f32(&rvb)?);
        let r = self.reference.bn_forward_train(&case);
        self.record(
            &self.at_level("bn_apply"),
            &label,
            "cpu",
            &got_y,
            r.as_ref().map(|r| r.y.as_slice()),
            tol,
        );
        self.record(
            &self.at_level("bn_stats(mean)"),
            &label,
            "cpu",
            &got_mean,
            r.as_ref().map(|r| r.mean.as_slice()),
            tol_r,
        );
        self.record(
            &self.at_level("bn_stats(inv_std)"),
            &label,
            "cpu",
            &got_is,
            r.as_ref().map(|r| r.inv_std.as_slice()),
            tol_r,
        );
        self.record(
            &self.at_level("bn_stats(running_mean)"),
            &label,
            "cpu",
            &got_rm,
            r.as_ref().map(|r| r.running_mean.as_slice()),
            tol_r,
        );
        self.record(
            &self.at_level("bn_stats(running_var)"),
            &label,
            "cpu",
            &got_rv,
            r.as_ref().map(|r| r.running_var.as_slice()),
            tol_r,
        );

        let dy = self.random(m * c, 1.0);
        let dyb = self.act(&dy)?;
        let (dg, db, dx) = (
            self.poisoned_f32(c)?,
            self.poisoned_f32(c)?,
            self.poisoned_act(m * c)?,
        );
        let (xp, yp, dyp, dxp) = (xb.ptr(), y.ptr(), dyb.ptr(), dx.ptr());
        self.be
            .bn_backward(&a, xp, yp, dyp, dg.ptr, db.ptr, dxp, false, ws.ptr)?;
        let (got_dx, got_dg, got_db) = (self.read(&dx)?, self.read_f32(&dg)?, self.read_f32(&db)?);
        let r = self
            .reference
            .bn_backward(&case, &got_y, &dy, &got_mean, &got_is);
        self.record(
            &self.at_level("bn_bwd_dx"),
            &label,
            "cpu",
            &got_dx,
            r.as_ref().map(|r| r.dx.as_slice()),
            tol,
        );
        self.record(
            &self.at_level("bn_bwd(dgamma)"),
            &label,
            "cpu",
            &got_dg,
            r.as_ref().map(|r| r.dgamma.as_slice()),
            tol_r,
        );
        self.record(
            &self.at_level("bn_bwd(dbeta)"),
            &label,
            "cpu",
            &got_db,
            r.as_ref().map(|r| r.dbeta.as_slice()),
            tol_r,
        );
        Ok(())
    }

    /// Forward and backward of one max or average pool shape.
    pub fn pool(&mut self, s: &PoolShape, max: bool) -> Result<()> {
        let x = self.random(s.n * s.h * s.w * s.c, 1.0);
        let dy = self.random(s.n * s.oh() * s.ow() * s.c, 1.0);
        let (xb, dyb) = (self.act(&x)?, self.act(&dy)?);
        let (y, dx) = (self.poisoned_act(dy.len())?, self.poisoned_act(x.len())?);
        self.be.pool_forward(s, max, xb.ptr(), y.ptr(), s.c, 0)?;
        self.be
            .pool_backward(s, max, xb.ptr(), dyb.ptr(), s.c, 0, dx.ptr(), false)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let kind = if max { "maxpool" } else { "avgpool" };
        let tol = self.tol();
        let label = format!(
            "n{} {}x{}x{} k{} s{} p{}",
            s.n, s.h, s.w, s.c, s.pool.k, s.pool.stride, s.pool.pad
        );
        let want_y = self.reference.pool_forward(s, max, &x);
        let name = self.at_level(&format!("{kind}_fwd"));
        self.record(&name, &label, "cpu", &got_y, want_y.as_deref(), tol);
        let want_dx = self.reference.pool_backward(s, max, &x, &dy);
        let name = self.at_level(&format!("{kind}_bwd"));
        self.record(&name, &label, "cpu", &got_dx, want_dx.as_deref(), tol);
        Ok(())
    }

    /// Global average pool forward/backward, checked against the pool reference with a window
    /// covering the whole image.
    pub fn global_avgpool(&mut self, n: usize, hw: usize, c: usize) -> Result<()> {
        let side = (hw as f64).sqrt() as usize;
        let s = PoolShape {
            pool: crate::plan::Pool {
                k: side,
                stride: 1,
                pad: 0,
            },
            n,
            h: side,
            w: side,
            c,
        };
        let x = self.random(n * hw * c, 1.0);
        let dy = self.random(n * c, 1.0);
        let (xb, dyb) = (self.act(&x)?, self.act(&dy)?);
        let (y, dx) = (self.poisoned_act(n * c)?, self.poisoned_act(n * hw * c)?);
        self.be
            .global_avgpool_forward(n, hw, c, xb.ptr(), y.ptr())?;
        self.be
            .global_avgpool_backward(n, hw, c, dyb.ptr(), dx.ptr(), false)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let label = format!("n{n} {side}x{side}x{c}");
        let tol = self.tol();
        let want_y = self.reference.pool_forward(&s, false, &x);
        let name = self.at_level("global_avgpool_fwd");
        self.record(
            &name,
            &label,
            "cpu(avgpool)",
            &got_y,
            want_y.as_deref(),
            tol,
        );
        let want_dx = self.reference.pool_backward(&s, false, &x, &dy);
        let name = self.at_level("global_avgpool_bwd");
        self.record(
            &name,
            &label,
            "cpu(avgpool)",
            &got_dx,
            want_dx.as_deref(),
            tol,
        );
        Ok(())
    }

    /// Dropout forward must match the reference bit for bit in its mask; backward applies the
    /// same mask (checked as: backward of dy = x equals forward of x).
    pub fn dropout(&mut self, count: usize, p: f32) -> Result<()> {
        let (seed, step) = (0x1234_5678_9abc_def0, 17);
        let x = self.random(count, 1.0);
        let xb = self.act(&x)?;
        let (y, dx) = (self.poisoned_act(count)?, self.poisoned_act(count)?);
        self.be
            .dropout_forward(count, p, seed, step, xb.ptr(), y.ptr())?;
        self.be
            .dropout_backward(count, p, seed, step, xb.ptr(), dx.ptr(), false)?;
        let (got_y, got_dx) = (self.read(&y)?, self.read(&dx)?);
        let label = format!("{count} p{p}");
        let want = self.reference.dropout_forward(p, seed, step, &x);
        let (fwd, bwd) = (self.at_level("dropout_fwd"), self.at_level("dropout_bwd"));
        let tol = self.tol();
        self.record(&fwd, &label, "cpu", &got_y, want.as_deref(), tol);
        self.record(&bwd, &label, "dropout_fwd", &got_dx, Some(&got_y), 0.0);
        Ok(())
    }

    /// Fused softmax cross-entropy with f32 and i32 labels.
    pub fn softmax_ce(&mut self, n: usize, k: usize, smoothing: f32) -> Result<()> {
        let grad_scale = 1024.0;
        let logits = self.random(n * k, 4.0);
        let labels: Vec<f32> = (0..n).map(|i| ((i * 7919) % k) as f32).collect();
        let labels_i: Vec<i32> = labels.iter().map(|&v| v as i32).collect();
        let (lb, lf, li) = (self.act(&logits)?, self.buf(&labels)?, self.buf(&labels_i)?);
        let want = self
            .reference
            .softmax_ce(n, k, smoothing, grad_scale, &logits, &labels);
        let label = format!("n{n} k{k} eps{smoothing}");
        for (name, lab) in [
            ("softmax_ce_f32", Labels::F32(lf.ptr)),
            ("softmax_ce_i32", Labels::I32(li.ptr)),
        ] {
            let (rows, loss, dz) = (
                self.poisoned_f32(n)?,
                self.poisoned_f32(1)?,
                self.poisoned_act(n * k)?,
            );
            let counter = self.zeros::<u32>(1)?;
            self.be.softmax_ce(
                n,
                k,
                smoothing,
                ScaleArg::Value(grad_scale),
                lb.ptr(),
                lab,
                rows.ptr,
                loss.ptr,
                counter.ptr,
                dz.ptr(),
            )?;
            let (got_loss, got_dz) = (self.read_f32(&loss)?, self.read(&dz)?);
            let want_loss = want.as_ref().map(|w| vec![w.0]);
            let (tol, tol_r) = (self.tol(), self.tol_reduction());
            self.record(
                &self.at_level(&format!("{name}(loss)")),
                &label,
                "cpu",
                &got_loss,
                want_loss.as_deref(),
                tol_r,
            );
            self.record(
                &self.at_level(&format!("{name}(grad)")),
                &label,
                "cpu",
                &got_dz,
                want.as_ref().map(|w| w.1.as_slice()),
                tol,
            );
        }
        Ok(())
    }

    /// One RMSProp step (fp32 gradients, half the elements decayed), then a step with the overflow
    /// flag set that must leave everything untouched; also the overflow check itself.
    pub fn rmsprop(&mut self, count: usize) -> Result<()> {
        let h = RmspropHyper {
            lr: 0.4,
            rho: 0.9,
            momentum: 0.9,
            eps: 1.0,
            weight_decay: 4e-5,
            inv_loss_scale: 1.0 / 1024.0,
        };
        let g: Vec<f32> = self.random(count, 1024.0);
        let w0 = self.random(count, 1.0);
        let ms0: Vec<f32> = self.random(count, 0.5).iter().map(|v| v + 1.0).collect();
        let mom0 = self.random(count, 0.01);
        let decay: Vec<bool> = (0..count).map(|i| i < count / 2).collect();
        let decay_u8: Vec<u8> = decay.iter().map(|&d| d as u8).collect();
        let (gb, wb, msb, momb, db) = (
            self.buf(&g)?,
            self.buf(&w0)?,
            self.buf(&ms0)?,
            self.buf(&mom0)?,
            self.buf(&decay_u8)?,
        );
        let (w16, flag) = (self.poisoned_f16(count)?, self.zeros::<i32>(1)?);
        let p = RmspropParams {
            w: wb.ptr,
            w16: w16.ptr,
            ms: msb.ptr,
            mom: momb.ptr,
            grad: gb.ptr,
            decay: db.ptr,
            lr_dev: 0,
            overflow: flag.ptr,
            count: count as u64,
            lr: h.lr,
            rho: h.rho,
            momentum: h.momentum,
            eps: h.eps,
            weight_decay: h.weight_decay,
            inv_loss_scale: h.inv_loss_scale,
            loss_scale: 0,
        };
        self.be.overflow_check(gb.ptr, count, false, flag.ptr)?;
        let finite_flag = self.be.stream.clone_dtoh(&flag.dev)?[0];
        self.be.rmsprop(p, false)?;
        let (got_w, got_w16) = (self.read_f32(&wb)?, self.read_f16(&w16)?);
        let (mut w, mut ms, mut mom) = (w0.clone(), ms0.clone(), mom0.clone());
        let want = self
            .reference
            .rmsprop(&h, &g, &decay, &mut w, &mut ms, &mut mom)
            .map(|_| w);
        let label = format!("{count}");
        self.record(
            "rmsprop_f32(w)",
            &label,
            "cpu",
            &got_w,
            want.as_deref(),
            TOL,
        );
        self.record("rmsprop_f32(w16)", &label, "w", &got_w16, Some(&got_w), TOL);

        // One poisoned gradient: the check must raise the flag and the update must change nothing.
        let mut bad = g.clone();
        bad[count / 2] = f32::INFINITY;
        let badb = self.buf(&bad)?;
        self.be.overflow_check(badb.ptr, count, false, flag.ptr)?;
        let raised = self.be.stream.clone_dtoh(&flag.dev)?[0];
        self.be.rmsprop(
            RmspropParams {
                grad: badb.ptr,
                ..p
            },
            false,
        )?;
        let w_after = self.read_f32(&wb)?;
        let flags = [finite_flag as f32, raised as f32];
        self.record(
            "overflow_check_f32",
            &label,
            "expected",
            &flags,
            Some(&[0.0, 1.0]),
            0.0,
        );
        self.record(
            "rmsprop_f32(skip on overflow)",
            &label,
            "unchanged",
            &w_after,
            Some(&got_w),
            0.0,
        );
        Ok(())
    }
}

impl SelfTest<'_> {
    /// The standalone ReLU (plans that do not fuse it into BN), at the backend's level, against
    /// the host: forward, and backward accumulating onto existing values.
    pub fn relu(&mut self, count: usize) -> Result<()> {
        let x = self.random(count, 1.0);
        let prev = self.random(count, 1.0);
        let dy = self.random(count, 1.0);
        let (xb, y) = (self.act(&x)?, self.poisoned_act(count)?);
        self.be.relu_forward(count, xb.ptr(), y.ptr())?;
        let got_y = self.read(&y)?;
        let want_y: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        let label = format!("{count}");
        let tol = self.tol();
        self.record(
            &self.at_level("relu_fwd"),
            &label,
            "host",
            &got_y,
            Some(&want_y),
            tol,
        );
        let (dyb, dx) = (self.act(&dy)?, self.act(&prev)?);
        self.be
            .relu_backward(count, y.ptr(), dyb.ptr(), dx.ptr(), true)?;
        let got_dx = self.read(&dx)?;
        let want_dx: Vec<f32> = (0..count)
            .map(|i| prev[i] + if want_y[i] > 0.0 { dy[i] } else { 0.0 })
            .collect();
        self.record(
            &self.at_level("relu_bwd"),
            &label,
            "host",
            &got_dx,
            Some(&want_dx),
            tol,
        );
        Ok(())
    }

    /// The fp16-gradient variants of the optimizer path (fp16 gradient buffers): the overflow
    /// check, RMSProp reading fp16 gradients (against the fp32-gradient kernel on the same
    /// values) and the split-K reduction into an fp16 output.
    pub fn fp16_gradients(&mut self, count: usize) -> Result<()> {
        let g = self.random(count, 64.0);
        let w0 = self.random(count, 1.0);
        let ms0: Vec<f32> = self.random(count, 0.5).iter().map(|v| v + 1.0).collect();
        let label = format!("{count}");
        let (g16, g32, flag) = (self.f16_buf(&g)?, self.buf(&g)?, self.zeros::<i32>(1)?);
        let mut bad = g.clone();
        bad[count / 3] = f32::INFINITY;
        let bad16 = self.f16_buf(&bad)?;
        self.be.overflow_check(g16.ptr, count, true, flag.ptr)?;
        let clean = self.be.stream.clone_dtoh(&flag.dev)?[0];
        self.be.overflow_check(bad16.ptr, count, true, flag.ptr)?;
        let raised = self.be.stream.clone_dtoh(&flag.dev)?[0];
        let flags = [clean as f32, raised as f32];
        self.record(
            "overflow_check_f16",
            &label,
            "expected",
            &flags,
            Some(&[0.0, 1.0]),
            0.0,
        );
        let mut updated = Vec::new();
        for grad_f16 in [false, true] {
            let (wb, msb, momb) = (self.buf(&w0)?, self.buf(&ms0)?, self.zeros::<f32>(count)?);
            let p = RmspropParams {
                w: wb.ptr,
                w16: 0,
                ms: msb.ptr,
                mom: momb.ptr,
                grad: if grad_f16 { g16.ptr } else { g32.ptr },
                decay: 0,
                lr_dev: 0,
                overflow: 0,
                count: count as u64,
                lr: 0.1,
                rho: 0.9,
                momentum: 0.9,
                eps: 1.0,
                weight_decay: 4e-5,
                inv_loss_scale: 1.0 / 64.0,
                loss_scale: 0,
            };
            self.be.rmsprop(p, grad_f16)?;
            updated.push(self.read_f32(&wb)?);
        }
        self.record(
            "rmsprop_f16",
            &label,
            "rmsprop_f32",
            &updated[1],
            Some(&updated[0]),
            0.0,
        );
        // Split-K partials [3][count] summed into an fp16 output, accumulating onto it.
        let splits = 3;
        let ws = self.random(splits * count, 1.0);
        let prev = self.random(count, 1.0);
        let (wsb, out) = (self.buf(&ws)?, self.f16_buf(&prev)?);
        self.be
            .wgrad_reduce(wsb.ptr, splits, count as u64, out.ptr, true, false)?;
        let got = self.read_f16(&out)?;
        let want: Vec<f32> = (0..count)
            .map(|i| prev[i] + (0..splits).map(|z| ws[z * count + i]).sum::<f32>())
            .collect();
        self.record(
            "conv_wgrad_reduce_f16",
            &label,
            "host",
            &got,
            Some(&want),
            TOL,
        );
        Ok(())
    }
}

impl SelfTest<'_> {
    /// Channel copies at the backend's activation type, against the host: a concat slice
    /// accumulated onto existing values, and the stem's zero padding of 3 channels to 8.
    pub fn copy_channels(&mut self, rows: usize) -> Result<()> {
        let (c, ld, off) = (96, 384, 96);
        let src = self.random(rows * c, 1.0);
        let prefill = self.random(rows * ld, 1.0);
        let (sb, db) = (self.act(&src)?, self.act(&prefill)?);
        self.be
            .copy_channels(rows, c, sb.ptr(), c, 0, db.ptr(), ld, off, 0, true)?;
        let mut want = prefill.clone();
        for r in 0..rows {
            for j in 0..c {
                want[r * ld + off + j] += src[r * c + j];
            }
        }
        let got = self.read(&db)?;
        let (name, tol) = (self.at_level("copy_channels"), self.tol());
        let label = format!("{rows} rows {c}ch -> ld {ld} offset {off} +=");
        self.record(&name, &label, "host", &got, Some(&want), tol);

        let stem = self.random(rows * 3, 1.0);
        let (sb, pb) = (self.act(&stem)?, self.poisoned_act(rows * 8)?);
        self.be.pad_channels(rows, 3, 8, sb.ptr(), pb.ptr())?;
        let want: Vec<f32> = stem
            .chunks(3)
            .flat_map(|px| px.iter().copied().chain([0.0; 5]))
            .collect();
        let got = self.read(&pb)?;
        let name = self.at_level("copy_channels(pad 3->8)");
        self.record(
            &name,
            &format!("{rows} rows"),
            "host",
            &got,
            Some(&want),
            tol,
        );
        Ok(())
    }

    /// The fully connected layer through its launchers (GEMMs on the conv kernels plus the bias
    /// kernels) against the host in f64: y = x W^T + b, dx = dy W, dW = dy^T x, db = sum dy.
    pub fn linear(&mut self, n: usize, in_f: usize, out_f: usize) -> Result<()> {
        let x = self.random(n * in_f, 1.0);
        let w = self.random(out_f * in_f, 1.0 / (in_f as f32).sqrt());
        let b = self.random(out_f, 0.5);
        let dy = self.random(n * out_f, 1.0);
        let (xb, wb, dyb, bb) = (self.act(&x)?, self.act(&w)?, self.act(&dy)?, self.buf(&b)?);
        let (y, dx) = (self.poisoned_act(n * out_f)?, self.poisoned_act(n * in_f)?);
        let (dw, db) = (self.poisoned_f32(out_f * in_f)?, self.poisoned_f32(out_f)?);
        let ws_elems = self.be.linear_workspace(n, in_f, out_f);
        let ws = self.poisoned_f32(ws_elems)?;
        let (xp, wp, dyp) = (xb.ptr(), wb.ptr(), dyb.ptr());
        self.be
            .linear_forward(n, in_f, out_f, xp, wp, bb.ptr, y.ptr(), None)?;
        self.be
            .linear_backward_data(n, in_f, out_f, dyp, wp, dx.ptr(), false, None)?;
        self.be.linear_backward_weight(
            n, in_f, out_f, xp, dyp, dw.ptr, db.ptr, ws.ptr, ws_elems, None,
        )?;
        let mut want_y = host_gemm(
            n,
            out_f,
            in_f,
            |r, i| x[r * in_f + i],
            |i, o| w[o * in_f + i],
        );
        for (v, bias) in want_y.iter_mut().zip(b.iter().cycle()) {
            *v += bias;
        }
        let want_dx = host_gemm(
            n,
            in_f,
            out_f,
            |r, o| dy[r * out_f + o],
            |o, i| w[o * in_f + i],
        );
        let want_dw = host_gemm(
            out_f,
            in_f,
            n,
            |o, r| dy[r * out_f + o],
            |r, i| x[r * in_f + i],
        );
        let want_db = host_gemm(1, out_f, n, |_, _| 1.0, |r, o| dy[r * out_f + o]);
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
            self.record(&name, &label, "host", &got, Some(&want), tol);
        }
        Ok(())
    }

    /// The conv epilogue options: fprop and dgrad write into a channel slice of a wider tensor
    /// (ldc, c_offset) and add to what is there (accumulate). The oracle is the plain kernel's
    /// dense result added to the prefill inside the slice; outside it nothing may change.
    pub fn conv_slice_accumulate(&mut self, s: &ConvShape) -> Result<()> {
        let c = s.conv;
        let x = self.random(s.n * s.h * s.w * c.cin, 1.0);
        let w = self.random(c.cout * c.kh * c.kw * c.cin, 0.1);
        let dy = self.random(s.n * s.oh() * s.ow() * c.cout, 1.0);
        let (xb, wb, dyb) = (self.f16_buf(&x)?, self.f16_buf(&w)?, self.f16_buf(&dy)?);
        for mode in [ConvMode::Fprop, ConvMode::Dgrad] {
            let (rows, width) = match mode {
                ConvMode::Fprop => (s.n * s.oh() * s.ow(), c.cout),
                _ => (s.n * s.h * s.w, c.cin),
            };
            let (ldc, off) = (width + 16, 8);
            let dense = self.poisoned_f16(rows * width)?;
            let prefill = self.random(rows * ldc, 1.0);
            let wide = self.f16_buf(&prefill)?;
            let tile = conv::preferred_tile(s, mode, self.be.num_sms);
            let slice = ConvOut {
                ptr: wide.ptr,
                ldc,
                c_offset: off,
                accumulate: true,
            };
            if mode == ConvMode::Fprop {
                self.be.conv_fprop(
                    s,
                    xb.ptr,
                    wb.ptr,
                    ConvOut::dense(dense.ptr, width),
                    Some(ConvImpl::Plain),
                )?;
                self.be
                    .conv_fprop(s, xb.ptr, wb.ptr, slice, Some(ConvImpl::Tc(tile)))?;
            } else {
                self.be.conv_dgrad(
                    s,
                    dyb.ptr,
                    wb.ptr,
                    ConvOut::dense(dense.ptr, width),
                    Some(ConvImpl::Plain),
                )?;
                self.be
                    .conv_dgrad(s, dyb.ptr, wb.ptr, slice, Some(ConvImpl::Tc(tile)))?;
            }
            let (d, got) = (self.read_f16(&dense)?, self.read_f16(&wide)?);
            let mut want = prefill.clone();
            for r in 0..rows {
                for j in 0..width {
                    want[r * ldc + off + j] += d[r * width + j];
                }
            }
            let name = format!("{}(slice+accumulate)", tile.kernel(mode));
            self.record(
                &name,
                &format!("ldc {ldc} offset {off}"),
                "plain+prefill",
                &got,
                Some(&want),
                TOL,
            );
        }
        Ok(())
    }

    /// fp32 -> fp16 -> fp32 round trip against IEEE round-to-nearest-even on the host.
    pub fn casts(&mut self, count: usize) -> Result<()> {
        let src: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-70000.0f32..70000.0))
            .collect();
        let want: Vec<f32> = src.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let (sb, mid, back) = (
            self.buf(&src)?,
            self.poisoned_f16(count)?,
            self.poisoned_f32(count)?,
        );
        self.be.cast_f32_to_f16(sb.ptr, count, mid.ptr)?;
        self.be.cast_f16_to_f32(mid.ptr, count, back.ptr)?;
        let got = self.read_f32(&back)?;
        // Exact match required; values beyond the fp16 range become inf on both sides, which
        // `compare` would count as a failure, so compare bit patterns instead.
        let same = got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        let flag = [same as u8 as f32];
        self.record(
            "cast_f32_to_f16+cast_f16_to_f32",
            &format!("{count}"),
            "host f16",
            &flag,
            Some(&[1.0]),
            0.0,
        );
        Ok(())
    }
}

/// c[i][j] = sum_l a(i, l) * b(l, j) for an m x n result, accumulated in f64.
fn host_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|l| a(i, l) as f64 * b(l, j) as f64).sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// (in_features, out_features) of a plan's fully connected layer, if it has one.
pub fn plan_linear(plan: &Plan) -> Option<(usize, usize)> {
    plan.nodes.iter().find_map(|node| match node.op {
        Op::Linear {
            in_features,
            out_features,
        } => Some((in_features, out_features)),
        _ => None,
    })
}

/// Distinct BN inputs (m = n*h*w, c) of a plan.
pub fn plan_bn_shapes(plan: &Plan) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for node in plan
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
    {
        let s = plan.shape(node.inputs[0]);
        let mc = (s[..s.len() - 1].iter().product(), s[s.len() - 1]);
        if !out.contains(&mc) {
            out.push(mc);
        }
    }
    out
}

/// Distinct pools of a plan, with `true` for max pools.
pub fn plan_pools(plan: &Plan) -> Vec<(PoolShape, bool)> {
    let mut out = Vec::new();
    for node in &plan.nodes {
        let (pool, max) = match node.op {
            Op::MaxPool(p) => (p, true),
            Op::AvgPool(p) => (p, false),
            _ => continue,
        };
        let s = plan.shape(node.inputs[0]);
        let item = (
            PoolShape {
                pool,
                n: s[0],
                h: s[1],
                w: s[2],
                c: s[3],
            },
            max,
        );
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}
