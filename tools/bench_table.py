#!/usr/bin/env python3
"""Turns benchmark outputs into the markdown tables of BENCHMARKS.md.

    python3 tools/bench_table.py --kernels gpu-out/bench-kernels.json \\
        --train gpu-out/bench-train.log --torch gpu-out/torch-baseline.json

Each input may be a JSON file or a log whose last JSON line is the report:
- --kernels: `inception-engine bench kernels --json` (or its --out file); with several
  `--kernels` paths the main tables show the last, and a table compares the paths case by case;
- --train:   `inception-engine bench train --json` (needs "images_per_sec"; with several
  `--kernels` paths, every run is under "runs");
- --torch:   `tools/torch_baseline.py` (its final JSON line or --json-out file).
With --ratio-only it prints just the end-to-end lines (tools/gpu-check.sh's summary uses that).
Standard library only.
"""

import argparse
import json
import sys


def load(path, key):
    """The last JSON object in `path` that has `key` (a whole-file JSON object counts)."""
    try:
        text = open(path).read()
    except OSError:
        return None
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and key in obj:
            return obj
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                return obj
    return None


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def last_paths_rows(rep):
    """The rows of the last kernel paths timed (the references, measured once, included)."""
    specs = rep.get("kernels") or []
    last = specs[-1] if specs else None
    refs = {r["id"] for r in rep["rows"] if r.get("kernels") == last}
    return [r for r in rep["rows"]
            if last is None or r.get("kernels") == last or r["id"] not in refs]


