//! Channel-copy launchers (kernels/concat.cu): the copies of a concat whose inputs are not
//! already slices of its output, their backward, and the stem's zero padding to 8 channels.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// Copies `c` channels of `rows` rows between row-strided activation tensors (fp16, fp32 at
/// O0); destination channels [c, zero_to) are zeroed, `accumulate` adds instead of storing.
#[derive(Clone, Copy, Debug)]
pub struct CopyChannels {
    pub rows: usize,
    pub c: usize,
    pub src: DevPtr,
    pub src_ld: usize,
    pub src_off: usize,
    pub dst: DevPtr,
    pub dst_ld: usize,
    pub dst_off: usize,
    pub zero_to: usize,
    pub accumulate: bool,
}

impl CopyChannels {
    /// Pads NHWC rows of `c` channels to `c_pad` (zeros): the 3-channel stem input and its
    /// weights ([cout][kh][kw][3] rows) become 8-channel tensors the tensor-core path accepts.
    pub fn pad(rows: usize, c: usize, c_pad: usize, src: DevPtr, dst: DevPtr) -> Self {
        CopyChannels {
            rows,
            c,
            src,
            src_ld: c,
            src_off: 0,
            dst,
            dst_ld: c_pad,
            dst_off: 0,
            zero_to: c_pad,
            accumulate: false,
        }
    }

    /// A dense copy of `rows` rows of `c` channels.
    pub fn dense(rows: usize, c: usize, src: DevPtr, dst: DevPtr) -> Self {
        CopyChannels {
            zero_to: 0,
            ..Self::pad(rows, c, c, src, dst)
        }
    }
}

impl Launch for CopyChannels {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (src, dst) = (self.src, self.dst);
        let (r, ci, sl, so, dl, d_o, z, acc) = (
            self.rows as u64,
            self.c as i32,
            self.src_ld as i32,
            self.src_off as i32,
            self.dst_ld as i32,
            self.dst_off as i32,
            self.zero_to as i32,
            self.accumulate as i32,
        );
        let name = dev.amp_kernel(["copy_channels_o0", "copy_channels", "copy_channels"]);
        let cfg = dev.grid_1d(r * self.c.max(self.zero_to) as u64)?;
        cuda_launch!(dev, name, cfg, src, sl, so, dst, dl, d_o, r, ci, z, acc)
    }
}
