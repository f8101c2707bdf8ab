//! Every launch of every CUDA step program, run without a GPU: [`StepLayout::launch`] drives a
//! checker that implements [`StepKernels`] and checks each operand the executor would hand a
//! kernel. Every pointer must be non-null, and the whole extent the kernel touches (from the shape
//! and stride arguments) must lie inside one buffer: the arena, the parameter buffers, the
//! staging buffers. Weights must come from the copy the precision level reads (fp32 masters at
//! O0, the fp16 working copy otherwise; BN parameters fp16 only at O3). An address the executor
//! computes wrongly, or a tensor it addresses that the arena does not store, fails here instead
//! of on a GPU.

use std::cell::RefCell;

use anyhow::Result;
use inception_engine::backend::cuda::arena::{stem_padded_elems, ParamSlots};
use inception_engine::backend::cuda::ops::{BnArgs, Labels, PoolShape, RmspropParams, ScaleArg};
use inception_engine::backend::cuda::step_launch::{Ptrs, StepArgs, StepKernels, StepLayout};
use inception_engine::backend::cuda::{bn_workspace, ConvOut, ConvShape, DevPtr};
use inception_engine::backend::Amp;
use inception_engine::plan::memory::MemoryPlan;
use inception_engine::plan::{self, PlanConfig};
use inception_engine::optim::RmsPropConfig;

/// Named buffers at fake, widely spaced base addresses.
struct Buffers(Vec<(&'static str, DevPtr, usize)>);

impl Buffers {
    /// Gives every buffer the executor allocates a base and a length; inference-only layouts get
    /// one-element gradient and optimizer buffers, as the executor allocates them.
    fn place(step: &mut StepLayout, mem: &MemoryPlan, train: bool) -> Self {
        let plan = &step.plan;
        let (p, s): (&ParamSlots, &ParamSlots) = (&step.params, &step.states);
        let opt = if train { p.len } else { 1 };
        let images = plan.tensor(plan.input).numel();
        let stem = stem_padded_elems(plan).unwrap_or((0, 0));
        let list = vec![
            ("arena", mem.peak_bytes),
            ("master", p.len * 4),
            ("w16", p.len * 2),
            ("grads", opt * 4),
            ("ms", opt * 4),
            ("mom", opt * 4),
            ("decay", opt),
            ("states", s.len * 4),
            ("ws", step.ws_elems * 4),
            ("images", images * 4),
            ("labels", plan.batch() * 4),
            ("row_loss", plan.batch() * 4),
            ("report", 32),
            ("stem_x", stem.0 * 2),
            ("stem_w", stem.1 * 2),
        ];
        let placed: Vec<_> = list
            .into_iter()
            .enumerate()
            .map(|(i, (name, len))| (name, ((i + 1) as u64) << 40, len))
            .collect();
        let base = |name: &str| placed.iter().find(|b| b.0 == name).unwrap().1;
        step.ptr = Ptrs {
            arena: base("arena"),
            master: base("master"),
            w16: base("w16"),
            grads: base("grads"),
            ms: base("ms"),
            mom: base("mom"),
            decay: base("decay"),
            states: base("states"),
            ws: base("ws"),
            images: base("images"),
            labels: base("labels"),
            row_loss: base("row_loss"),
            report: base("report"),
            stem: step.stem.map(|_| (base("stem_x"), base("stem_w"))),
        };
        Buffers(placed)
    }
}

/// Checks every operand of every call; problems are collected, not panicked on.
struct Checker {
    buffers: Buffers,
    amp: Amp,
    calls: RefCell<usize>,
    errors: RefCell<Vec<String>>,
}

impl Checker {
    /// Bytes per activation element at this level.
    fn act(&self) -> usize {
        if self.amp == Amp::O0 {
            4
        } else {
            2
        }
    }

    /// Bytes per BN parameter or saved statistic.
    fn bn(&self) -> usize {
        if self.amp == Amp::O3 {
            2
        } else {
            4
        }
    }

    /// The buffer `ptr` points into, if any (no check recorded).
    fn buffer_of(&self, ptr: DevPtr) -> Option<&'static str> {
        let inside =
            |(_, base, len): &&(&str, DevPtr, usize)| ptr >= *base && ptr < base + *len as u64;
        self.buffers.0.iter().find(inside).map(|b| b.0)
    }

    /// `bytes` from `ptr` must lie inside one buffer; returns its name.
    fn span(&self, what: &str, ptr: DevPtr, bytes: usize) -> &'static str {
        let found = self
            .buffers
            .0
            .iter()
            .find(|(_, base, len)| ptr >= *base && ptr + bytes as u64 <= base + *len as u64);
        match found {
            Some((name, _, _)) if ptr != 0 => name,
            _ => {
                let msg = format!(
                    "call {}: {what} at {ptr:#x} ({bytes} bytes) is outside every buffer",
                    self.calls.borrow()
                );
                self.errors.borrow_mut().push(msg);
                "none"
            }
        }
    }

    /// A weight or BN parameter must come from `buffer`.
    fn from(&self, what: &str, ptr: DevPtr, bytes: usize, buffer: &str) {
        let got = self.span(what, ptr, bytes);
        if got != buffer && got != "none" {
            let msg = format!("{what} is read from {got}, expected {buffer}");
            self.errors.borrow_mut().push(msg);
        }
    }

    fn weights(&self) -> &'static str {
        if self.amp == Amp::O0 {
            "master"
        } else {
            "w16"
        }
    }

    /// A row-strided tensor: `rows` rows of `c` elements, `ld` apart.
    fn strided(&self, what: &str, ptr: DevPtr, rows: usize, ld: usize, c: usize, elem: usize) {
        if ld < c {
            self.errors
                .borrow_mut()
                .push(format!("{what}: stride {ld} < {c} channels"));
        }
        self.span(what, ptr, ((rows - 1) * ld + c) * elem);
    }

    fn call(&self) {
        *self.calls.borrow_mut() += 1;
    }

    /// A convolution's dense input and row-strided output: x and y in fprop, dy and dx in dgrad.
    fn conv_in_out(&self, s: &ConvShape, input: DevPtr, out: &ConvOut, fprop: bool) {
        let act = self.act();
        let (pixels, out_pixels) = (s.n * s.h * s.w, s.n * s.oh() * s.ow());
        let (c, oc) = (s.conv.cin, s.conv.cout);
        let (in_len, rows, width) = match fprop {
            true => (pixels * c, out_pixels, oc),
            false => (out_pixels * oc, pixels, c),
        };
        self.span("conv input", input, in_len * act);
        self.strided(
            "conv output",
            out.ptr,
            rows,
            out.ldc,
            out.c_offset + width,
            act,
        );
    }

    fn bn_common(&self, a: &BnArgs, x: DevPtr) {
        let bn = self.bn();
        self.span("bn x", x, a.m * a.c * self.act());
        let params = if self.amp == Amp::O3 { "w16" } else { "master" };
        self.from("bn gamma", a.gamma, a.c * bn, params);
        self.from("bn beta", a.beta, a.c * bn, params);
        self.span("bn running mean", a.running_mean, a.c * 4);
        self.span("bn running var", a.running_var, a.c * 4);
    }
}

