//! Self-test cases of the convolution launchers: the plain kernels against the CPU reference, the
//! tensor-core tiles against the plain kernels (a pass marks the shape verified), the stem padded
//! to 8 channels, and the epilogue's slice and accumulate options.

use anyhow::Result;
use half::f16;

use super::cuda::{
    self, wgrad_workspace_elems, ConvDgrad, ConvFprop, ConvImpl, ConvMode, ConvOut, ConvWgrad,
    WgradReduce,
};
use super::ConvShape;
use crate::gpu::check::{AnyBuf, SelfTest, Status, TOL};
use crate::gpu::Launch;
use crate::ops::concat::cuda::CopyChannels;
use crate::plan::Conv2d;
use crate::precision::Amp;

fn conv_label(s: &ConvShape) -> String {
    format!("n{} {}", s.n, s.label())
}

/// The CPU reference of one mode, on the host copies the device saw.
fn cpu_reference(s: &ConvShape, mode: ConvMode, x: &[f32], w: &[f32], dy: &[f32]) -> Vec<f32> {
    let c = &s.conv;
    match mode {
        ConvMode::Fprop => {
            let mut y = vec![0.0; s.n * s.oh() * s.ow() * c.cout];
            super::forward(s, x, w, &mut y);
            y
        }
        ConvMode::Dgrad => {
            let mut dx = vec![0.0; s.n * s.h * s.w * c.cin];
            super::backward_data(s, dy, w, &mut dx, false);
            dx
        }
        ConvMode::Wgrad => {
            let mut dw = vec![0.0; c.cout * c.kh * c.kw * c.cin];
            super::backward_weight(s, x, dy, &mut dw);
            dw
        }
    }
}

