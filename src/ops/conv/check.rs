//! Self-test cases of the convolution launchers: the plain kernels against the CPU reference, every
//! tensor-core tile and variant (the phase-split data gradient, the stem's weight gradient over
//! its padded input) against the CPU reference, or against the plain kernels where the CPU
//! convolution is switched off (a pass marks the shape verified for that variant), the stem's
//! forward padded to 8 channels, and the epilogue's slice and accumulate options.

use anyhow::{Context, Result};
use half::f16;

use super::cuda::{
    self, needs_pad8, wgrad_workspace_elems, ConvDgrad, ConvFprop, ConvImpl, ConvMode, ConvOut,
    ConvWgrad, Tile, WgradReduce, PAD_CHANNELS,
};
use super::ConvShape;
use crate::gpu::check::{AnyBuf, SelfTest, Status, TOL};
use crate::gpu::{DevPtr, Launch};
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
    /// fprop, dgrad and wgrad of one shape: plain kernel vs CPU reference, then every tensor-core
    /// tile and variant the shape supports vs the CPU reference (vs the plain kernel when
    /// `cpu_conv` is off), marking each pass verified. At O0 only the plain fp32 kernels exist.
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
            if self.dev.amp == Amp::O0 {
                continue;
            }
            let oracle = match &want {
                Some(w) => ("cpu", w.as_slice()),
                None => ("plain", plain.as_slice()),
            };
            for imp in tc_variants(s, mode) {
                let got = match imp {
                    ConvImpl::TcPad8(_) => self.run_wgrad_pad8(s, imp, &xb, &dyb)?,
                    _ => self.run_conv(s, mode, imp, &xb, &wb, &dyb)?,
                };
                let kernel = variant_name(mode, imp);
                if self.record(&kernel, &label, oracle.0, &got, Some(oracle.1), TOL) == Status::Pass
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
            ConvMode::Wgrad => self.run_wgrad(s, imp, x, None, dy)?,
        };
        self.dev.synchronize()?;
        Ok(out)
    }

    /// The weight gradient into a poisoned fp32 buffer through a poisoned workspace.
    fn run_wgrad(
        &self,
        s: &ConvShape,
        imp: Option<ConvImpl>,
        x: DevPtr,
        x_padded: Option<DevPtr>,
        dy: DevPtr,
    ) -> Result<Vec<f32>> {
        let c = s.conv;
        let dw = self.poisoned_f32(c.cout * c.kh * c.kw * c.cin)?;
        let ws_elems = wgrad_workspace_elems(s, self.dev.num_sms);
        let ws = self.poisoned_f32(ws_elems)?;
        ConvWgrad {
            s: *s,
            x,
            x_padded,
            dy,
            dw: dw.ptr,
            accumulate: false,
            ws: ws.ptr,
            ws_elems,
            imp,
        }
        .run(self.dev)?;
        self.read_f32(&dw)
    }

    /// The weight gradient of an input of fewer than 8 channels on the tensor cores: the input
    /// padded to 8 channels on the device first (as the stem's forward pads it each step).
    fn run_wgrad_pad8(
        &self,
        s: &ConvShape,
        imp: ConvImpl,
        x: &AnyBuf,
        dy: &AnyBuf,
    ) -> Result<Vec<f32>> {
        let rows = s.n * s.h * s.w;
        let xp = self.poisoned_act(rows * PAD_CHANNELS)?;
        CopyChannels::pad(rows, s.conv.cin, PAD_CHANNELS, x.ptr(), xp.ptr()).launch(self.dev)?;
        let got = self.run_wgrad(s, Some(imp), x.ptr(), Some(xp.ptr()), dy.ptr())?;
        self.dev.synchronize()?;
        Ok(got)
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
        let narrow = self.dev.paths.narrow_tiles;
        let tile = cuda::preferred_tile(&p, ConvMode::Fprop, self.dev.num_sms, narrow);
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
    /// (ldc, c_offset) and add to what is there (accumulate), on the tensor-core implementation
    /// the device's paths prefer (for a strided data gradient with `dgrad_phase`, the phase
    /// kernel, whose rows map to pixels through the phase). The oracle is the plain kernel's
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
            let slice = ConvOut {
                ptr: wide.ptr,
                ldc,
                c_offset: off,
                accumulate: true,
            };
            let target = cuda::ConvTarget::of(self.dev);
            let imp = cuda::candidates(&target, s, mode, Some(&slice), false)
                .into_iter()
                .next()
                .with_context(|| format!("no tensor-core {mode:?} for {}", s.label()))?;
            let dense_out = ConvOut::dense(dense.ptr, width);
            let (plain, fast) = (Some(ConvImpl::Plain), Some(imp));
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
            let name = format!("{}(slice+accumulate)", variant_name(mode, imp));
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

/// Every tensor-core implementation of `mode` that `s` supports: each tile over the whole GEMM,
/// each tile by stride phase for a strided data gradient, each tile over the padded input for the
/// weight gradient of an input of fewer than 8 channels.
pub fn tc_variants(s: &ConvShape, mode: ConvMode) -> Vec<ConvImpl> {
    let tiles = || Tile::for_mode(mode);
    let mut v: Vec<ConvImpl> = Vec::new();
    if cuda::tc_supported(s, mode, None) {
        v.extend(tiles().map(ConvImpl::Tc));
        if mode == ConvMode::Dgrad && s.conv.stride > 1 {
            v.extend(tiles().map(ConvImpl::TcPhase));
        }
    }
    let padded = cuda::pad8(s);
    if mode == ConvMode::Wgrad && needs_pad8(s) && cuda::tc_supported(&padded, mode, None) {
        v.extend(tiles().map(ConvImpl::TcPad8));
    }
    v
}

/// The report's name of a tensor-core implementation: its entry point, with the padding and the
/// dropping reduction named for the stem's variant.
fn variant_name(mode: ConvMode, imp: ConvImpl) -> String {
    match imp {
        ConvImpl::Tc(t) => t.kernel(mode),
        ConvImpl::TcPhase(t) => t.phase_kernel(),
        ConvImpl::TcPad8(t) => {
            format!("pad_channels+{}+conv_wgrad_reduce_drop_f32", t.kernel(mode))
        }
        ConvImpl::Plain => "plain".into(),
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