#[allow(clippy::too_many_arguments)]
impl StepKernels for Checker {
    fn conv_fprop(&self, s: &ConvShape, x: DevPtr, w: DevPtr, out: ConvOut) -> Result<()> {
        self.call();
        let c = s.conv;
        self.conv_in_out(s, x, &out, true);
        // The padded stem reads its own padded copy of the weights.
        let wbuf = if c.cin == 8 && self.amp != Amp::O0 && self.buffer_of(w) == Some("stem_w") {
            "stem_w"
        } else {
            self.weights()
        };
        self.from(
            "conv weight",
            w,
            c.cout * c.kh * c.kw * c.cin * self.act(),
            wbuf,
        );
        Ok(())
    }
    fn conv_dgrad(&self, s: &ConvShape, dy: DevPtr, w: DevPtr, out: ConvOut) -> Result<()> {
        self.call();
        let c = s.conv;
        self.conv_in_out(s, dy, &out, false);
        self.from(
            "conv weight",
            w,
            c.cout * c.kh * c.kw * c.cin * self.act(),
            self.weights(),
        );
        Ok(())
    }
    fn conv_wgrad(
        &self,
        s: &ConvShape,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        _accumulate: bool,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()> {
        self.call();
        let (c, act) = (s.conv, self.act());
        self.span("wgrad x", x, s.n * s.h * s.w * c.cin * act);
        self.span("wgrad dy", dy, s.n * s.oh() * s.ow() * c.cout * act);
        self.from("wgrad dw", dw, c.cout * c.kh * c.kw * c.cin * 4, "grads");
        self.from("wgrad workspace", ws, ws_elems * 4, "ws");
        Ok(())
    }
    fn bn_forward_train(&self, a: &BnArgs, x: DevPtr, y: DevPtr, ws: DevPtr) -> Result<()> {
        self.call();
        self.bn_common(a, x);
        self.strided("bn y", y, a.m, a.ldy, a.yoff + a.c, self.act());
        self.span("bn saved mean", a.save_mean, a.c * self.bn());
        self.span("bn saved inv std", a.save_inv_std, a.c * self.bn());
        self.from("bn workspace", ws, bn_workspace(a.m, a.c) * 4, "ws");
        Ok(())
    }
    fn bn_forward_infer(&self, a: &BnArgs, x: DevPtr, y: DevPtr) -> Result<()> {
        self.call();
        self.bn_common(a, x);
        self.strided("bn y", y, a.m, a.ldy, a.yoff + a.c, self.act());
        Ok(())
    }
    fn bn_backward(
        &self,
        a: &BnArgs,
        x: DevPtr,
        y: DevPtr,
        dy: DevPtr,
        dgamma: DevPtr,
        dbeta: DevPtr,
        dx: DevPtr,
        _accumulate: bool,
        ws: DevPtr,
    ) -> Result<()> {
        self.call();
        self.bn_common(a, x);
        let act = self.act();
        if a.relu {
            self.strided("bn y", y, a.m, a.ldy, a.yoff + a.c, act);
        }
        self.strided("bn dy", dy, a.m, a.ldy, a.yoff + a.c, act);
        self.span("bn saved mean", a.save_mean, a.c * self.bn());
        self.span("bn saved inv std", a.save_inv_std, a.c * self.bn());
        self.from("bn dgamma", dgamma, a.c * 4, "grads");
        self.from("bn dbeta", dbeta, a.c * 4, "grads");
        self.span("bn dx", dx, a.m * a.c * act);
        self.from("bn workspace", ws, bn_workspace(a.m, a.c) * 4, "ws");
        Ok(())
    }
    fn relu_forward(&self, count: usize, x: DevPtr, y: DevPtr) -> Result<()> {
        self.call();
        self.span("relu x", x, count * self.act());
        self.span("relu y", y, count * self.act());
        Ok(())
    }
    fn relu_backward(
        &self,
        count: usize,
        y: DevPtr,
        dy: DevPtr,
        dx: DevPtr,
        _: bool,
    ) -> Result<()> {
        self.call();
        for (what, p) in [("relu y", y), ("relu dy", dy), ("relu dx", dx)] {
            self.span(what, p, count * self.act());
        }
        Ok(())
    }
    fn pool_forward(
        &self,
        s: &PoolShape,
        _max: bool,
        x: DevPtr,
        y: DevPtr,
        ldy: usize,
        yoff: usize,
    ) -> Result<()> {
        self.call();
        self.span("pool x", x, s.n * s.h * s.w * s.c * self.act());
        self.strided(
            "pool y",
            y,
            s.n * s.oh() * s.ow(),
            ldy,
            yoff + s.c,
            self.act(),
        );
        Ok(())
    }
    fn pool_backward(
        &self,
        s: &PoolShape,
        _max: bool,
        x: DevPtr,
        dy: DevPtr,
        ldy: usize,
        yoff: usize,
        dx: DevPtr,
        _accumulate: bool,
    ) -> Result<()> {
        self.call();
        let act = self.act();
        self.span("pool x", x, s.n * s.h * s.w * s.c * act);
        self.strided("pool dy", dy, s.n * s.oh() * s.ow(), ldy, yoff + s.c, act);
        self.span("pool dx", dx, s.n * s.h * s.w * s.c * act);
        Ok(())
    }
    fn global_avgpool_forward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        self.call();
        self.span("gap x", x, n * hw * c * self.act());
        self.span("gap y", y, n * c * self.act());
        Ok(())
    }
    fn global_avgpool_backward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        dy: DevPtr,
        dx: DevPtr,
        _accumulate: bool,
    ) -> Result<()> {
        self.call();
        self.span("gap dy", dy, n * c * self.act());
        self.span("gap dx", dx, n * hw * c * self.act());
        Ok(())
    }
    fn dropout_forward(
        &self,
        count: usize,
        _p: f32,
        _seed: u64,
        _step: u64,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        self.call();
        self.span("dropout x", x, count * self.act());
        self.span("dropout y", y, count * self.act());
        Ok(())
    }
    fn dropout_backward(
        &self,
        count: usize,
        _p: f32,
        _seed: u64,
        _step: u64,
        dy: DevPtr,
        dx: DevPtr,
        _accumulate: bool,
    ) -> Result<()> {
        self.call();
        self.span("dropout dy", dy, count * self.act());
        self.span("dropout dx", dx, count * self.act());
        Ok(())
    }
    fn linear_forward(
        &self,
        n: usize,
        fi: usize,
        fo: usize,
        x: DevPtr,
        w: DevPtr,
        b: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        self.call();
        let act = self.act();
        self.span("fc x", x, n * fi * act);
        self.from("fc weight", w, fo * fi * act, self.weights());
        self.from("fc bias", b, fo * 4, "master");
        self.span("fc y", y, n * fo * act);
        Ok(())
    }
    fn linear_backward_data(
        &self,
        n: usize,
        fi: usize,
        fo: usize,
        dy: DevPtr,
        w: DevPtr,
        dx: DevPtr,
        _accumulate: bool,
    ) -> Result<()> {
        self.call();
        let act = self.act();
        self.span("fc dy", dy, n * fo * act);
        self.from("fc weight", w, fo * fi * act, self.weights());
        self.span("fc dx", dx, n * fi * act);
        Ok(())
    }
    fn linear_backward_weight(
        &self,
        n: usize,
        fi: usize,
        fo: usize,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        db: DevPtr,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()> {
        self.call();
        let act = self.act();
        self.span("fc x", x, n * fi * act);
        self.span("fc dy", dy, n * fo * act);
        self.from("fc dw", dw, fo * fi * 4, "grads");
        self.from("fc db", db, fo * 4, "grads");
        self.from("fc workspace", ws, ws_elems * 4, "ws");
        Ok(())
    }
    fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        _smoothing: f32,
        scale: ScaleArg,
        logits: DevPtr,
        labels: Labels,
        row_loss: DevPtr,
        loss: DevPtr,
        counter: DevPtr,
        dlogits: DevPtr,
    ) -> Result<()> {
        self.call();
        let act = self.act();
        self.span("logits", logits, n * k * act);
        self.span("dlogits", dlogits, n * k * act);
        let Labels::F32(labels) = labels else {
            panic!("the executor passes f32 labels")
        };
        self.from("labels", labels, n * 4, "labels");
        self.from("row loss", row_loss, n * 4, "row_loss");
        self.from("loss", loss, 4, "report");
        self.from("counter", counter, 4, "report");
        if let ScaleArg::Device(p) = scale {
            self.from("loss scale", p, 4, "report");
        }
        Ok(())
    }
    fn copy_channels(
        &self,
        rows: usize,
        c: usize,
        src: DevPtr,
        src_ld: usize,
        src_off: usize,
        dst: DevPtr,
        dst_ld: usize,
        dst_off: usize,
        zero_to: usize,
        _accumulate: bool,
    ) -> Result<()> {
        self.call();
        // The staged input is fp32 at every level; everything else is an activation.
        let elem = if self.buffer_of(src) == Some("images") {
            4
        } else {
            self.act()
        };
        self.strided("copy src", src, rows, src_ld, src_off + c, elem);
        self.strided(
            "copy dst",
            dst,
            rows,
            dst_ld,
            dst_off + c.max(zero_to),
            self.act(),
        );
        Ok(())
    }
    fn pad_channels(
        &self,
        rows: usize,
        c: usize,
        c_pad: usize,
        src: DevPtr,
        dst: DevPtr,
    ) -> Result<()> {
        self.call();
        self.span("pad src", src, rows * c * 2);
        self.span("pad dst", dst, rows * c_pad * 2);
        Ok(())
    }
    fn cast_f32_to_f16(&self, src: DevPtr, count: usize, dst: DevPtr) -> Result<()> {
        self.call();
        self.from("cast src", src, count * 4, "images");
        self.from("cast dst", dst, count * 2, "arena");
        Ok(())
    }
    fn overflow_check(&self, grads: DevPtr, count: usize, _f16: bool, flag: DevPtr) -> Result<()> {
        self.call();
        self.from("overflow grads", grads, count * 4, "grads");
        self.from("overflow flag", flag, 4, "report");
        Ok(())
    }
    fn rmsprop(&self, p: RmspropParams, _grad_f16: bool) -> Result<()> {
        self.call();
        let n = p.count as usize;
        for (what, ptr, buf) in [
            ("w", p.w, "master"),
            ("ms", p.ms, "ms"),
            ("mom", p.mom, "mom"),
            ("grad", p.grad, "grads"),
        ] {
            self.from(what, ptr, n * 4, buf);
        }
        self.from("w16", p.w16, n * 2, "w16");
        self.from("decay", p.decay, n, "decay");
        for ptr in [p.overflow, p.loss_scale].into_iter().filter(|&p| p != 0) {
            self.from("scaler word", ptr, 4, "report");
        }
        Ok(())
    }
    fn loss_scale_update(
        &self,
        flag: DevPtr,
        scale: DevPtr,
        clean: DevPtr,
        _growth: u32,
    ) -> Result<()> {
        self.call();
        for (what, p) in [("flag", flag), ("scale", scale), ("clean", clean)] {
            self.from(what, p, 4, "report");
        }
        Ok(())
    }
}

