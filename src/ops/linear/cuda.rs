//! Fully connected launchers: the GEMMs run on the convolution kernels as a 1x1 convolution over
//! an `n x 1 x 1` image ([`ConvShape::fc`]); the bias kernels are in kernels/linear.cu.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::ops::conv::cuda::{
    wgrad_workspace_elems, ConvDgrad, ConvFprop, ConvImpl, ConvOut, ConvWgrad,
};
use crate::ops::conv::ConvShape;

/// Workspace (fp32 elements) of [`LinearBackwardWeight`] on a GPU with `num_sms` SMs.
pub fn linear_workspace(n: usize, in_f: usize, out_f: usize, num_sms: u32) -> usize {
    wgrad_workspace_elems(&ConvShape::fc(n, in_f, out_f), num_sms)
}

/// y = x W^T + b; x [n][in], W [out][in] fp16 (fp32 masters at O0), b fp32.
#[derive(Clone, Copy, Debug)]
pub struct LinearForward {
    pub n: usize,
    pub in_f: usize,
    pub out_f: usize,
    pub x: DevPtr,
    pub w: DevPtr,
    pub b: DevPtr,
    pub y: DevPtr,
    pub imp: Option<ConvImpl>,
}

impl Launch for LinearForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let gemm = ConvFprop {
            s: ConvShape::fc(self.n, self.in_f, self.out_f),
            x: self.x,
            w: self.w,
            out: ConvOut::dense(self.y, self.out_f),
            imp: self.imp,
        };
        gemm.launch(dev)?;
        let (y, b) = (self.y, self.b);
        let (ni, oi) = (self.n as i32, self.out_f as i32);
        let name = dev.amp_kernel(["bias_add_o0", "bias_add", "bias_add"]);
        let cfg = dev.grid_1d((self.n * self.out_f) as u64)?;
        cuda_launch!(dev, name, cfg, y, b, ni, oi)
    }
}

/// dx (+)= dy W.
#[derive(Clone, Copy, Debug)]
pub struct LinearBackwardData {
    pub n: usize,
    pub in_f: usize,
    pub out_f: usize,
    pub dy: DevPtr,
    pub w: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
    pub imp: Option<ConvImpl>,
}

impl Launch for LinearBackwardData {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let gemm = ConvDgrad {
            s: ConvShape::fc(self.n, self.in_f, self.out_f),
            dy: self.dy,
            w: self.w,
            out: ConvOut {
                accumulate: self.accumulate,
                ..ConvOut::dense(self.dx, self.in_f)
            },
            imp: self.imp,
        };
        gemm.launch(dev)
    }
}

/// dW = dy^T x and db = sum_rows dy, into the fp32 gradient buffer (overwritten).
#[derive(Clone, Copy, Debug)]
pub struct LinearBackwardWeight {
    pub n: usize,
    pub in_f: usize,
    pub out_f: usize,
    pub x: DevPtr,
    pub dy: DevPtr,
    pub dw: DevPtr,
    pub db: DevPtr,
    pub ws: DevPtr,
    pub ws_elems: usize,
    pub imp: Option<ConvImpl>,
}

impl Launch for LinearBackwardWeight {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let gemm = ConvWgrad {
            s: ConvShape::fc(self.n, self.in_f, self.out_f),
            x: self.x,
            x_padded: None,
            dy: self.dy,
            dw: self.dw,
            accumulate: false,
            ws: self.ws,
            ws_elems: self.ws_elems,
            imp: self.imp,
        };
        gemm.launch(dev)?;
        let (dy, db) = (self.dy, self.db);
        let (ni, oi, acc) = (self.n as i32, self.out_f as i32, 0i32);
        let name = dev.amp_kernel(["bias_grad_o0", "bias_grad", "bias_grad"]);
        cuda_launch!(
            dev,
            name,
            dev.grid_channels(self.out_f),
            dy,
            ni,
            oi,
            db,
            acc
        )
    }
}
