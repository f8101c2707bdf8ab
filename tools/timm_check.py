#!/usr/bin/env python3
"""Check the engine against timm's inception_v4 itself (PyTorch, CPU). Not run in CI.

Needs torch, timm, safetensors, numpy, onnx and onnxruntime, e.g. in a virtual environment:
    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch timm safetensors numpy onnx onnxruntime
    /tmp/venv/bin/python tools/timm_check.py [--num-classes 10] [--image-size 299] [--images 8]

What it does, in a temporary folder:
1. builds timm's inception_v4 (pretrained=False) with random BatchNorm gamma and beta and running
   statistics set from real images then jittered (random statistics alone would make the logits
   nearly independent of the image); saves its state dict with safetensors;
2. `inception-engine import --from timm` turns it into an engine checkpoint;
3. the engine's CPU backend computes logits of real images (the bundled Fashion-MNIST validation
   PNGs through the engine's eval transform), via the ignored test
   tests/interop_cpu_logits.rs, which also writes the exact input tensor it used;
4. timm computes logits of that same tensor in float32 and in float64;
5. `inception-engine export --format onnx` of the imported checkpoint, run by onnxruntime on the
   same tensor;
6. `inception-engine export --format timm` of the imported checkpoint, loaded into a fresh timm
   model with load_state_dict(strict=True): its logits must equal the first model's exactly.
Prints max |difference| and relative L2 of each pair, also relative to how much the logits differ
between images. Float64 timm is the reference: float32 rounding alone (timm's own included) moves
a deep network's logits by ~1e-4 relative. Passes when the engine and onnxruntime are within
max(--tol, 4 x timm-float32's own error) of it and the timm export is bit-identical.
"""
import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_binary(work):
    """Build the engine and take a private copy: a target folder shared with other checkouts
    may get another build of the binary while this check runs."""
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    private = os.path.join(work, "inception-engine")
    shutil.copy2(os.path.join(target, "release", "inception-engine"), private)
    return private


def calibration_batch(n, size):
    """n bundled validation PNGs, resized and normalised (only to set the BN statistics; the
    comparison itself uses the engine's exact input tensor)."""
    root = os.path.join(ROOT, "data", "fashion-mnist-mini", "val")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))
    pick = files[:: max(1, len(files) // n)][:n]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float64) for f in pick]
    x = (np.stack(imgs) / 255.0 - mean) / std
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def perturbed_timm(num_classes, size, seed, bn):
    """timm's model with random BN gamma and beta, and running statistics set from real images
    then jittered. Random running statistics alone wash the input out over 149 BN layers, so
    every image would give nearly the same logits and the comparison would say little."""
    torch.manual_seed(seed)
    model = timm.create_model("inception_v4", pretrained=False, num_classes=num_classes)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.7, 1.3)
            m.bias.uniform_(-0.2, 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its own statistics
        if bn == "random":
            for m in bns:
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.momentum = 0.1
            return model.eval()
        model.train()(calibration_batch(16, size))
        for m in bns:
            m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.05, 0.05))
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
            m.momentum = 0.1
            m.num_batches_tracked.zero_()
    return model.eval()


def compare(label, got, want):
    """Relative L2 against the logits, and against their spread between images (so a backbone
    that mapped every image to nearly the same features could not hide a difference)."""
    diff = np.abs(got - want).max()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    centred = np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(axis=0))
    print(f"{label:24s} max|diff| {diff:.3e}  relative L2 {rel:.3e}  "
          f"vs between-image spread {centred:.3e}  (max|logit| {np.abs(want).max():.3g})")
    return rel


def engine_cpu_logits(ckpt, work, n):
    env = dict(os.environ, INTEROP_CKPT=ckpt, INTEROP_OUT=work, INTEROP_N=str(n))
    cmd = ["cargo", "test", "--release", "--quiet", "--test", "interop_cpu_logits", "--", "--ignored"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    n, s, k = (int(v) for v in open(os.path.join(work, "shape.txt")).read().split())
    x = np.fromfile(os.path.join(work, "input.f32"), dtype="<f4").reshape(n, 3, s, s)
    y = np.fromfile(os.path.join(work, "logits.f32"), dtype="<f4").reshape(n, k)
    return x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--bn", choices=["calibrated", "random"], default="calibrated",
                    help="BN running statistics: from real images (logits follow the image), or "
                         "random (logits nearly independent of the image, rounding tiny)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="timm_check_")
    engine = engine_binary(work)
    run = lambda *a: subprocess.run([engine, *a], check=True, stdout=subprocess.DEVNULL)

    model = perturbed_timm(args.num_classes, args.image_size, args.seed, args.bn)
    sd_path, ckpt = os.path.join(work, "timm.safetensors"), os.path.join(work, "ck.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sd_path)
    run("import", "--from", "timm", sd_path, "--out", ckpt, "--image-size", str(args.image_size))

    x, cpu = engine_cpu_logits(ckpt, work, args.images)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
        # float64 timm is the reference: float32 rounding alone (timm's own included) moves the
        # logits of a deep network, and this shows by how much.
        exact = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    print(f"timm {timm.__version__}, torch {torch.__version__}; inception_v4, "
          f"{args.num_classes} classes, {args.images} real images at {args.image_size}x{args.image_size}, "
          f"{args.bn} BN statistics")
    floor = compare("timm f32 vs timm f64", want, exact)
    rels = [compare("engine CPU vs timm f64", cpu, exact), compare("engine CPU vs timm f32", cpu, want)]

    onnx_path = os.path.join(work, "model.onnx")
    run("export", "--checkpoint", ckpt, "--format", "onnx", "--out", onnx_path)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0]
    rels += [compare("onnxruntime vs timm f64", y, exact), compare("onnxruntime vs timm f32", y, want)]

    back = os.path.join(work, "back.safetensors")
    run("export", "--checkpoint", ckpt, "--format", "timm", "--out", back)
    fresh = timm.create_model("inception_v4", pretrained=False, num_classes=args.num_classes)
    fresh.load_state_dict(load_file(back), strict=True)
    with torch.no_grad():
        again = fresh.eval()(torch.from_numpy(x)).numpy()
    exported_exact = compare("timm(exported) vs timm f32", again, want) == 0.0

    # Passing: every float32 implementation is as close to the float64 reference as the tolerance
    # or a small multiple of timm's own float32 error allows, and the export is bit-identical.
    limit = max(args.tol, 4 * floor)
    ok = all(r <= limit for r in rels[::2]) and exported_exact
    print("PASS" if ok else "FAIL", f"(limit {limit:.3g} relative L2 against float64 timm)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