fn layout(name: &str, batch: usize, size: usize, amp: Amp, train: bool) -> (StepLayout, Checker) {
    let config = PlanConfig {
        batch,
        image_size: size,
        num_classes: 10,
        ..PlanConfig::default()
    };
    let plan = plan::build(name, config).unwrap();
    let (mut step, mem) = StepLayout::new(plan, amp, train, 132, RmsPropConfig::default()).unwrap();
    let buffers = Buffers::place(&mut step, &mem, train);
    let checker = Checker {
        buffers,
        amp,
        calls: RefCell::new(0),
        errors: RefCell::new(Vec::new()),
    };
    (step, checker)
}

/// Runs a program's launches through the checker; returns the problems found.
fn run(step: &StepLayout, checker: &Checker, train: bool, args: StepArgs) -> Vec<String> {
    let program = if train {
        &step.program.train
    } else {
        &step.program.infer
    };
    *checker.calls.borrow_mut() = 0;
    for &launch in program {
        if let Err(e) = step.launch(checker, launch, args) {
            checker
                .errors
                .borrow_mut()
                .push(format!("{launch:?}: {e:#}"));
        }
    }
    assert!(
        *checker.calls.borrow() > program.len() / 2,
        "too few kernel calls"
    );
    checker.errors.take()
}

