//! The convolution and classifier benchmark cases: our launchers at each InceptionV4 shape against
//! cuDNN's best algorithm (found per shape) and the classifier's three GEMMs against cublasGemmEx;
//! and the card's matrix rate (one large cublasGemmEx).

use std::rc::Rc;

use anyhow::Result;
use cudarc::cublas;

use super::cases::ConvCase;
use super::cudnn::{Dnn, DnnConv};
use super::gpu::{Case, DevBuf, Fill, Gpu, Prepared, Variant, Work, CUDNN_WORKSPACE, MATRIX_DIM};
use crate::gpu::{DevPtr, Launch};
use crate::ops::concat::cuda::CopyChannels;
use crate::ops::conv::cuda::{
    choose, choose_on, needs_pad8, wgrad_workspace_elems, ConvDgrad, ConvFprop, ConvImpl, ConvMode,
    ConvOut, ConvWgrad, PAD_CHANNELS,
};
use crate::ops::conv::ConvShape;

/// A conv case's device tensors, in the roles cuDNN sees them: x (dx for dgrad), w (dw for wgrad),
/// y (dy for the gradients); `x8` the input padded to 8 channels where it has fewer (the stem's
/// copy, which the training step's forward makes and its weight gradient may read).
struct ConvBufs {
    x: Rc<DevBuf>,
    w: Rc<DevBuf>,
    y: Rc<DevBuf>,
    x8: Option<Rc<DevBuf>>,
}

impl Gpu {
    fn conv_bufs(&self, s: &ConvShape) -> Result<ConvBufs> {
        let c = s.conv;
        let rows = s.n * s.h * s.w;
        let x = Rc::new(self.filled(rows * c.cin, Fill::F16)?);
        let w = Rc::new(self.filled(c.cout * c.kh * c.kw * c.cin, Fill::F16)?);
        let y = Rc::new(self.filled(s.n * s.oh() * s.ow() * c.cout, Fill::F16)?);
        let x8 = match needs_pad8(s) {
            true => {
                let x8 = self.alloc(rows * PAD_CHANNELS * 2)?;
                CopyChannels::pad(rows, c.cin, PAD_CHANNELS, x.ptr, x8.ptr).launch(&self.be)?;
                self.be.synchronize()?;
                Some(Rc::new(x8))
            }
            false => None,
        };
        Ok(ConvBufs { x, w, y, x8 })
    }

