//! Self-test case of the casts: an fp32 -> fp16 -> fp32 round trip against `half` on the host.

use anyhow::Result;
use half::f16;
use rand::Rng;

use super::cuda::{CastF16ToF32, CastF32ToF16};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// `count` values spanning beyond the fp16 range (they must become inf on both sides).
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
        CastF32ToF16 {
            src: sb.ptr,
            count,
            dst: mid.ptr,
        }
        .launch(self.dev)?;
        CastF16ToF32 {
            src: mid.ptr,
            count,
            dst: back.ptr,
        }
        .launch(self.dev)?;
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
