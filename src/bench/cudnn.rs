//! A small RAII layer over cuDNN's legacy convolution API (cudarc's `sys`/`result` layers), on raw
//! device addresses so it runs on the same buffers as the custom launchers: NHWC fp16 tensors,
//! `[cout][kh][kw][cin]` fp16 filters (cuDNN's NHWC filter format), fp32 accumulation (the
//! convolution's compute type is FLOAT), and the fastest algorithm that `cudnnFind*AlgorithmEx`
//! measures within the workspace we give it.
//!
//! Every call here goes through cudarc's dynamically loaded cuDNN, which panics when the library is
//! missing: [`Dnn::new`] probes for it first and returns an error instead.

use std::ffi::c_void;

use anyhow::{bail, Context, Result};
use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;

use crate::gpu::DevPtr;
use crate::ops::conv::cuda::ConvMode;
use crate::ops::conv::ConvShape;

fn ok(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    status
        .result()
        .map_err(|e| anyhow::anyhow!("cuDNN {what}: {e}"))
}

/// A cuDNN handle bound to a stream.
pub struct Dnn {
    handle: sys::cudnnHandle_t,
}

impl Dnn {
    /// Opens cuDNN on `stream`; an error (not a panic) when libcudnn cannot be loaded.
    pub fn new(stream: &CudaStream) -> Result<Self> {
        // SAFETY: only tries to dlopen the candidate library names.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "libcudnn not found (put the nvidia-cudnn wheel's lib folder on LD_LIBRARY_PATH)"
            );
        }
        stream.context().bind_to_thread()?;
        let handle = result::create_handle().context("cudnnCreate")?;
        let dnn = Self { handle };
        // SAFETY: a live handle and the backend's live stream.
        unsafe { result::set_stream(handle, stream.cu_stream() as _) }.context("cudnnSetStream")?;
        Ok(dnn)
    }

    /// cuDNN's version number, e.g. 91000.
    pub fn version() -> usize {
        result::get_version()
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
impl TensorDesc {
    fn nhwc_f16(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let d = Self(result::create_tensor_descriptor()?);
        let dims = [n as i32, c as i32, h as i32, w as i32];
        // SAFETY: a freshly created descriptor.
        unsafe {
            result::set_tensor4d_descriptor(
                d.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                sys::cudnnDataType_t::CUDNN_DATA_HALF,
                dims,
            )
        }?;
        Ok(d)
    }
}
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created in `DnnConv::new`, destroyed once.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created in `DnnConv::new`, destroyed once.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// The algorithm cudnnFind chose for one mode: its number in cuDNN's enum for that mode, the math
/// type it was measured with, cuDNN's own time and its workspace.
#[derive(Clone, Copy, Debug)]
pub struct Algo {
    pub mode: ConvMode,
    id: AlgoId,
    math: sys::cudnnMathType_t,
    pub tensor_ops: bool,
    pub find_ms: f32,
    pub workspace: usize,
}

/// cuDNN's algorithm enum of each mode.
#[derive(Clone, Copy, Debug)]
enum AlgoId {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

impl AlgoId {
    fn number(self) -> u32 {
        match self {
            AlgoId::Fwd(a) => a as u32,
            AlgoId::Data(a) => a as u32,
            AlgoId::Filter(a) => a as u32,
        }
    }
}

impl Algo {
    pub fn describe(&self) -> String {
        let family = match self.mode {
            ConvMode::Fprop => "fwd",
            ConvMode::Dgrad => "bwd_data",
            ConvMode::Wgrad => "bwd_filter",
        };
        let tc = if self.tensor_ops { "tc" } else { "fma" };
        format!("cudnn {family} algo {} ({tc})", self.id.number())
    }
}

/// Descriptors of one convolution: x [n,h,w,cin], w [cout,kh,kw,cin], y [n,oh,ow,cout].
pub struct DnnConv {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

const ALPHA: f32 = 1.0;
const BETA: f32 = 0.0;

impl DnnConv {
    /// cuDNN pads symmetrically: an asymmetric padding is refused.
    pub fn new(s: &ConvShape) -> Result<Self> {
        let c = &s.conv;
        if c.pad_top != c.pad_bottom || c.pad_left != c.pad_right {
            bail!("cuDNN needs symmetric padding");
        }
        let x = TensorDesc::nhwc_f16(s.n, c.cin, s.h, s.w)?;
        let y = TensorDesc::nhwc_f16(s.n, c.cout, s.oh(), s.ow())?;
        let w = FilterDesc(result::create_filter_descriptor()?);
        let conv = ConvDesc(result::create_convolution_descriptor()?);
        // SAFETY: freshly created descriptors.
        unsafe {
            result::set_filter4d_descriptor(
                w.0,
                sys::cudnnDataType_t::CUDNN_DATA_HALF,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [c.cout as i32, c.cin as i32, c.kh as i32, c.kw as i32],
            )?;
            result::set_convolution2d_descriptor(
                conv.0,
                c.pad_top as i32,
                c.pad_left as i32,
                c.stride as i32,
                c.stride as i32,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )?;
            result::set_convolution_math_type(
                conv.0,
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
            )?;
        }
        Ok(Self { x, w, y, conv })
    }

    /// Runs cudnnFind*AlgorithmEx for `mode` on the given buffers (which it overwrites) and
    /// returns the fastest successful algorithm. `x`, `w` are the inputs of fprop; `y` its output
    /// (dy for the gradients); `dx` / `dw` (fp16) the gradient outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn find(
        &self,
        dnn: &Dnn,
        mode: ConvMode,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        ws: DevPtr,
        ws_bytes: usize,
    ) -> Result<Algo> {
        const MAX: usize = 16;
        let mut count = 0i32;
        let (x, w, y, wsp) = (
            x as *mut c_void,
            w as *mut c_void,
            y as *mut c_void,
            ws as *mut c_void,
        );
        // (algo, status, time, memory, math) of each result, best first.
        let results: Vec<(AlgoId, sys::cudnnStatus_t, f32, usize, sys::cudnnMathType_t)> =
            match mode {
                ConvMode::Fprop => {
                    // SAFETY: all-zero is a valid bit pattern for these C structs.
                    let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; MAX] =
                        unsafe { std::mem::zeroed() };
                    // SAFETY: descriptors match the buffers; perf holds MAX entries.
                    ok(
                        unsafe {
                            sys::cudnnFindConvolutionForwardAlgorithmEx(
                                dnn.handle,
                                self.x.0,
                                x,
                                self.w.0,
                                w,
                                self.conv.0,
                                self.y.0,
                                y,
                                MAX as i32,
                                &mut count,
                                perf.as_mut_ptr(),
                                wsp,
                                ws_bytes,
                            )
                        },
                        "FindConvolutionForwardAlgorithmEx",
                    )?;
                    perf[..count as usize]
                        .iter()
                        .map(|p| (AlgoId::Fwd(p.algo), p.status, p.time, p.memory, p.mathType))
                        .collect()
                }
                ConvMode::Dgrad => {
                    // SAFETY: as above.
                    let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; MAX] =
                        unsafe { std::mem::zeroed() };
                    // SAFETY: as above; x receives dx.
                    ok(
                        unsafe {
                            sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                                dnn.handle,
                                self.w.0,
                                w,
                                self.y.0,
                                y,
                                self.conv.0,
                                self.x.0,
                                x,
                                MAX as i32,
                                &mut count,
                                perf.as_mut_ptr(),
                                wsp,
                                ws_bytes,
                            )
                        },
                        "FindConvolutionBackwardDataAlgorithmEx",
                    )?;
                    perf[..count as usize]
                        .iter()
                        .map(|p| (AlgoId::Data(p.algo), p.status, p.time, p.memory, p.mathType))
                        .collect()
                }
                ConvMode::Wgrad => {
                    // SAFETY: as above.
                    let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; MAX] =
                        unsafe { std::mem::zeroed() };
                    // SAFETY: as above; w receives dw.
                    ok(
                        unsafe {
                            sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                                dnn.handle,
                                self.x.0,
                                x,
                                self.y.0,
                                y,
                                self.conv.0,
                                self.w.0,
                                w,
                                MAX as i32,
                                &mut count,
                                perf.as_mut_ptr(),
                                wsp,
                                ws_bytes,
                            )
                        },
                        "FindConvolutionBackwardFilterAlgorithmEx",
                    )?;
                    perf[..count as usize]
                        .iter()
                        .map(|p| {
                            (
                                AlgoId::Filter(p.algo),
                                p.status,
                                p.time,
                                p.memory,
                                p.mathType,
                            )
                        })
                        .collect()
                }
            };
        let best = results
            .iter()
            .find(|r| r.1 == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && r.3 <= ws_bytes)
            .with_context(|| {
                format!("cuDNN found no {mode:?} algorithm within {ws_bytes} bytes")
            })?;
        Ok(Algo {
            mode,
            id: best.0,
            math: best.4,
            tensor_ops: best.4 != sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            find_ms: best.2,
            workspace: best.3,
        })
    }

    /// Queues one launch of `algo` (same buffer roles as [`Self::find`]).
    pub fn run(
        &self,
        dnn: &Dnn,
        algo: &Algo,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        ws: DevPtr,
    ) -> Result<()> {
        let (a, b) = (
            &ALPHA as *const f32 as *const c_void,
            &BETA as *const f32 as *const c_void,
        );
        let (x, w, y, wsp) = (
            x as *mut c_void,
            w as *mut c_void,
            y as *mut c_void,
            ws as *mut c_void,
        );
        // SAFETY: the descriptors match the buffers the caller allocated for this shape and the
        // workspace holds at least `algo.workspace` bytes.
        unsafe {
            result::set_convolution_math_type(self.conv.0, algo.math)?;
            match algo.id {
                AlgoId::Fwd(id) => result::convolution_forward(
                    dnn.handle,
                    a,
                    self.x.0,
                    x,
                    self.w.0,
                    w,
                    self.conv.0,
                    id,
                    wsp,
                    algo.workspace,
                    b,
                    self.y.0,
                    y,
                ),
                AlgoId::Data(id) => result::convolution_backward_data(
                    dnn.handle,
                    a,
                    self.w.0,
                    w,
                    self.y.0,
                    y,
                    self.conv.0,
                    id,
                    wsp,
                    algo.workspace,
                    b,
                    self.x.0,
                    x,
                ),
                AlgoId::Filter(id) => result::convolution_backward_filter(
                    dnn.handle,
                    a,
                    self.x.0,
                    x,
                    self.y.0,
                    y,
                    self.conv.0,
                    id,
                    wsp,
                    algo.workspace,
                    b,
                    self.w.0,
                    w,
                ),
            }
        }
        .map_err(|e| anyhow::anyhow!("cuDNN {:?}: {e}", algo.mode))
    }
}
