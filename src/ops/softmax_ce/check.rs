//! Self-test case of the fused softmax cross-entropy, with f32 and i32 labels, against this
//! folder's CPU reference.

use anyhow::Result;

use super::cuda::{Labels, ScaleArg, SoftmaxCe};
use crate::gpu::check::SelfTest;
use crate::gpu::Launch;

impl SelfTest<'_> {
    /// Mean loss and the logits' gradient at loss scale 1024.
    pub fn softmax_ce(&mut self, n: usize, k: usize, smoothing: f32) -> Result<()> {
        let grad_scale = 1024.0;
        let logits = self.random(n * k, 4.0);
        let labels: Vec<f32> = (0..n).map(|i| ((i * 7919) % k) as f32).collect();
        let labels_i: Vec<i32> = labels.iter().map(|&v| v as i32).collect();
        let (lb, lf, li) = (self.act(&logits)?, self.buf(&labels)?, self.buf(&labels_i)?);
        let want_loss = [super::forward(&logits, &labels, n, k, smoothing)];
        let mut want_dz = vec![0.0; n * k];
        super::backward(&logits, &labels, n, k, smoothing, grad_scale, &mut want_dz);
        let label = format!("n{n} k{k} eps{smoothing}");
        for (name, labels) in [
            ("softmax_ce_f32", Labels::F32(lf.ptr)),
            ("softmax_ce_i32", Labels::I32(li.ptr)),
        ] {
            let (rows, loss, dz) = (
                self.poisoned_f32(n)?,
                self.poisoned_f32(1)?,
                self.poisoned_act(n * k)?,
            );
            let counter = self.zeros::<u32>(1)?;
            let call = SoftmaxCe {
                n,
                k,
                smoothing,
                grad_scale: ScaleArg::Value(grad_scale),
                logits: lb.ptr(),
                labels,
                row_loss: rows.ptr,
                loss: loss.ptr,
                counter: counter.ptr,
                dlogits: dz.ptr(),
            };
            call.launch(self.dev)?;
            let (got_loss, got_dz) = (self.read_f32(&loss)?, self.read(&dz)?);
            let (tol, tol_r) = (self.tol(), self.tol_reduction());
            let kernel = self.at_level(&format!("{name}(loss)"));
            self.record(&kernel, &label, "cpu", &got_loss, Some(&want_loss), tol_r);
            let kernel = self.at_level(&format!("{name}(grad)"));
            self.record(&kernel, &label, "cpu", &got_dz, Some(&want_dz), tol);
        }
        Ok(())
    }
}
