#!/usr/bin/env python3
"""PyTorch training-throughput baseline for inception-engine: timm `inception_v4`.

The same work as `inception-engine bench train --plan v4 --device cuda --batch-size 128 --amp O2`:
batch 128 at 299x299, 1000 classes, RMSProp as in the MindSpore recipe (alpha/rho 0.9, eps 1.0,
momentum 0.9, weight decay 4e-5 coupled into the gradient), cross-entropy with label smoothing 0.1,
AMP fp16 autocast with a GradScaler, channels_last, synthetic data that lives on the GPU (no input
pipeline in the timing). Modes: eager and torch.compile.

Prints images/s and peak memory (torch.cuda.max_memory_allocated) per mode, then one JSON line:
    {"tool": "torch_baseline", "results": {"eager": {...}, "compile": {...}}, ...}

Differences from the engine that do not change throughput:
- torch.optim.RMSprop puts eps OUTSIDE the square root (w -= lr * g / (sqrt(ms) + eps)); MindSpore,
  TF1 and the engine put it inside (g / sqrt(ms + eps)). With eps = 1.0 the updates differ, but the
  arithmetic per parameter is the same.
- PyTorch starts the mean square at 0; MindSpore/TF1 and the engine start it at 1.
- timm's head has no dropout by default; the engine's plan uses dropout 0.2 (one elementwise op).

Runs on the GPU machine (Python 3.12, PyTorch 2.11, timm; no network: the model is built without
pretrained weights). With `--data TRAIN --eval-data VAL --epochs N` it trains on real images instead
(a file written by `inception-engine pack`, or an ImageFolder) with the engine's recipe and reports
accuracy per epoch: see tools/torch_realdata.py.

    python3 tools/torch_baseline.py --mode both --batch-size 128 --image-size 299 --steps 30 --warmup 10
"""

import argparse
import json
import math
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["eager", "compile", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile happens here)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW (for comparison)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead or max-autotune")
    p.add_argument("--data", default=None, help="training images for a real-data run: a .pack file or an ImageFolder")
    p.add_argument("--eval-data", default=None, help="evaluation images of the real-data run")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the real-data run (with --data)")
    p.add_argument("--lr-max", type=float, default=None, help="real-data run: peak lr (default 0.4*batch/1024)")
    p.add_argument("--crop-min", type=float, default=0.08, help="real-data run: smallest crop area")
    p.add_argument("--jitter", type=float, default=0.4, help="real-data run: colour jitter strength")
    p.add_argument("--workers", type=int, default=16, help="real-data run: loader processes")
    p.add_argument("--seed", type=int, default=1, help="real-data run: seed")
    p.add_argument("--json-out", default=None, help="also write the final JSON to this file")
    return p.parse_args(argv)


def build(args, torch, timm):
    model = timm.create_model("inception_v4", pretrained=False, num_classes=args.num_classes)
    model = model.cuda()
    if not args.no_channels_last:
        model = model.to(memory_format=torch.channels_last)
    # torch's RMSprop: alpha is the decay rho; weight_decay is coupled (added to the gradient).
    opt = torch.optim.RMSprop(model.parameters(), lr=args.lr, alpha=0.9, eps=1.0, momentum=0.9,
                              weight_decay=4e-5)
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return model, opt, scaler, loss_fn


def run_mode(mode, args, torch, timm):
    torch.manual_seed(0)
    model, opt, scaler, loss_fn = build(args, torch, timm)
    model.train()
    fmt = torch.contiguous_format if args.no_channels_last else torch.channels_last
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda")
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device="cuda")

    # compile: the model (forward; AOTAutograd derives the backward) is compiled, the optimizer
    # step and the scaler stay eager, as in most training scripts.
    net = torch.compile(model, mode=args.compile_mode) if mode == "compile" else model

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step(images, labels)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step(images, labels)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / max(args.steps, 1)
    loss_v = float(loss.detach())
    out = {
        "images_per_sec": args.batch_size / (ms / 1000.0),
        "step_ms": ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "warmup_s": warm_s,
        "final_loss": loss_v if math.isfinite(loss_v) else None,
    }
    del net, model, opt, scaler
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.data is not None:
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch_realdata
        return torch_realdata.run(args)
    import torch
    import timm

    if not torch.cuda.is_available():
        print("torch_baseline: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    results = {}
    summary = {
        "tool": "torch_baseline",
        "model": "timm inception_v4",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "amp": "fp16 autocast + GradScaler",
        "channels_last": not args.no_channels_last,
        "optimizer": "torch RMSprop alpha 0.9 eps 1.0 (outside sqrt) momentum 0.9 wd 4e-5",
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    for mode in modes:
        try:
            r = run_mode(mode, args, torch, timm)
        except Exception as e:  # report and go on with the other mode
            print(f"{mode}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            r = {"error": f"{type(e).__name__}: {e}"}
        results[mode] = r
        if "error" not in r:
            print(f"{mode:8s} {r['images_per_sec']:9.1f} images/s  {r['step_ms']:8.2f} ms/step  "
                  f"peak {r['peak_memory_bytes'] / 2**30:6.2f} GiB  (warm-up {r['warmup_s']:.1f} s)",
                  flush=True)
        if args.json_out:
            # Rewritten after every mode, so a compile that runs out of time keeps the eager result.
            with open(args.json_out, "w") as f:
                f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
