//! Self-test case of the channel copies, against the host: a concat slice accumulated onto
//! existing values, and the stem's zero padding of 3 channels to 8.

use anyhow::Result;

use super::cuda::CopyChannels;
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Both copies over `rows` rows, at the device's activation type.
    pub fn copy_channels(&mut self, rows: usize) -> Result<()> {
        let (c, ld, off) = (96, 384, 96);
        let src = self.random(rows * c, 1.0);
        let prefill = self.random(rows * ld, 1.0);
        let (sb, db) = (self.act(&src)?, self.act(&prefill)?);
        let copy = CopyChannels {
            dst_ld: ld,
            dst_off: off,
            accumulate: true,
            ..CopyChannels::dense(rows, c, sb.ptr(), db.ptr())
        };
        copy.launch(self.dev)?;
        let mut want = prefill.clone();
        for r in 0..rows {
            for j in 0..c {
                want[r * ld + off + j] += src[r * c + j];
            }
        }
        let got = self.read(&db)?;
        let (name, tol) = (self.at_level("copy_channels"), self.tol());
        let label = format!("{rows} rows {c}ch -> ld {ld} offset {off} +=");
        self.record(&name, &label, "host", &got, Some(&want), tol);

        let stem = self.random(rows * 3, 1.0);
        let (sb, pb) = (self.act(&stem)?, self.poisoned_act(rows * 8)?);
        CopyChannels::pad(rows, 3, 8, sb.ptr(), pb.ptr()).launch(self.dev)?;
        let want: Vec<f32> = stem
            .chunks(3)
            .flat_map(|px| px.iter().copied().chain([0.0; 5]))
            .collect();
        let got = self.read(&pb)?;
        let name = self.at_level("copy_channels(pad 3->8)");
        self.record(
            &name,
            &format!("{rows} rows"),
            "host",
            &got,
            Some(&want),
            tol,
        );
        Ok(())
    }
}
