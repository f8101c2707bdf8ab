//! Preparing a benchmark case: its buffers, filled, and one closure per implementation. The
//! custom kernels run the same launch values (`Launch`) a training step runs; the convolution and
//! classifier cases and their cuDNN/cuBLAS references are in prepare_conv.rs.

use anyhow::Result;

use super::cases::{BnCase, Cases, PoolCase, RMSPROP_BYTES_PER_PARAM};
use super::gpu::{Case, Fill, Gpu, Prepared, Variant, Work, COPY_BYTES};
use crate::gpu::Launch;
use crate::ops::batchnorm::cuda::{bn_workspace, BnArgs, BnBackward, BnForwardTrain};
use crate::ops::pool::cuda::{argmax_bytes, PoolBackward, PoolForward};
use crate::ops::softmax_ce::cuda::{Labels, ScaleArg, SoftmaxCe};
use crate::optim::cuda::{Rmsprop, RmspropParams};

impl Gpu {
    /// Allocates and fills the buffers of `case` and returns its runnable implementations.
    pub fn prepare<'a>(&'a self, case: &Case, cases: &Cases) -> Result<Prepared<'a>> {
        match case {
            Case::Copy => self.prep_copy(),
            Case::Matrix => self.prep_matrix(),
            Case::Conv(c, m) => self.prep_conv(case.id(), c.label(), c.flop(), &c.shape, *m),
            Case::ConvPad8(c) => self.prep_conv_pad8(case.id(), c),
            Case::Fc(m) => self.prep_fc(case.id(), &cases.fc_shape(), *m),
            Case::Bn(b, fwd) => self.prep_bn(case.id(), b, *fwd),
            Case::Pool(p, fwd) => self.prep_pool(case.id(), p, *fwd),
            Case::SoftmaxCe => self.prep_softmax(case.id(), cases.batch, cases.classes),
            Case::Rmsprop => self.prep_rmsprop(case.id(), cases.params),
        }
    }

    pub(super) fn prep_copy(&self) -> Result<Prepared<'_>> {
        let src = self.filled(COPY_BYTES / 4, Fill::F32)?;
        let dst = self.alloc(COPY_BYTES)?;
        let stream = self.be.stream.cu_stream();
        let run = move || -> Result<()> {
            // SAFETY: both buffers hold COPY_BYTES and live as long as the closure.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, COPY_BYTES, stream)
            }?;
            Ok(())
        };
        Ok(Prepared {
            id: Case::Copy.id(),
            group: "copy",
            shape: format!("{} MiB", COPY_BYTES >> 20),
            work: Work::Bytes(2.0 * COPY_BYTES as f64),
            variants: vec![Variant {
                label: "cuMemcpyDtoD".into(),
                reference: true,
                run: Box::new(run),
            }],
            note: None,
        })
    }

    fn prep_bn(&self, id: String, b: &BnCase, fwd: bool) -> Result<Prepared<'_>> {
        let (m, c) = (b.m, b.c);
        let x = self.filled(m * c, Fill::F16)?;
        let y = self.filled(m * c, Fill::F16)?;
        let dy = self.filled(m * c, Fill::F16)?;
        let dx = self.alloc(m * c * 2)?;
        let gamma = self.filled(c, Fill::F32Positive)?;
        let beta = self.filled(c, Fill::F32)?;
        let mean = self.filled(c, Fill::F32)?;
        let inv_std = self.filled(c, Fill::F32Positive)?;
        let rmean = self.filled(c, Fill::F32)?;
        let rvar = self.filled(c, Fill::F32Positive)?;
        let dgamma = self.alloc(c * 4)?;
        let dbeta = self.alloc(c * 4)?;
        let ws = self.alloc(bn_workspace(m, c) * 4)?;
        let counter = self.alloc(4)?;
        let args = BnArgs {
            m,
            c,
            eps: 1e-3,
            momentum: 0.1,
            relu: true,
            gamma: gamma.ptr,
            beta: beta.ptr,
            save_mean: mean.ptr,
            save_inv_std: inv_std.ptr,
            running_mean: rmean.ptr,
            running_var: rvar.ptr,
            ldy: c,
            yoff: 0,
            // The kernel paths of this run (`bench kernels --kernels`).
            vec: self.be.paths.bn_vec,
            counter: counter.ptr,
        };
        let be = &self.be;
        // The forward overwrites the saved statistics: the backward case has its own buffers.
        let forward = BnForwardTrain {
            a: args,
            x: x.ptr,
            y: y.ptr,
            ws: ws.ptr,
        };
        let backward = BnBackward {
            a: args,
            x: x.ptr,
            y: y.ptr,
            dy: dy.ptr,
            dgamma: dgamma.ptr,
            dbeta: dbeta.ptr,
            dx: dx.ptr,
            accumulate: false,
            ws: ws.ptr,
        };
        let vec = args.vec_fits(&[x.ptr, y.ptr, dy.ptr, dx.ptr]);
        let keep = (
            gamma, beta, mean, inv_std, rmean, rvar, x, y, dy, dx, dgamma, dbeta, ws, counter,
        );
        let run: Box<dyn FnMut() -> Result<()>> = Box::new(move || {
            let _ = &keep;
            match fwd {
                true => forward.launch(be),
                false => backward.launch(be),
            }
        });
        let kind = if fwd {
            "bn_forward_train"
        } else {
            "bn_backward"
        };
        let variants = vec![Variant {
            label: format!("{kind}{}", if vec { " (vectorised)" } else { "" }),
            reference: false,
            run,
        }];
        Ok(Prepared {
            id,
            group: "batchnorm",
            shape: format!("[{m}][{c}] +relu"),
            work: Work::Bytes(if fwd { b.fwd_bytes() } else { b.bwd_bytes() }),
            variants,
            note: None,
        })
    }

    fn prep_pool(&self, id: String, p: &PoolCase, fwd: bool) -> Result<Prepared<'_>> {
        let s = p.shape;
        let x = self.filled(s.n * s.h * s.w * s.c, Fill::F16)?;
        let dx = self.alloc(s.n * s.h * s.w * s.c * 2)?;
        let y = self.filled(s.n * s.oh() * s.ow() * s.c, Fill::F16)?;
        let be = &self.be;
        let max = p.max;
        let (ldy, yoff) = (s.c, 0);
        // The kernel paths of this run (`bench kernels --kernels`): the max pool saves its argmax
        // in the forward and the backward gathers through it.
        let argmax = self.alloc(argmax_bytes(&s))?;
        let am = if max && self.be.paths.pool_argmax {
            argmax.ptr
        } else {
            0
        };
        let label = format!(
            "{}pool_{}{}",
            if max { "max" } else { "avg" },
            if fwd { "fwd" } else { "bwd" },
            if am != 0 { " (argmax)" } else { "" }
        );
        let forward = PoolForward {
            s,
            max,
            x: x.ptr,
            y: y.ptr,
            ldy,
            yoff,
            argmax: am,
        };
        if am != 0 {
            forward.launch(be)?; // the backward gathers through a real argmax
        }
        let backward = PoolBackward {
            s,
            max,
            x: if am == 0 { x.ptr } else { 0 },
            dy: y.ptr,
            ldy,
            yoff,
            dx: dx.ptr,
            accumulate: false,
            argmax: am,
        };
        let keep = (x, y, dx, argmax);
        let run: Box<dyn FnMut() -> Result<()>> = Box::new(move || {
            let _ = &keep;
            match fwd {
                true => forward.launch(be),
                false => backward.launch(be),
            }
        });
        let variants = vec![Variant {
            label,
            reference: false,
            run,
        }];
        Ok(Prepared {
            id,
            group: "pool",
            shape: p.label(),
            work: Work::Bytes(if fwd { p.fwd_bytes() } else { p.bwd_bytes() }),
            variants,
            note: None,
        })
    }

    fn prep_softmax(&self, id: String, n: usize, k: usize) -> Result<Prepared<'_>> {
        let logits = self.filled(n * k, Fill::F16)?;
        let dlogits = self.alloc(n * k * 2)?;
        let labels: Vec<i32> = (0..n).map(|i| ((i * 7919) % k) as i32).collect();
        let lab = self.alloc(n * 4)?;
        // SAFETY: `lab` holds n i32 values.
        unsafe { cudarc::driver::result::memcpy_htod_sync(lab.ptr, &labels) }?;
        let row_loss = self.alloc(n * 4)?;
        let loss = self.alloc(4)?;
        let counter = self.alloc(4)?;
        let be = &self.be;
        let call = SoftmaxCe {
            n,
            k,
            smoothing: 0.1,
            grad_scale: ScaleArg::Value(1.0),
            logits: logits.ptr,
            labels: Labels::I32(lab.ptr),
            row_loss: row_loss.ptr,
            loss: loss.ptr,
            counter: counter.ptr,
            dlogits: dlogits.ptr,
        };
        let keep = (logits, lab, row_loss, loss, counter, dlogits);
        let run = move || {
            let _ = &keep;
            call.launch(be)
        };
        Ok(Prepared {
            id,
            group: "softmax_ce",
            shape: format!("{n}x{k}"),
            // Read the logits and the labels, write the logit gradients.
            work: Work::Bytes((2 * n * k * 2 + n * 4) as f64),
            variants: vec![Variant {
                label: "softmax_ce_i32".into(),
                reference: false,
                run: Box::new(run),
            }],
            note: None,
        })
    }

    fn prep_rmsprop(&self, id: String, count: usize) -> Result<Prepared<'_>> {
        let w = self.filled(count, Fill::F32)?;
        let w16 = self.alloc(count * 2)?;
        let ms = self.filled(count, Fill::F32Positive)?;
        let mom = self.filled(count, Fill::F32)?;
        let grad = self.filled(count, Fill::F32)?;
        let p = RmspropParams {
            w: w.ptr,
            w16: w16.ptr,
            ms: ms.ptr,
            mom: mom.ptr,
            grad: grad.ptr,
            count: count as u64,
            lr: 1e-6,
            rho: 0.9,
            momentum: 0.9,
            eps: 1.0,
            weight_decay: 4e-5,
            inv_loss_scale: 1.0,
            ..Default::default()
        };
        let be = &self.be;
        let keep = (w, w16, ms, mom, grad);
        let run = move || {
            let _ = &keep;
            Rmsprop {
                params: p,
                grad_f16: false,
            }
            .launch(be)
        };
        Ok(Prepared {
            id,
            group: "rmsprop",
            shape: format!("{count} params, fp32 grads"),
            work: Work::Bytes(RMSPROP_BYTES_PER_PARAM * count as f64),
            variants: vec![Variant {
                label: "rmsprop_f32".into(),
                reference: false,
                run: Box::new(run),
            }],
            note: None,
        })
    }
}
