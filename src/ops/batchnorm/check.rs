//! Self-test case of the batchnorm launchers: inference forward, training forward (output, batch
//! statistics, running statistics) and backward, with and without the fused ReLU, against the
//! CPU reference in this folder, on both paths (baseline and vectorised), dense or as a concat
//! slice with the input gradient accumulated, and the vectorised path's fallbacks (a misaligned
//! tensor, channels not a multiple of 8) with the launches each call queues.

use anyhow::Result;
use half::f16;

use super::cuda::{bn_workspace, BnArgs, BnBackward, BnForwardInfer, BnForwardTrain};
use super::BnParams;
use crate::gpu::check::{AnyBuf, SelfTest};
use crate::gpu::device::launches_queued;
use crate::gpu::{DevPtr, Launch};

/// One BN problem on the host: activations [m][c] and the layer's parameters and statistics.
struct Case {
    m: usize,
    c: usize,
    eps: f32,
    momentum: f32,
    relu: bool,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

impl Case {
    fn params(&self) -> BnParams<'_> {
        BnParams {
            gamma: &self.gamma,
            beta: &self.beta,
            eps: self.eps,
        }
    }

    fn relu(&self, y: &mut [f32]) {
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }

    fn infer(&self) -> Vec<f32> {
        let mut y = vec![0.0; self.m * self.c];
        let (rm, rv) = (&self.running_mean, &self.running_var);
        super::forward_infer(&self.x, &self.params(), self.c, rm, rv, &mut y);
        self.relu(&mut y);
        y
    }

    /// (y, mean, inv_std, running_mean, running_var) of the training forward.
    fn train(&self) -> [Vec<f32>; 5] {
        let c = self.c;
        let (mut y, mut mean, mut inv_std) = (vec![0.0; self.m * c], vec![0.0; c], vec![0.0; c]);
        let (mut rm, mut rv) = (self.running_mean.clone(), self.running_var.clone());
        let p = self.params();
        let stats = (&mut mean, &mut inv_std, &mut rm, &mut rv);
        super::forward_train(
            &self.x,
            &p,
            self.momentum,
            c,
            &mut y,
            stats.0,
            stats.1,
            stats.2,
            stats.3,
        );
        self.relu(&mut y);
        [y, mean, inv_std, rm, rv]
    }

    /// (dx, dgamma, dbeta); `y` is the forward output the fused ReLU backward masks with.
    fn backward(&self, y: &[f32], dy: &[f32], mean: &[f32], inv_std: &[f32]) -> [Vec<f32>; 3] {
        let c = self.c;
        let dy_eff: Vec<f32> = match self.relu {
            true => dy
                .iter()
                .zip(y)
                .map(|(&g, &o)| if o > 0.0 { g } else { 0.0 })
                .collect(),
            false => dy.to_vec(),
        };
        let (mut dx, mut dg, mut db) = (vec![0.0; self.m * c], vec![0.0; c], vec![0.0; c]);
        super::backward(
            &self.x,
            &dy_eff,
            &self.gamma,
            mean,
            inv_std,
            c,
            &mut dx,
            &mut dg,
            &mut db,
            false,
        );
        [dx, dg, db]
    }
}

