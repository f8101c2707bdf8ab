//! Self-test case of the u8 batch normalisation: random bytes at the input's real shape against
//! the CPU reference, compared bit for bit (both sides round the same multiply and add).

use anyhow::Result;
use rand::Rng;

use super::cuda::NormalizeU8;
use super::{normalize_u8, Factors};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

/// ImageNet's statistics: the factors every training run uses by default.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

impl SelfTest<'_> {
    /// A batch of `n` RGB `size` x `size` images of random bytes.
    pub fn normalize_u8(&mut self, n: usize, size: usize) -> Result<()> {
        let count = n * size * size * 3;
        let src: Vec<u8> = (0..count).map(|_| self.rng.random()).collect();
        let factors = Factors::new(MEAN, STD);
        let mut want = vec![0.0f32; count];
        normalize_u8(&src, &mut want, &factors);
        let (sb, out) = (self.buf(&src)?, self.poisoned_f32(count)?);
        NormalizeU8 {
            src: sb.ptr,
            count,
            factors,
            dst: out.ptr,
        }
        .launch(self.dev)?;
        let got = self.read_f32(&out)?;
        let same = got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        self.record(
            "normalize_u8_f32",
            &format!("{n}x{size}x{size}x3"),
            "cpu bits",
            &[same as u8 as f32],
            Some(&[1.0]),
            0.0,
        );
        Ok(())
    }
}
