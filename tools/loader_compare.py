#!/usr/bin/env python3
"""The engine's loader against torchvision + PIL on the same JPEGs, interleaved in one run.

Each repetition runs `inception-engine bench loader` and tools/loader_baseline.py back to back
(optionally pinned with taskset), so both see the same machine load; it prints each side's
median and best images/s and the ratios of the medians and of the bests, plus the engine's
per-stage split from its median run.

Usage: python3 tools/loader_compare.py --data DIR [--reps 5] [--cpu 1] [--workers 1]
       [--batch-size 32] [--batches 10] [--engine-args '--jpeg zune'] [--bin PATH]
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def last_json(out):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in:\n{out}")


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return last_json(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu", default="1", help="taskset CPU list ('' for no pinning)")
    ap.add_argument("--workers", type=int, default=1,
                    help="engine threads; the baseline gets workers-1 processes (0 = in process)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--engine-args", default="")
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "inception-engine"))
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    pin = ["taskset", "-c", args.cpu] if args.cpu else []
    common = ["--data", args.data, "--batch-size", str(args.batch_size), "--batches",
              str(args.batches), "--image-size", str(args.image_size)]
    engine = pin + [args.bin, "bench", "loader", "--workers", str(args.workers), "--json"] + \
        common + shlex.split(args.engine_args)
    torch_workers = 0 if args.workers <= 1 else args.workers
    baseline = pin + [args.python, os.path.join(HERE, "loader_baseline.py"), "--json", "--workers",
                      str(torch_workers)] + common
    ours, theirs = [], []
    for rep in range(args.reps):
        e = run(engine)
        t = run(baseline)
        ours.append(e)
        theirs.append(t)
        print(f"rep {rep + 1}: engine {e['images_per_sec']:.0f} img/s, "
              f"torchvision+PIL {t['images_per_sec']:.0f} img/s", flush=True)
    e_ips = [r["images_per_sec"] for r in ours]
    t_ips = [r["images_per_sec"] for r in theirs]
    e_med, t_med = statistics.median(e_ips), statistics.median(t_ips)
    print(f"engine ({ours[0]['jpeg']}): median {e_med:.0f}, best {max(e_ips):.0f} img/s")
    print(f"torchvision+PIL: median {t_med:.0f}, best {max(t_ips):.0f} img/s")
    print(f"ratio: {e_med / t_med:.2f}x (medians), {max(e_ips) / max(t_ips):.2f}x (bests), "
          f"per-rep min {min(a / b for a, b in zip(e_ips, t_ips)):.2f}x")
    mid = sorted(ours, key=lambda r: r["images_per_sec"])[len(ours) // 2]
    st = mid["stage_ms_per_image"]
    total = sum(st.values())
    print("engine per-stage split (ms per image, thread time): " + ", ".join(
        f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in st.items()))


if __name__ == "__main__":
    main()
