//! Self-test cases of the optimizer's launchers: one RMSProp step against [`RmsProp`] (half the
//! elements decayed), a step with the overflow flag set that must change nothing, the overflow
//! checks, RMSProp reading fp16 gradients, and the step values written to device memory (what a
//! step replayed from a CUDA graph reads).

use std::ops::Range;

use anyhow::Result;

use super::cuda::{OverflowCheck, Rmsprop, RmspropParams, SetStepArgs};
use super::{RmsProp, RmsPropConfig};
use crate::gpu::check::{SelfTest, TOL};
use crate::gpu::Launch;

/// Runs of equal flags, the optimizer's decay-mask format.
fn runs(flags: &[bool]) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &f) in flags.iter().enumerate() {
        match out.last_mut() {
            Some((r, g)) if *g == f => r.end = i + 1,
            _ => out.push((i..i + 1, f)),
        }
    }
    out
}

/// The hyper-parameters of the checked step.
const CONFIG: RmsPropConfig = RmsPropConfig {
    rho: 0.9,
    momentum: 0.9,
    eps: 1.0,
    weight_decay: 4e-5,
    decay_all: false,
};
const LR: f32 = 0.4;
const INV_LOSS_SCALE: f32 = 1.0 / 1024.0;

/// The CPU step in place on (w, ms, mom).
fn reference(g: &[f32], decay: &[bool], w: &mut [f32], ms: &mut [f32], mom: &mut [f32]) {
    let mut opt = RmsProp::with_mask(CONFIG, w.len(), runs(decay));
    opt.ms.copy_from_slice(ms);
    opt.mom.copy_from_slice(mom);
    opt.step(w, g, LR, INV_LOSS_SCALE);
    ms.copy_from_slice(&opt.ms);
    mom.copy_from_slice(&opt.mom);
}

impl SelfTest<'_> {
    /// The fp32-gradient step, the skip on overflow and the fp32 overflow check.
    pub fn rmsprop(&mut self, count: usize) -> Result<()> {
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
            lr: LR,
            rho: CONFIG.rho,
            momentum: CONFIG.momentum,
            eps: CONFIG.eps,
            weight_decay: CONFIG.weight_decay,
            inv_loss_scale: INV_LOSS_SCALE,
            loss_scale: 0,
        };
        let check = |grads| OverflowCheck {
            grads,
            count,
            f16: false,
            flag: flag.ptr,
        };
        check(gb.ptr).launch(self.dev)?;
        let finite_flag = self.dev.stream.clone_dtoh(&flag.dev)?[0];
        Rmsprop {
            params: p,
            grad_f16: false,
        }
        .launch(self.dev)?;
        let (got_w, got_w16) = (self.read_f32(&wb)?, self.read_f16(&w16)?);
        let (mut w, mut ms, mut mom) = (w0.clone(), ms0.clone(), mom0.clone());
        reference(&g, &decay, &mut w, &mut ms, &mut mom);
        let label = format!("{count}");
        self.record("rmsprop_f32(w)", &label, "cpu", &got_w, Some(&w), TOL);
        self.record("rmsprop_f32(w16)", &label, "w", &got_w16, Some(&got_w), TOL);

        // One poisoned gradient: the check must raise the flag and the update must change nothing.
        let mut bad = g.clone();
        bad[count / 2] = f32::INFINITY;
        let badb = self.buf(&bad)?;
        check(badb.ptr).launch(self.dev)?;
        let raised = self.dev.stream.clone_dtoh(&flag.dev)?[0];
        let params = RmspropParams {
            grad: badb.ptr,
            ..p
        };
        Rmsprop {
            params,
            grad_f16: false,
        }
        .launch(self.dev)?;
        let w_after = self.read_f32(&wb)?;
        let flags = [finite_flag as f32, raised as f32];
        let expected = [0.0, 1.0];
        self.record(
            "overflow_check_f32",
            &label,
            "expected",
            &flags,
            Some(&expected),
            0.0,
        );
        let name = "rmsprop_f32(skip on overflow)";
        self.record(name, &label, "unchanged", &w_after, Some(&got_w), 0.0);
        Ok(())
    }

    /// The fp16-gradient variants (fp16 gradient buffers): the overflow check, and RMSProp
    /// reading fp16 gradients against the fp32-gradient kernel on the same values.
    pub fn fp16_gradients(&mut self, count: usize) -> Result<()> {
        let g = self.random(count, 64.0);
        let w0 = self.random(count, 1.0);
        let ms0: Vec<f32> = self.random(count, 0.5).iter().map(|v| v + 1.0).collect();
        let label = format!("{count}");
        let (g16, g32, flag) = (self.f16_buf(&g)?, self.buf(&g)?, self.zeros::<i32>(1)?);
        let mut bad = g.clone();
        bad[count / 3] = f32::INFINITY;
        let bad16 = self.f16_buf(&bad)?;
        let check = |grads| OverflowCheck {
            grads,
            count,
            f16: true,
            flag: flag.ptr,
        };
        check(g16.ptr).launch(self.dev)?;
        let clean = self.dev.stream.clone_dtoh(&flag.dev)?[0];
        check(bad16.ptr).launch(self.dev)?;
        let raised = self.dev.stream.clone_dtoh(&flag.dev)?[0];
        let flags = [clean as f32, raised as f32];
        let expected = [0.0, 1.0];
        self.record(
            "overflow_check_f16",
            &label,
            "expected",
            &flags,
            Some(&expected),
            0.0,
        );
        let mut updated = Vec::new();
        for grad_f16 in [false, true] {
            let (wb, msb, momb) = (self.buf(&w0)?, self.buf(&ms0)?, self.zeros::<f32>(count)?);
            let params = RmspropParams {
                w: wb.ptr,
                ms: msb.ptr,
                mom: momb.ptr,
                grad: if grad_f16 { g16.ptr } else { g32.ptr },
                count: count as u64,
                lr: 0.1,
                rho: 0.9,
                momentum: 0.9,
                eps: 1.0,
                weight_decay: 4e-5,
                inv_loss_scale: 1.0 / 64.0,
                ..RmspropParams::default()
            };
            Rmsprop { params, grad_f16 }.launch(self.dev)?;
            updated.push(self.read_f32(&wb)?);
        }
        let (f32_grads, f16_grads) = (&updated[0], &updated[1]);
        self.record(
            "rmsprop_f16",
            &label,
            "rmsprop_f32",
            f16_grads,
            Some(f32_grads),
            0.0,
        );
        Ok(())
    }
}