    /// Our launch of `mode` on `b`: the implementation the device's kernel paths choose.
    fn custom_conv(&self, s: ConvShape, mode: ConvMode, b: &ConvBufs) -> Result<Variant<'_>> {
        let c = s.conv;
        let be = &self.be;
        // Each closure holds the buffers it launches on: a row without a reference (no cuDNN, a
        // second set of kernel paths) would otherwise time launches on freed memory.
        let keep = (b.x.clone(), b.w.clone(), b.y.clone(), b.x8.clone());
        let (xc, wc, yc) = (b.x.clone(), b.w.clone(), b.y.clone());
        let x8 = b.x8.clone();
        let (run, chosen): (Box<dyn FnMut() -> Result<()> + '_>, ConvImpl) = match mode {
            ConvMode::Fprop => {
                let out = ConvOut::dense(yc.ptr, c.cout);
                let call = ConvFprop {
                    s,
                    x: xc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                let chosen = choose(be, &s, mode, Some(&out));
                let run = move || {
                    let _ = &keep;
                    call.launch(be)
                };
                (Box::new(run), chosen)
            }
            ConvMode::Dgrad => {
                let out = ConvOut::dense(xc.ptr, c.cin);
                let call = ConvDgrad {
                    s,
                    dy: yc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                let chosen = choose(be, &s, mode, Some(&out));
                let run = move || {
                    let _ = &keep;
                    call.launch(be)
                };
                (Box::new(run), chosen)
            }
            ConvMode::Wgrad => {
                let ws_elems = wgrad_workspace_elems(&s, be.num_sms);
                let ws = self.alloc(ws_elems * 4)?;
                let dw = self.alloc(c.cout * c.kh * c.kw * c.cin * 4)?;
                let mut call = wgrad(s, xc.ptr, yc.ptr, dw.ptr, ws.ptr, ws_elems);
                call.x_padded = x8.as_ref().map(|b| b.ptr);
                let padded = call.x_padded.is_some();
                let chosen = choose_on(be, &s, mode, None, padded);
                let run = move || {
                    let _ = (&ws, &dw, &keep);
                    call.launch(be)
                };
                (Box::new(run), chosen)
            }
        };
        let dw_note = if mode == ConvMode::Wgrad {
            " (fp32 dW)"
        } else {
            ""
        };
        Ok(Variant {
            label: format!("custom {chosen:?}{dw_note}"),
            reference: false,
            run,
        })
    }

    pub(super) fn prep_conv(
        &self,
        id: String,
        shape: String,
        flop: f64,
        s: &ConvShape,
        mode: ConvMode,
    ) -> Result<Prepared<'_>> {
        let b = self.conv_bufs(s)?;
        let mut variants = vec![self.custom_conv(*s, mode, &b)?];
        let mut note = None;
        match (&self.dnn, &self.cudnn_ws) {
            (Ok(dnn), Some(ws)) => match self.cudnn_conv(dnn, ws, s, mode, &b.x, &b.w, &b.y) {
                Ok(v) => variants.push(v),
                Err(e) => note = Some(format!("{e:#}")),
            },
            (Err(e), _) => note = Some(e.clone()),
            _ => note = Some("no cuDNN workspace".into()),
        }
        Ok(Prepared {
            id,
            group: "conv",
            shape,
            work: Work::Flop(flop),
            variants,
            note,
        })
    }

    /// pad_channels(x) + the tensor-core forward on the 8-channel shape, against cuDNN's forward on
    /// the original shape. FLOP are those of the original convolution.
    pub(super) fn prep_conv_pad8(&self, id: String, case: &ConvCase) -> Result<Prepared<'_>> {
        let s = case.shape;
        let c = s.conv;
        let p = pad8(&s);
        let rows = s.n * s.h * s.w;
        let w_rows = c.cout * c.kh * c.kw;
        let x = Rc::new(self.filled(rows * c.cin, Fill::F16)?);
        let w = Rc::new(self.filled(w_rows * c.cin, Fill::F16)?);
        let y = Rc::new(self.filled(s.n * s.oh() * s.ow() * c.cout, Fill::F16)?);
        let x8 = self.alloc(rows * 8 * 2)?;
        let w8 = self.alloc(w_rows * 8 * 2)?;
        let be = &self.be;
        CopyChannels::pad(w_rows, c.cin, 8, w.ptr, w8.ptr).launch(be)?;
        be.synchronize()?;
        let out = ConvOut::dense(y.ptr, c.cout);
        let imp = choose(be, &p, ConvMode::Fprop, Some(&out));
        let pad = CopyChannels::pad(rows, c.cin, 8, x.ptr, x8.ptr);
        let conv = ConvFprop {
            s: p,
            x: x8.ptr,
            w: w8.ptr,
            out,
            imp: None,
        };
        let keep = (x.clone(), y.clone(), x8, w8);
        let mut variants = vec![Variant {
            label: format!("pad_channels + custom {imp:?}"),
            reference: false,
            run: Box::new(move || {
                let _ = &keep;
                pad.launch(be)?;
                conv.launch(be)
            }),
        }];
        let mut note = None;
        match (&self.dnn, &self.cudnn_ws) {
            (Ok(dnn), Some(ws)) => {
                match self.cudnn_conv(dnn, ws, &s, ConvMode::Fprop, &x, &w, &y) {
                    Ok(v) => variants.push(v),
                    Err(e) => note = Some(format!("{e:#}")),
                }
            }
            (Err(e), _) => note = Some(e.clone()),
            _ => note = Some("no cuDNN workspace".into()),
        }
        Ok(Prepared {
            id,
            group: "conv",
            shape: case.label(),
            work: Work::Flop(case.flop()),
            variants,
            note,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn cudnn_conv<'a>(
        &'a self,
        dnn: &'a Dnn,
        ws: &'a DevBuf,
        s: &ConvShape,
        mode: ConvMode,
        x: &Rc<DevBuf>,
        w: &Rc<DevBuf>,
        y: &Rc<DevBuf>,
    ) -> Result<Variant<'a>> {
        let conv = DnnConv::new(s)?;
        let algo = conv.find(dnn, mode, x.ptr, w.ptr, y.ptr, ws.ptr, CUDNN_WORKSPACE)?;
        let (x, w, y) = (x.clone(), w.clone(), y.clone());
        let wsp = ws.ptr;
        Ok(Variant {
            label: algo.describe(),
            reference: true,
            run: Box::new(move || conv.run(dnn, &algo, x.ptr, w.ptr, y.ptr, wsp)),
        })
    }

