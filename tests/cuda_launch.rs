//! Every launch of every CUDA step program, checked without a GPU: the program's calls
//! ([`StepLayout::calls`], the same values the trainer launches) go to a checker that inspects
//! each operand the trainer would hand a kernel. Every pointer must be non-null, and the whole extent the kernel touches (from the shape
//! and stride arguments) must lie inside one buffer: the arena, the parameter buffers, the
//! staging buffers. Weights must come from the copy the precision level reads (fp32 masters at
//! O0, the fp16 working copy otherwise; BN parameters fp16 only at O3). An address the executor
//! computes wrongly, or a tensor it addresses that the arena does not store, fails here instead
//! of on a GPU.

use std::cell::RefCell;

use anyhow::Result;
use inception_engine::backend::cuda::arena::{stem_padded_elems, ParamSlots};
use inception_engine::backend::cuda::calls::Call;
use inception_engine::backend::cuda::layout::{Ptrs, StepArgs, StepLayout, REPORT_WORDS};
use inception_engine::backend::Amp;
use inception_engine::gpu::{DevPtr, KernelPaths};
use inception_engine::ops::batchnorm::cuda::{bn_workspace, BnArgs};
use inception_engine::ops::batchnorm::cuda::{BnBackward, BnForwardInfer, BnForwardTrain};
use inception_engine::ops::cast::cuda::CastF32ToF16;
use inception_engine::ops::concat::cuda::CopyChannels;
use inception_engine::ops::conv::cuda::{ConvDgrad, ConvFprop, ConvWgrad};
use inception_engine::ops::conv::cuda::{ConvOut, PAD_CHANNELS};
use inception_engine::ops::conv::ConvShape;
use inception_engine::ops::dropout::cuda::{DropoutBackward, DropoutForward};
use inception_engine::ops::global_pool::cuda::{GlobalAvgPoolBackward, GlobalAvgPoolForward};
use inception_engine::ops::linear::cuda::{
    LinearBackwardData, LinearBackwardWeight, LinearForward,
};
use inception_engine::ops::pool::cuda::{argmax_bytes, PoolBackward, PoolForward};
use inception_engine::ops::pool::PoolShape;
use inception_engine::ops::relu::cuda::{ReluBackward, ReluForward};
use inception_engine::ops::softmax_ce::cuda::SoftmaxCe;
use inception_engine::ops::softmax_ce::cuda::{Labels, ScaleArg};
use inception_engine::optim::cuda::{LossScaleUpdate, OverflowCheck, Rmsprop};
use inception_engine::optim::RmsPropConfig;
use inception_engine::plan::memory::MemoryPlan;
use inception_engine::plan::{self, PlanConfig};

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
            ("report", REPORT_WORDS * 4),
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

    /// The vectorised BN reductions' ticket counter: a report word, and there whenever the
    /// path is asked for.
    fn bn_counter(&self, a: &BnArgs) {
        if a.vec {
            self.from("bn counter", a.counter, 4, "report");
        }
    }
}

/// One checking method per kind of call.
impl Checker {
    fn check(&self, call: &Call) -> Result<()> {
        match call {
            Call::ConvFprop(c) => self.conv_fprop(c),
            Call::ConvDgrad(c) => self.conv_dgrad(c),
            Call::ConvWgrad(c) => self.conv_wgrad(c),
            Call::BnForwardTrain(c) => self.bn_forward_train(c),
            Call::BnForwardInfer(c) => self.bn_forward_infer(c),
            Call::BnBackward(c) => self.bn_backward(c),
            Call::ReluForward(c) => self.relu_forward(c),
            Call::ReluBackward(c) => self.relu_backward(c),
            Call::PoolForward(c) => self.pool_forward(c),
            Call::PoolBackward(c) => self.pool_backward(c),
            Call::GlobalAvgPoolForward(c) => self.global_avgpool_forward(c),
            Call::GlobalAvgPoolBackward(c) => self.global_avgpool_backward(c),
            Call::DropoutForward(c) => self.dropout_forward(c),
            Call::DropoutBackward(c) => self.dropout_backward(c),
            Call::LinearForward(c) => self.linear_forward(c),
            Call::LinearBackwardData(c) => self.linear_backward_data(c),
            Call::LinearBackwardWeight(c) => self.linear_backward_weight(c),
            Call::SoftmaxCe(c) => self.softmax_ce(c),
            Call::CopyChannels(c) => self.copy_channels(c),
            Call::CastF32ToF16(c) => self.cast_f32_to_f16(c),
            Call::OverflowCheck(c) => self.overflow_check(c),
            Call::Rmsprop(c) => self.rmsprop(c),
            Call::LossScaleUpdate(c) => self.loss_scale_update(c),
        }
    }