impl SelfTest<'_> {
    /// fprop, dgrad and wgrad of one shape: plain kernel vs CPU reference, tensor-core kernel vs
    /// plain kernel (marking the shape verified on a pass). At O0 only the plain fp32 kernels exist.
    pub fn conv(&mut self, s: &ConvShape) -> Result<()> {
        let c = s.conv;
        let (oh, ow) = (s.oh(), s.ow());
        let k = (c.kh * c.kw * c.cin) as f32;
        let x = self.random(s.n * s.h * s.w * c.cin, 1.0);
        let w = self.random(c.cout * c.kh * c.kw * c.cin, 1.0 / k.sqrt());
        let dy = self.random(s.n * oh * ow * c.cout, 1.0);
        let (xb, wb, dyb) = (self.act(&x)?, self.act(&w)?, self.act(&dy)?);
        let label = conv_label(s);
        for mode in [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad] {
            let plain = self.run_conv(s, mode, ConvImpl::Plain, &xb, &wb, &dyb)?;
            let want = self.cpu_conv.then(|| cpu_reference(s, mode, &x, &w, &dy));
            let name = self.at_level(&format!("conv_{mode:?}_plain").to_lowercase());
            let tol = self.tol();
            self.record(&name, &label, "cpu", &plain, want.as_deref(), tol);
            if self.dev.amp == Amp::O0 || !cuda::tc_supported(s, mode, None) {
                continue;
            }
            for tile in cuda::TILES {
                let imp = ConvImpl::Tc(tile);
                let got = self.run_conv(s, mode, imp, &xb, &wb, &dyb)?;
                if self.record(&tile.kernel(mode), &label, "plain", &got, Some(&plain), TOL)
                    == Status::Pass
                {
                    self.dev.mark_verified(s.key(mode, imp));
                }
            }
        }
        Ok(())
    }

    /// Runs one conv mode into a poisoned output and returns it (wgrad: fp32 gradient).
    fn run_conv(
        &self,
        s: &ConvShape,
        mode: ConvMode,
        imp: ConvImpl,
        x: &AnyBuf,
        w: &AnyBuf,
        dy: &AnyBuf,
    ) -> Result<Vec<f32>> {
        let c = s.conv;
        let (x, w, dy, imp) = (x.ptr(), w.ptr(), dy.ptr(), Some(imp));
        let out = match mode {
            ConvMode::Fprop => {
                let y = self.poisoned_act(s.n * s.oh() * s.ow() * c.cout)?;
                let out = ConvOut::dense(y.ptr(), c.cout);
                ConvFprop {
                    s: *s,
                    x,
                    w,
                    out,
                    imp,
                }
                .run(self.dev)?;
                self.read(&y)?
            }
            ConvMode::Dgrad => {
                let dx = self.poisoned_act(s.n * s.h * s.w * c.cin)?;
                let out = ConvOut::dense(dx.ptr(), c.cin);
                ConvDgrad {
                    s: *s,
                    dy,
                    w,
                    out,
                    imp,
                }
                .run(self.dev)?;
                self.read(&dx)?
            }
            ConvMode::Wgrad => {
                let dw = self.poisoned_f32(c.cout * c.kh * c.kw * c.cin)?;
                let ws_elems = wgrad_workspace_elems(s, self.dev.num_sms);
                let ws = self.poisoned_f32(ws_elems)?;
                let (dw_ptr, ws_ptr) = (dw.ptr, ws.ptr);
                ConvWgrad {
                    s: *s,
                    x,
                    dy,
                    dw: dw_ptr,
                    accumulate: false,
                    ws: ws_ptr,
                    ws_elems,
                    imp,
                }
                .run(self.dev)?;
                self.read_f32(&dw)?
            }
        };
        self.dev.synchronize()?;
        Ok(out)
    }

    /// The 3-channel stem on the tensor-core path: input and weights padded to 8 channels on the
    /// device (copy_channels) must give the plain 3-channel result.
    pub fn stem_padding(&mut self, s: &ConvShape) -> Result<()> {
        let c = s.conv;
        let x = self.random(s.n * s.h * s.w * c.cin, 1.0);
        let w = self.random(c.cout * c.kh * c.kw * c.cin, 0.3);
        let (xb, wb) = (self.act(&x)?, self.act(&w)?);
        let dummy = AnyBuf::F16(self.zeros::<f16>(1)?);
        let plain = self.run_conv(s, ConvMode::Fprop, ConvImpl::Plain, &xb, &wb, &dummy)?;
        let p = ConvShape {
            conv: Conv2d { cin: 8, ..c },
            ..*s
        };
        let (xp, wp) = (
            self.poisoned_act(s.n * s.h * s.w * 8)?,
            self.poisoned_act(c.cout * c.kh * c.kw * 8)?,
        );
        CopyChannels::pad(s.n * s.h * s.w, c.cin, 8, xb.ptr(), xp.ptr()).launch(self.dev)?;
        CopyChannels::pad(c.cout * c.kh * c.kw, c.cin, 8, wb.ptr(), wp.ptr()).launch(self.dev)?;
        let tile = cuda::preferred_tile(&p, ConvMode::Fprop, self.dev.num_sms);
        let got = self.run_conv(&p, ConvMode::Fprop, ConvImpl::Tc(tile), &xp, &wp, &dummy)?;
        self.record(
            &format!("pad_channels+{}", tile.kernel(ConvMode::Fprop)),
            &conv_label(s),
            "plain",
            &got,
            Some(&plain),
            TOL,
        );
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
            let tile = cuda::preferred_tile(s, mode, self.dev.num_sms);
            let slice = ConvOut {
                ptr: wide.ptr,
                ldc,
                c_offset: off,
                accumulate: true,
            };
            let dense_out = ConvOut::dense(dense.ptr, width);
            let (plain, fast) = (Some(ConvImpl::Plain), Some(ConvImpl::Tc(tile)));
            if mode == ConvMode::Fprop {
                let (x, w) = (xb.ptr, wb.ptr);
                let out = dense_out;
                ConvFprop {
                    s: *s,
                    x,
                    w,
                    out,
                    imp: plain,
                }
                .run(self.dev)?;
                ConvFprop {
                    s: *s,
                    x,
                    w,
                    out: slice,
                    imp: fast,
                }
                .run(self.dev)?;
            } else {
                let (dy, w) = (dyb.ptr, wb.ptr);
                let out = dense_out;
                ConvDgrad {
                    s: *s,
                    dy,
                    w,
                    out,
                    imp: plain,
                }
                .run(self.dev)?;
                ConvDgrad {
                    s: *s,
                    dy,
                    w,
                    out: slice,
                    imp: fast,
                }
                .run(self.dev)?;
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
}

impl SelfTest<'_> {
    /// Split-K partials [3][count] summed into an fp16 output, accumulating onto it (the fp16
    /// variant of the wgrad reduction), against the host.
    pub fn wgrad_reduce_f16(&mut self, count: usize) -> Result<()> {
        let splits = 3;
        let ws = self.random(splits * count, 1.0);
        let prev = self.random(count, 1.0);
        let (wsb, out) = (self.buf(&ws)?, self.f16_buf(&prev)?);
        let reduce = WgradReduce {
            ws: wsb.ptr,
            splits,
            count: count as u64,
            dw: out.ptr,
            accumulate: true,
            f32_out: false,
        };
        reduce.launch(self.dev)?;
        let got = self.read_f16(&out)?;
        let want: Vec<f32> = (0..count)
            .map(|i| prev[i] + (0..splits).map(|z| ws[z * count + i]).sum::<f32>())
            .collect();
        let label = format!("{count}");
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