impl SelfTest<'_> {
    fn bn_case(&mut self, m: usize, c: usize, relu: bool) -> Case {
        // Shifted, then rounded again: the reference must see exactly the fp16 values the device
        // does (with a single row, BN's output is pure cancellation and any difference shows).
        let x = self
            .random(m * c, 2.0)
            .iter()
            .map(|v| f16::from_f32(v + 0.5).to_f32())
            .collect();
        Case {
            m,
            c,
            eps: 1e-3,
            momentum: 0.1,
            relu,
            x,
            gamma: self.random(c, 1.0),
            beta: self.random(c, 0.5),
            running_mean: self.random(c, 0.1),
            running_var: self.random(c, 0.5).iter().map(|v| v + 1.0).collect(),
        }
    }

    /// Training forward and backward of one BN shape, with or without the fused ReLU, on the
    /// baseline kernels and then the vectorised ones.
    pub fn batchnorm(&mut self, m: usize, c: usize, relu: bool) -> Result<()> {
        for vec in [false, true] {
            let layout = BnLayout {
                vec,
                ..BnLayout::DENSE
            };
            self.batchnorm_case(m, c, relu, layout)?;
        }
        Ok(())
    }

    /// The layouts beyond the dense one, at one shape (c a multiple of 8), with the fused ReLU:
    /// output and output gradient as a concat slice with dx accumulated (both paths), and the
    /// vectorised path's fallbacks: x misaligned, and c + 4 channels.
    pub fn batchnorm_layouts(&mut self, m: usize, c: usize) -> Result<()> {
        for vec in [false, true] {
            let slice = BnLayout {
                vec,
                slice: true,
                ..BnLayout::DENSE
            };
            self.batchnorm_case(m, c, true, slice)?;
        }
        let vec = BnLayout {
            vec: true,
            ..BnLayout::DENSE
        };
        let misaligned = BnLayout {
            misalign: true,
            ..vec
        };
        self.batchnorm_case(m, c, true, misaligned)?;
        self.batchnorm_case(m, c + 4, true, vec)
    }

    /// x on the device, one element past a 16-byte boundary with `misalign`; returns the buffer
    /// and x's address.
    fn bn_input(&mut self, x: &[f32], misalign: bool) -> Result<(AnyBuf, DevPtr)> {
        let pad = misalign as usize;
        let host: Vec<f32> = std::iter::repeat_n(0.0, pad)
            .chain(x.iter().copied())
            .collect();
        let b = self.act(&host)?;
        let elem = if self.dev.amp == crate::precision::Amp::O0 {
            4
        } else {
            2
        };
        let ptr = b.ptr() + (pad * elem) as u64;
        Ok((b, ptr))
    }

    /// Runs `call`, checking the launches it queues against `want` and its own count.
    fn bn_launches(
        &mut self,
        label: &str,
        want: usize,
        count: usize,
        call: &dyn Launch,
    ) -> Result<()> {
        let before = launches_queued();
        call.launch(self.dev)?;
        let queued = (launches_queued() - before) as f32;
        let name = self.at_level("bn launches");
        let (got, want) = ([queued, count as f32], [want as f32; 2]);
        self.record(&name, label, "expected", &got, Some(&want), 0.0);
        Ok(())
    }

    /// One BN layer in one layout: inference, training forward and backward against the CPU.
    fn batchnorm_case(&mut self, m: usize, c: usize, relu: bool, l: BnLayout) -> Result<()> {
        let case = self.bn_case(m, c, relu);
        let (ldy, yoff) = if l.slice { (c + 16, 8) } else { (c, 0) };
        let at = Slice { m, c, ldy, yoff };
        let (_xb, x) = self.bn_input(&case.x, l.misalign)?;
        let (gb, bb) = (self.bn_param(&case.gamma)?, self.bn_param(&case.beta)?);
        // Running statistics are fp32 at every level.
        let (rmb, rvb) = (self.buf(&case.running_mean)?, self.buf(&case.running_var)?);
        let (mean, inv_std, y) = (
            self.poisoned_bn_stat(c)?,
            self.poisoned_bn_stat(c)?,
            self.poisoned_act(m * ldy)?,
        );
        let ws = self.poisoned_f32(bn_workspace(m, c))?;
        let counter = self.zeros::<u32>(1)?;
        let a = BnArgs {
            m,
            c,
            eps: case.eps,
            momentum: case.momentum,
            relu,
            gamma: gb.ptr(),
            beta: bb.ptr(),
            save_mean: mean.ptr(),
            save_inv_std: inv_std.ptr(),
            running_mean: rmb.ptr,
            running_var: rvb.ptr,
            ldy,
            yoff,
            vec: l.vec,
            counter: counter.ptr,
        };
        let fwd = BnForwardTrain {
            a,
            x,
            y: y.ptr(),
            ws: ws.ptr,
        };
        let vec = fwd.uses_vec();
        let label = l.label(m, c, relu, ldy, yoff);
        // The vectorised path runs exactly where asked for and able: whole 8-channel vectors of
        // an aligned x.
        let fits = l.vec && c.is_multiple_of(8) && !l.misalign;
        let name = self.at_level("bn path (vectorised?)");
        self.record(
            &name,
            &label,
            "expected",
            &[vec as u8 as f32],
            Some(&[fits as u8 as f32]),
            0.0,
        );
        let (k, tol, tol_r) = (BnKernels::of(vec), self.tol(), self.tol_reduction());
        // Inference first, while the running statistics still hold the case's values.
        let yi = self.poisoned_act(m * ldy)?;
        BnForwardInfer { a, x, y: yi.ptr() }.launch(self.dev)?;
        let got_yi = self.bn_slice(&yi, at, k.infer, &label)?;
        let name = self.at_level(k.infer);
        self.record(&name, &label, "cpu", &got_yi, Some(&case.infer()), tol);

        self.bn_launches(&label, 2 + !vec as usize, fwd.launches(), &fwd)?;
        let fwd_out = [
            self.bn_slice(&y, at, k.apply, &label)?,
            self.read(&mean)?,
            self.read(&inv_std)?,
            self.read_f32(&rmb)?,
            self.read_f32(&rvb)?,
        ];
        let want = case.train();
        for (i, (g, w)) in fwd_out.iter().zip(&want).enumerate() {
            let t = if i == 0 { tol } else { tol_r };
            let name = self.at_level(k.forward[i]);
            self.record(&name, &label, "cpu", g, Some(w), t);
        }

        let dy = self.random(m * c, 1.0);
        let dyb = self.act(&at.place(&dy))?;
        let dx0 = if l.slice {
            self.random(m * c, 1.0)
        } else {
            vec![f32::NAN; m * c]
        };
        let (dg, db, dx) = (
            self.poisoned_f32(c)?,
            self.poisoned_f32(c)?,
            self.act(&dx0)?,
        );
        let bwd = BnBackward {
            a,
            x,
            y: y.ptr(),
            dy: dyb.ptr(),
            dgamma: dg.ptr,
            dbeta: db.ptr,
            dx: dx.ptr(),
            accumulate: l.slice,
            ws: ws.ptr,
        };
        self.bn_launches(&label, 2 + !bwd.uses_vec() as usize, bwd.launches(), &bwd)?;
        let got = [self.read(&dx)?, self.read_f32(&dg)?, self.read_f32(&db)?];
        let mut want = case.backward(&fwd_out[0], &dy, &fwd_out[1], &fwd_out[2]);
        if l.slice {
            want[0].iter_mut().zip(&dx0).for_each(|(w, d)| *w += d);
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let t = if i == 0 { tol } else { tol_r };
            let name = self.at_level(k.backward[i]);
            self.record(&name, &label, "cpu", g, Some(w), t);
        }
        Ok(())
    }

    /// The [m][c] values of an output written as `at`; records that every element outside them
    /// is still the poison (no write strayed).
    fn bn_slice(&mut self, y: &AnyBuf, at: Slice, kernel: &str, label: &str) -> Result<Vec<f32>> {
        let all = self.read(y)?;
        let Slice { m, c, ldy, yoff } = at;
        if ldy != c {
            let outside = (0..m * ldy)
                .filter(|&i| !(yoff..yoff + c).contains(&(i % ldy)) && !all[i].is_nan())
                .count();
            let name = self.at_level(&format!("{kernel} (outside the slice)"));
            self.record(&name, label, "poison", &[outside as f32], Some(&[0.0]), 0.0);
        }
        Ok((0..m * c).map(|i| all[at.index(i)]).collect())
    }
}