    fn conv_fprop(&self, c: &ConvFprop) -> Result<()> {
        let (s, x, w, out) = (&c.s, c.x, c.w, c.out);
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
    fn conv_dgrad(&self, c: &ConvDgrad) -> Result<()> {
        let (s, dy, w, out) = (&c.s, c.dy, c.w, c.out);
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
    fn conv_wgrad(&self, c: &ConvWgrad) -> Result<()> {
        let (s, x, dy, dw, ws, ws_elems) = (&c.s, c.x, c.dy, c.dw, c.ws, c.ws_elems);
        // The stem's input padded to 8 channels, which its weight gradient may read instead.
        if let Some(xp) = c.x_padded {
            let padded = s.n * s.h * s.w * PAD_CHANNELS * self.act();
            self.from("wgrad padded x", xp, padded, "stem_x");
        }
        self.call();
        let (c, act) = (s.conv, self.act());
        self.span("wgrad x", x, s.n * s.h * s.w * c.cin * act);
        self.span("wgrad dy", dy, s.n * s.oh() * s.ow() * c.cout * act);
        self.from("wgrad dw", dw, c.cout * c.kh * c.kw * c.cin * 4, "grads");
        self.from("wgrad workspace", ws, ws_elems * 4, "ws");
        Ok(())
    }
    fn bn_forward_train(&self, c: &BnForwardTrain) -> Result<()> {
        let (a, x, y, ws) = (&c.a, c.x, c.y, c.ws);
        self.call();
        self.bn_common(a, x);
        self.bn_counter(a);
        self.strided("bn y", y, a.m, a.ldy, a.yoff + a.c, self.act());
        self.span("bn saved mean", a.save_mean, a.c * self.bn());
        self.span("bn saved inv std", a.save_inv_std, a.c * self.bn());
        self.from("bn workspace", ws, bn_workspace(a.m, a.c) * 4, "ws");
        Ok(())
    }
    fn bn_forward_infer(&self, c: &BnForwardInfer) -> Result<()> {
        let (a, x, y) = (&c.a, c.x, c.y);
        self.call();
        self.bn_common(a, x);
        self.strided("bn y", y, a.m, a.ldy, a.yoff + a.c, self.act());
        Ok(())
    }
    fn bn_backward(&self, c: &BnBackward) -> Result<()> {
        let (a, x, y, dy, dgamma, dbeta, dx, ws) =
            (&c.a, c.x, c.y, c.dy, c.dgamma, c.dbeta, c.dx, c.ws);
        self.call();
        self.bn_common(a, x);
        self.bn_counter(a);
        let act = self.act();
        // The vectorised path recomputes the ReLU mask from x: it reads no y.
        if a.relu && !c.uses_vec() {
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
    fn relu_forward(&self, c: &ReluForward) -> Result<()> {
        let (count, x, y) = (c.count, c.x, c.y);
        self.call();
        self.span("relu x", x, count * self.act());
        self.span("relu y", y, count * self.act());
        Ok(())
    }
    fn relu_backward(&self, c: &ReluBackward) -> Result<()> {
        let (count, y, dy, dx) = (c.count, c.y, c.dy, c.dx);
        self.call();
        for (what, p) in [("relu y", y), ("relu dy", dy), ("relu dx", dx)] {
            self.span(what, p, count * self.act());
        }
        Ok(())
    }
    fn pool_forward(&self, c: &PoolForward) -> Result<()> {
        let (s, x, y, ldy, yoff) = (&c.s, c.x, c.y, c.ldy, c.yoff);
        self.call();
        self.span("pool x", x, s.n * s.h * s.w * s.c * self.act());
        self.pool_argmax(s, c.max, c.argmax);
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
    fn pool_backward(&self, c: &PoolBackward) -> Result<()> {
        let (s, x, dy, ldy, yoff, dx) = (&c.s, c.x, c.dy, c.ldy, c.yoff, c.dx);
        self.call();
        let act = self.act();
        // Through a saved argmax the backward reads no x (and is given none).
        match c.argmax {
            0 => _ = self.span("pool x", x, s.n * s.h * s.w * s.c * act),
            argmax => self.pool_argmax(s, c.max, argmax),
        }
        self.strided("pool dy", dy, s.n * s.oh() * s.ow(), ldy, yoff + s.c, act);
        self.span("pool dx", dx, s.n * s.h * s.w * s.c * act);
        Ok(())
    }
    /// A saved argmax: a max pool's, one byte per output, in the arena.
    fn pool_argmax(&self, s: &PoolShape, max: bool, argmax: DevPtr) {
        if argmax == 0 {
            return;
        }
        if !max {
            self.errors
                .borrow_mut()
                .push("an average pool given an argmax".into());
        }
        self.from("pool argmax", argmax, argmax_bytes(s), "arena");
    }
    fn global_avgpool_forward(&self, c: &GlobalAvgPoolForward) -> Result<()> {
        let (n, hw, c, x, y) = (c.n, c.hw, c.c, c.x, c.y);
        self.call();
        self.span("gap x", x, n * hw * c * self.act());
        self.span("gap y", y, n * c * self.act());
        Ok(())
    }
    fn global_avgpool_backward(&self, c: &GlobalAvgPoolBackward) -> Result<()> {
        let (n, hw, c, dy, dx) = (c.n, c.hw, c.c, c.dy, c.dx);
        self.call();
        self.span("gap dy", dy, n * c * self.act());
        self.span("gap dx", dx, n * hw * c * self.act());
        Ok(())
    }
    fn dropout_forward(&self, c: &DropoutForward) -> Result<()> {
        let (count, x, y) = (c.count, c.x, c.y);
        self.call();
        self.span("dropout x", x, count * self.act());
        self.span("dropout y", y, count * self.act());
        self.step_word(c.step_dev);
        Ok(())
    }
    fn dropout_backward(&self, c: &DropoutBackward) -> Result<()> {
        let (count, dy, dx) = (c.count, c.dy, c.dx);
        self.call();
        self.span("dropout dy", dy, count * self.act());
        self.span("dropout dx", dx, count * self.act());
        self.step_word(c.step_dev);
        Ok(())
    }
    fn linear_forward(&self, c: &LinearForward) -> Result<()> {
        let (n, fi, fo, x, w, b, y) = (c.n, c.in_f, c.out_f, c.x, c.w, c.b, c.y);
        self.call();
        let act = self.act();
        self.span("fc x", x, n * fi * act);
        self.from("fc weight", w, fo * fi * act, self.weights());
        self.from("fc bias", b, fo * 4, "master");
        self.span("fc y", y, n * fo * act);
        Ok(())
    }
    fn linear_backward_data(&self, c: &LinearBackwardData) -> Result<()> {
        let (n, fi, fo, dy, w, dx) = (c.n, c.in_f, c.out_f, c.dy, c.w, c.dx);
        self.call();
        let act = self.act();
        self.span("fc dy", dy, n * fo * act);
        self.from("fc weight", w, fo * fi * act, self.weights());
        self.span("fc dx", dx, n * fi * act);
        Ok(())
    }
    fn linear_backward_weight(&self, c: &LinearBackwardWeight) -> Result<()> {
        let (n, fi, fo, x, dy, dw, db, ws, ws_elems) = (
            c.n, c.in_f, c.out_f, c.x, c.dy, c.dw, c.db, c.ws, c.ws_elems,
        );
        self.call();
        let act = self.act();
        self.span("fc x", x, n * fi * act);
        self.span("fc dy", dy, n * fo * act);
        self.from("fc dw", dw, fo * fi * 4, "grads");
        self.from("fc db", db, fo * 4, "grads");
        self.from("fc workspace", ws, ws_elems * 4, "ws");
        Ok(())
    }
    fn softmax_ce(&self, c: &SoftmaxCe) -> Result<()> {
        let (n, k, scale, logits, labels, row_loss, loss, counter, dlogits) = (
            c.n,
            c.k,
            c.grad_scale,
            c.logits,
            c.labels,
            c.row_loss,
            c.loss,
            c.counter,
            c.dlogits,
        );
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
    fn copy_channels(&self, c: &CopyChannels) -> Result<()> {
        let (rows, c, src, src_ld, src_off, dst, dst_ld, dst_off, zero_to) = (
            c.rows, c.c, c.src, c.src_ld, c.src_off, c.dst, c.dst_ld, c.dst_off, c.zero_to,
        );
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
    fn cast_f32_to_f16(&self, c: &CastF32ToF16) -> Result<()> {
        let (src, count, dst) = (c.src, c.count, c.dst);
        self.call();
        self.from("cast src", src, count * 4, "images");
        self.from("cast dst", dst, count * 2, "arena");
        Ok(())
    }
    fn overflow_check(&self, c: &OverflowCheck) -> Result<()> {
        let (grads, count, flag) = (c.grads, c.count, c.flag);
        self.call();
        self.from("overflow grads", grads, count * 4, "grads");
        self.from("overflow flag", flag, 4, "report");
        Ok(())
    }
    fn rmsprop(&self, c: &Rmsprop) -> Result<()> {
        let p = c.params;
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
        if p.lr_dev != 0 {
            self.from("learning rate word", p.lr_dev, 4, "report");
        }
        Ok(())
    }
    /// The step number a graph-replayed dropout reads from device memory (0: an argument).
    fn step_word(&self, step_dev: u64) {
        if step_dev != 0 {
            self.from("step word", step_dev, 8, "report");
        }
    }
    fn loss_scale_update(&self, c: &LossScaleUpdate) -> Result<()> {
        let (flag, scale, clean) = (c.flag, c.scale, c.clean);
        self.call();
        for (what, p) in [("flag", flag), ("scale", scale), ("clean", clean)] {
            self.from(what, p, 4, "report");
        }
        Ok(())
    }
}

fn layout(name: &str, batch: usize, size: usize, amp: Amp, train: bool) -> (StepLayout, Checker) {
    layout_with(name, batch, size, amp, train, KernelPaths::LEAN)
}

fn layout_with(
    name: &str,
    batch: usize,
    size: usize,
    amp: Amp,
    train: bool,
    paths: KernelPaths,
) -> (StepLayout, Checker) {
    let config = PlanConfig {
        batch,
        image_size: size,
        num_classes: 10,
        ..PlanConfig::default()
    };
    let plan = plan::build(name, config).unwrap();
    let optim = RmsPropConfig::default();
    let (mut step, mem) = StepLayout::new(plan, amp, train, 132, optim, paths).unwrap();
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
    // The same resolution the trainer launches from.
    let calls = match step.program_calls(train, args) {
        Ok(calls) => calls,
        Err(e) => return vec![format!("{e:#}")],
    };
    for (stage, call) in &calls {
        if let Err(e) = checker.check(call) {
            let msg = format!("{stage:?}: {e:#}");
            checker.errors.borrow_mut().push(msg);
        }
    }
    let launches: usize = calls.iter().map(|(_, c)| c.kernel_launches()).sum();
    eprintln!(
        "{} {:?} {}: {} stages, {} calls, {launches} kernel launches",
        step.plan.name,
        step.amp,
        if train { "training" } else { "inference" },
        program.len(),
        calls.len()
    );
    assert!(
        *checker.calls.borrow() > program.len() / 2,
        "too few kernel calls"
    );
    checker.errors.take()
}

#[test]
fn every_launch_addresses_only_memory_the_executor_allocates() {
    for (name, batch, size) in [("tiny", 2, 32), ("v4", 2, 75)] {
        for (amp, paths) in [
            (Amp::O2, KernelPaths::LEAN),
            (Amp::O0, KernelPaths::LEAN),
            (Amp::O3, KernelPaths::LEAN),
            (Amp::O2, KernelPaths::BASELINE),
        ] {
            let layout =
                |name, batch, size, amp, train| layout_with(name, batch, size, amp, train, paths);
            let dynamic = StepArgs {
                train: true,
                step: 3,
                lr: 0.01,
                scale: ScaleArg::Value(1.0),
                growth: Some(2000),
                on_device: false,
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
            // As a step replayed from a CUDA graph resolves it: step and rate in device words.
            let on_device = StepArgs {
                on_device: true,
                scale,
                ..dynamic
            };
            let problems = run(&step, &checker, true, on_device);
            assert!(
                problems.is_empty(),
                "{name} {amp:?} graph (values on the device):\n{}",
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