    /// The classifier y[n][out] = x[n][in] W[out][in]^T as its three GEMMs: ours (the 1x1
    /// convolution launchers the linear layer uses, bias excluded) against cublasGemmEx with fp16
    /// operands and fp32 compute (fp32 output for the weight gradient, like ours).
    pub(super) fn prep_fc(
        &self,
        id: String,
        s: &ConvShape,
        mode: ConvMode,
    ) -> Result<Prepared<'_>> {
        let s = *s;
        let (n, fin, fout) = (s.n, s.conv.cin, s.conv.cout);
        let be = &self.be;
        let x = Rc::new(self.filled(n * fin, Fill::F16)?);
        let w = Rc::new(self.filled(fout * fin, Fill::F16)?);
        let y = Rc::new(self.filled(n * fout, Fill::F16)?);
        let dw = Rc::new(self.alloc(fout * fin * 4)?);
        let (xc, wc, yc, dwc) = (x.clone(), w.clone(), y.clone(), dw.clone());
        let custom: Box<dyn FnMut() -> Result<()>> = match mode {
            ConvMode::Fprop => {
                let out = ConvOut::dense(yc.ptr, fout);
                let call = ConvFprop {
                    s,
                    x: xc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                Box::new(move || call.launch(be))
            }
            ConvMode::Dgrad => {
                let out = ConvOut::dense(xc.ptr, fin);
                let call = ConvDgrad {
                    s,
                    dy: yc.ptr,
                    w: wc.ptr,
                    out,
                    imp: None,
                };
                Box::new(move || call.launch(be))
            }
            ConvMode::Wgrad => {
                let ws_elems = wgrad_workspace_elems(&s, be.num_sms);
                let ws = self.alloc(ws_elems * 4)?;
                let call = wgrad(s, xc.ptr, yc.ptr, dwc.ptr, ws.ptr, ws_elems);
                Box::new(move || {
                    let _ = (&ws, &xc, &yc, &dwc);
                    call.launch(be)
                })
            }
        };
        let out = (mode != ConvMode::Dgrad).then_some(ConvOut::dense(y.ptr, fout));
        let imp = choose(be, &s, mode, out.as_ref());
        let mut variants = vec![Variant {
            label: format!("custom {imp:?}"),
            reference: false,
            run: custom,
        }];
        let mut note = None;
        match &self.blas {
            Ok(blas) => {
                let handle = *blas.handle();
                variants.push(Variant {
                    label: "cublasGemmEx fp16/fp32".into(),
                    reference: true,
                    run: Box::new(move || {
                        fc_gemm(handle, mode, (n, fin, fout), x.ptr, w.ptr, y.ptr, dw.ptr)
                    }),
                });
            }
            Err(e) => note = Some(e.clone()),
        }
        Ok(Prepared {
            id,
            group: "fc",
            shape: format!("{n}x{fin}->{fout}"),
            work: Work::Flop(2.0 * (n * fin * fout) as f64),
            variants,
            note,
        })
    }
}