#[test]
fn every_launch_addresses_only_memory_the_executor_allocates() {
    for (name, batch, size) in [("tiny", 2, 32), ("v4", 2, 75)] {
        for amp in [Amp::O2, Amp::O0, Amp::O3] {
            let dynamic = StepArgs {
                train: true,
                step: 3,
                lr: 0.01,
                scale: ScaleArg::Value(1.0),
                growth: Some(2000),
                slot: 1,
            };
            let (step, checker) = layout(name, batch, size, amp, true);
            let scale = ScaleArg::Device(step.report_word(3));
            let problems = run(&step, &checker, true, StepArgs { scale, ..dynamic });
            assert!(
                problems.is_empty(),
                "{name} {amp:?} training:\n{}",
                problems.join("\n")
            );
            let fixed = StepArgs {
                growth: None,
                ..dynamic
            };
            let problems = run(&step, &checker, true, fixed);
            assert!(
                problems.is_empty(),
                "{name} {amp:?} fixed scale:\n{}",
                problems.join("\n")
            );
            let problems = run(&step, &checker, false, StepArgs::infer());
            assert!(
                problems.is_empty(),
                "{name} {amp:?} eval on the training layout:\n{}",
                problems.join("\n")
            );
            let (step, checker) = layout(name, batch, size, amp, false);
            let problems = run(&step, &checker, false, StepArgs::infer());
            assert!(
                problems.is_empty(),
                "{name} {amp:?} inference-only:\n{}",
                problems.join("\n")
            );
        }
    }
}

#[test]
fn the_checker_catches_a_misplaced_tensor_and_a_wrong_weight_copy() {
    let (mut step, checker) = layout("tiny", 2, 32, Amp::O2, true);
    // The logits placed past the arena's end.
    let logits = step.plan.logits;
    step.offsets[logits] = Some(checker.buffers.0[0].2);
    let problems = run(&step, &checker, true, StepArgs::infer());
    assert!(
        problems.iter().any(|p| p.contains("outside every buffer")),
        "{problems:?}"
    );
    // O0 kernels reading the fp16 working copy as fp32 weights.
    let (step, mut checker) = layout("tiny", 2, 32, Amp::O2, true);
    checker.amp = Amp::O0;
    let problems = run(&step, &checker, false, StepArgs::infer());
    assert!(
        problems.iter().any(|p| p.contains("expected master")),
        "{problems:?}"
    );
}