impl SelfTest<'_> {
    /// `step_args_set` writes the learning rate and a step above 2^32 where the graph's kernels
    /// read them, and RMSProp reading the rate from there (its argument set to a wrong value)
    /// equals RMSProp given the rate as an argument.
    pub fn device_step_args(&mut self, count: usize) -> Result<()> {
        let (lr, step) = (0.1f32, (1u64 << 32) + 7);
        let words = self.zeros::<u32>(8)?;
        let (lr_dst, step_dst) = (words.ptr + 20, words.ptr + 24);
        let args = SetStepArgs {
            lr,
            step,
            lr_dst,
            step_dst,
        };
        args.launch(self.dev)?;
        let got = self.dev.stream.clone_dtoh(&words.dev)?;
        let got_step = got[6] as u64 | (got[7] as u64) << 32;
        let values = [f32::from_bits(got[5]), (got_step - step) as f32];
        let label = format!("{count}");
        self.record(
            "step_args_set",
            &label,
            "expected",
            &values,
            Some(&[lr, 0.0]),
            0.0,
        );
        let g = self.random(count, 64.0);
        let (w0, gb) = (self.random(count, 1.0), self.buf(&g)?);
        let mut updated = Vec::new();
        for on_device in [false, true] {
            let (wb, msb, momb) = (
                self.buf(&w0)?,
                self.zeros::<f32>(count)?,
                self.zeros::<f32>(count)?,
            );
            let params = RmspropParams {
                w: wb.ptr,
                ms: msb.ptr,
                mom: momb.ptr,
                grad: gb.ptr,
                lr_dev: if on_device { lr_dst } else { 0 },
                count: count as u64,
                lr: if on_device { 7.0 } else { lr },
                rho: 0.9,
                momentum: 0.9,
                eps: 1.0,
                inv_loss_scale: 1.0 / 64.0,
                ..RmspropParams::default()
            };
            let grad_f16 = false;
            Rmsprop { params, grad_f16 }.launch(self.dev)?;
            updated.push(self.read_f32(&wb)?);
        }
        let name = "rmsprop_f32(lr_dev)";
        self.record(
            name,
            &label,
            "rmsprop_f32",
            &updated[1],
            Some(&updated[0]),
            0.0,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_equal_flags() {
        assert_eq!(
            runs(&[true, true, false, true]),
            vec![(0..2, true), (2..3, false), (3..4, true)]
        );
        assert!(runs(&[]).is_empty());
    }
}