def conv_table(rep):
    """One line per conv shape (and the FC): custom and reference TFLOP/s and ratio per mode."""
    by_layer = {}
    for r in last_paths_rows(rep):
        if r["group"] not in ("conv", "fc"):
            continue
        _, layer, mode = r["id"].split("/")
        by_layer.setdefault((r["group"], layer, r["shape"]), {})[mode] = r
    out = [
        "| layer (first of its shape) | shape | fprop ours | fprop ref | ratio | dgrad ours | dgrad ref | ratio | wgrad ours | wgrad ref | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for (group, layer, shape), modes in by_layer.items():
        cells = [layer if group == "conv" else "classifier (vs cuBLAS)", f"`{shape}`"]
        for mode in ("fprop", "dgrad", "wgrad"):
            r = modes.get(mode)
            c = r and r.get("custom")
            ref = r and r.get("reference")
            cells += [fmt(c and c["rate"]), fmt(ref and ref["rate"]), fmt(r and r.get("ratio"))]
            if r and r.get("ratio"):
                ratios.append(r["ratio"])
        out.append("| " + " | ".join(cells) + " |")
    for (group, layer, shape), modes in by_layer.items():
        r = modes.get("fprop_pad8")
        if r and r.get("custom"):
            ref = r.get("reference")
            out.append("")
            out.append(f"{layer} forward on the tensor-core path with its input padded to 8 channels "
                       f"(pad_channels timed too): ours {fmt(r['custom']['rate'])} TFLOP/s, "
                       f"cuDNN {fmt(ref and ref['rate'])}, ratio {fmt(r.get('ratio'))}.")
    if ratios:
        geo = 1.0
        for x in ratios:
            geo *= x
        geo **= 1.0 / len(ratios)
        out.append("")
        out.append(f"Geometric mean of ours/reference over {len(ratios)} cases: **{geo:.2f}** "
                   f"(TFLOP/s; above 1 means ours is faster).")
    return "\n".join(out)


def memory_table(rep):
    out = [
        f"Device-to-device copy: **{fmt(rep.get('copy_gbps'), 0)} GB/s** (read + write of 1 GiB).",
        "",
        "| case | shape | kernel | GB/s | of copy |",
        "|---|---|---|---:|---:|",
    ]
    for r in last_paths_rows(rep):
        if r["unit"] != "GB/s" or r["group"] == "copy":
            continue
        c = r.get("custom") or {}
        frac = r.get("copy_fraction")
        out.append(f"| {r['id']} | `{r['shape']}` | {c.get('label', '-')} | {fmt(c.get('rate'), 0)} | "
                   f"{'-' if frac is None else f'{100 * frac:.0f}%'} |")
    return "\n".join(out)


def paths_table(rep):
    """Each case's time under every kernel path timed, and first over last (above 1: the last
    path is faster)."""
    specs = rep.get("kernels") or []
    if len(specs) < 2:
        return ""
    by_id = {}
    for r in rep["rows"]:
        c = r.get("custom")
        if c:
            by_id.setdefault(r["id"], {})[r.get("kernels")] = c["median_ms"]
    out = ["| case | " + " | ".join(f"{k} ms" for k in specs) + f" | {specs[0]} / {specs[-1]} |",
           "|---|" + "---:|" * (len(specs) + 1)]
    totals = [0.0] * len(specs)
    for case, times in by_id.items():
        if not all(k in times for k in specs):
            continue
        for i, k in enumerate(specs):
            totals[i] += times[k]
        out.append(f"| {case} | " + " | ".join(fmt(times[k], 3) for k in specs)
                   + f" | {fmt(times[specs[0]] / times[specs[-1]])} |")
    out.append("| **sum over the cases** | " + " | ".join(fmt(t, 3) for t in totals)
               + f" | {fmt(totals[0] / totals[-1] if totals[-1] else None)} |")
    return "\n".join(out)


def limit_table(rep):
    """Each case of the last paths against its limit at the card's matrix rate and copy bandwidth."""
    rows = [r for r in last_paths_rows(rep) if r.get("limit_ms") is not None and r.get("custom")]
    if not rows:
        return ""
    out = [f"Limits at {fmt(rep.get('matrix_tflops'), 0)} TFLOP/s (cuBLAS fp16) and "
           f"{fmt(rep.get('copy_gbps'), 0)} GB/s (copy):",
           "",
           "| case | shape | limit ms | ours ms | of the limit |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['id']} | `{r['shape']}` | {fmt(r['limit_ms'], 3)} | "
                   f"{fmt(r['custom']['median_ms'], 3)} | {100 * r['of_limit']:.0f}% |")
    return "\n".join(out)


def e2e_lines(train, torch):
    lines = []
    ours = train and train.get("images_per_sec")
    res = (torch or {}).get("results", {})
    for run in (train or {}).get("runs") or ([train] if ours else []):
        peak = run.get("peak_device_bytes") or run.get("peak_memory_bytes")
        extra = f", peak {peak / 2**30:.2f} GiB" if peak else ""
        if run.get("of_limit") is not None:
            extra += f", {100 * run['of_limit']:.1f}% of the limit ({run['limit_ms']:.1f} ms)"
        if run.get("kernel_launches_per_step") is not None:
            extra += f", {run['kernel_launches_per_step']} kernel launches per step"
        paths = f" [{run['kernels']}]" if run.get("kernels") else ""
        lines.append(f"engine{paths}: {run['images_per_sec']:.1f} images/s{extra}")
    for mode in ("eager", "compile"):
        r = res.get(mode)
        if not r or "images_per_sec" not in r:
            if r and "error" in r:
                lines.append(f"pytorch {mode}: failed ({r['error'][:80]})")
            continue
        peak = r.get("peak_memory_bytes", 0) / 2**30
        ratio = f", engine/pytorch {mode} = {ours / r['images_per_sec']:.2f}" if ours else ""
        lines.append(f"pytorch {mode}: {r['images_per_sec']:.1f} images/s, peak {peak:.2f} GiB{ratio}")
    if not lines:
        lines.append("no end-to-end figures (bench train / torch_baseline output missing)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="benchmark outputs -> markdown")
    p.add_argument("--kernels")
    p.add_argument("--train")
    p.add_argument("--torch")
    p.add_argument("--ratio-only", action="store_true")
    a = p.parse_args(argv)
    train = load(a.train, "images_per_sec") if a.train else None
    torch = load(a.torch, "results") if a.torch else None
    if a.ratio_only:
        print("\n".join(e2e_lines(train, torch)))
        return 0
    if a.kernels:
        rep = load(a.kernels, "rows")
        if rep is None:
            print(f"no kernel report in {a.kernels}", file=sys.stderr)
            return 1
        print(f"Kernels on {rep['device']}: plan {rep['plan']}, batch {rep['batch']}, "
              f"{rep['image_size']}x{rep['image_size']}, median of {rep['samples']} samples; "
              f"{rep.get('unverified_shapes', 0)} conv shapes failed the tensor-core check.\n")
        print(conv_table(rep))
        print()
        print(memory_table(rep))
        print()
        for table in (paths_table(rep), limit_table(rep)):
            if table:
                print(table)
                print()
    if a.train or a.torch:
        print("End to end:\n")
        for line in e2e_lines(train, torch):
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