impl Gpu {
    /// The card's matrix rate: one cublasGemmEx of `MATRIX_DIM`^3 with fp16 operands and fp32
    /// compute (the reference every convolution's limit is computed from).
    pub(super) fn prep_matrix(&self) -> Result<Prepared<'_>> {
        let d = MATRIX_DIM;
        let (a, b, c) = (
            self.filled(d * d, Fill::F16)?,
            self.filled(d * d, Fill::F16)?,
            self.alloc(d * d * 2)?,
        );
        let blas = self.blas.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let handle = *blas.handle();
        let run = move || fc_gemm(handle, ConvMode::Fprop, (d, d, d), a.ptr, b.ptr, c.ptr, 0);
        Ok(Prepared {
            id: Case::Matrix.id(),
            group: "matrix",
            shape: format!("{d}x{d}x{d}"),
            work: Work::Flop(2.0 * (d * d * d) as f64),
            variants: vec![Variant {
                label: "cublasGemmEx fp16/fp32".into(),
                reference: true,
                run: Box::new(run),
            }],
            note: None,
        })
    }
}

/// The weight-gradient call of a benchmark case (fp32 dW, overwritten).
fn wgrad(
    s: ConvShape,
    x: DevPtr,
    dy: DevPtr,
    dw: DevPtr,
    ws: DevPtr,
    ws_elems: usize,
) -> ConvWgrad {
    ConvWgrad {
        s,
        x,
        x_padded: None,
        dy,
        dw,
        accumulate: false,
        ws,
        ws_elems,
        imp: None,
    }
}

/// `s` with its input channels padded to 8 (what [`Case::ConvPad8`] runs).
pub use crate::ops::conv::cuda::pad8;

/// One cublasGemmEx of the classifier (column-major view of row-major tensors):
/// fprop Y^T = W^T^T X^T; dgrad dX^T = W^T dY^T; wgrad dW^T = X^T dY (fp32 output).
fn fc_gemm(
    handle: cublas::sys::cublasHandle_t,
    mode: ConvMode,
    (n, fin, fout): (usize, usize, usize),
    x: DevPtr,
    w: DevPtr,
    y: DevPtr,
    dw: DevPtr,
) -> Result<()> {
    use cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType,
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (n, fin, fout) = (n as i32, fin as i32, fout as i32);
    let h = cudaDataType::CUDA_R_16F;
    // (transa, transb, m, n, k, A, lda, B, ldb, C, C type, ldc)
    let (ta, tb, m, nn, k, a, lda, b, ldb, c, ct, ldc) = match mode {
        ConvMode::Fprop => (
            Op::CUBLAS_OP_T,
            Op::CUBLAS_OP_N,
            fout,
            n,
            fin,
            w,
            fin,
            x,
            fin,
            y,
            h,
            fout,
        ),
        ConvMode::Dgrad => (
            Op::CUBLAS_OP_N,
            Op::CUBLAS_OP_N,
            fin,
            n,
            fout,
            w,
            fin,
            y,
            fout,
            x,
            h,
            fin,
        ),
        ConvMode::Wgrad => (
            Op::CUBLAS_OP_N,
            Op::CUBLAS_OP_T,
            fin,
            fout,
            n,
            x,
            fin,
            y,
            fout,
            dw,
            cudaDataType::CUDA_R_32F,
            fin,
        ),
    };
    // SAFETY: the buffers hold the matrices these dimensions describe (allocated in prep_fc) and
    // alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cublas::result::gemm_ex(
            handle,
            ta,
            tb,
            m,
            nn,
            k,
            &alpha as *const f32 as *const _,
            a as *const _,
            h,
            lda,
            b as *const _,
            h,
            ldb,
            &beta as *const f32 as *const _,
            c as *mut _,
            ct,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| anyhow::anyhow!("cublasGemmEx: {e:?}"))
}