/// [m][c] values stored with row stride `ldy` from channel `yoff` (a concat slice when ldy > c).
#[derive(Clone, Copy, Debug)]
struct Slice {
    m: usize,
    c: usize,
    ldy: usize,
    yoff: usize,
}

impl Slice {
    /// Where element i of the dense [m][c] lives.
    fn index(&self, i: usize) -> usize {
        i / self.c * self.ldy + self.yoff + i % self.c
    }

    /// Dense values laid out this way, NaN elsewhere (read by no kernel).
    fn place(&self, v: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.m * self.ldy];
        for (i, &x) in v.iter().enumerate() {
            out[self.index(i)] = x;
        }
        out
    }
}

/// The report names of one path's kernels.
struct BnKernels {
    infer: &'static str,
    apply: &'static str,
    forward: [&'static str; 5],
    backward: [&'static str; 3],
}

impl BnKernels {
    fn of(vec: bool) -> Self {
        match vec {
            false => BnKernels {
                infer: "bn_infer",
                apply: "bn_apply",
                forward: [
                    "bn_apply",
                    "bn_stats(mean)",
                    "bn_stats(inv_std)",
                    "bn_stats(running_mean)",
                    "bn_stats(running_var)",
                ],
                backward: ["bn_bwd_dx", "bn_bwd(dgamma)", "bn_bwd(dbeta)"],
            },
            true => BnKernels {
                infer: "bn_vec_infer",
                apply: "bn_vec_apply",
                forward: [
                    "bn_vec_apply",
                    "bn_vec_stats(mean)",
                    "bn_vec_stats(inv_std)",
                    "bn_vec_stats(running_mean)",
                    "bn_vec_stats(running_var)",
                ],
                backward: ["bn_vec_bwd_dx", "bn_vec_bwd(dgamma)", "bn_vec_bwd(dbeta)"],
            },
        }
    }
}

/// How a check lays its layer out and which path it asks for.
#[derive(Clone, Copy, Debug)]
pub struct BnLayout {
    /// Ask for the vectorised kernels (they run where `BnArgs::vec_fits`).
    pub vec: bool,
    /// Output and output gradient as a concat slice (row stride c + 16, channel offset 8), and
    /// dx accumulated onto random values.
    pub slice: bool,
    /// x one element past a 16-byte boundary.
    pub misalign: bool,
}

impl BnLayout {
    pub const DENSE: BnLayout = BnLayout {
        vec: false,
        slice: false,
        misalign: false,
    };

    fn label(&self, m: usize, c: usize, relu: bool, ldy: usize, yoff: usize) -> String {
        let mut s = format!("m{m} c{c} relu{}", relu as u8);
        if self.slice {
            s += &format!(" ldy{ldy} yoff{yoff} acc");
        }
        if self.misalign {
            s += " misaligned";
        }
        if self.vec && (self.misalign || !c.is_multiple_of(8)) {
            s += " (fallback)";
        }
        s
    }
}
