#!/usr/bin/env bash
# One visit to the GPU machine: check everything in one go (see ../shared/gpu.md / docs).
#
# Run from the repository root with the release binary already copied to
# target/release/inception-engine (the GPU machine has no Rust toolchain). Logs go to $OUT (else
# ./gpu-out); a summary table is printed last. Every step has its own timeout, and the whole run a
# budget (GPU_CHECK_BUDGET seconds, default 480) so that a visit leaves time for a second try: a
# step that would start with less than 15 s left is skipped, a longer one is cut to what is left.
# The steps run in order of importance. GPU_CHECK_SKIP='regex' skips the steps whose names match
# (e.g. GPU_CHECK_SKIP='bench-kernels|torch-baseline' for a quick rerun).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
BIN="${BIN:-target/release/inception-engine}"
SUMMARY=()
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-480}))

# --- CUDA libraries: the wheels are not on the default search path -------------------------------
source tools/gpu-env.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/env.log"

# step NAME TIMEOUT_S CMD... : runs a step with a timeout, logs to $OUT/NAME.log, records status.
# A step whose output says the subcommand is not built yet (or that this binary does not know its
# arguments yet) is recorded as SKIP, not FAIL.
step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0=$SECONDS rc status left=$((DEADLINE - SECONDS))
  if [ -n "${GPU_CHECK_SKIP:-}" ] && [[ "$name" =~ ^(${GPU_CHECK_SKIP})$ ]]; then
    SUMMARY+=("$(printf '%-18s %-24s %5ss' "$name" "SKIP (GPU_CHECK_SKIP)" 0)"); return
  fi
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$(printf '%-18s %-24s %5ss' "$name" "SKIP (budget spent)" 0)"); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee "$log"
  timeout "$limit" "$@" >>"$log" 2>&1; rc=$?
  tail -n 25 "$log"
  if [ $rc -eq 0 ]; then status=PASS
  elif grep -qE "not built yet|needs the CUDA backend|unrecognized subcommand|unexpected argument" "$log"; then status="SKIP (not built yet)"
  elif [ $rc -eq 124 ]; then status="FAIL (timeout ${limit}s)"
  else status="FAIL (rc $rc)"; fi
  SUMMARY+=("$(printf '%-18s %-24s %5ss' "$name" "$status" $((SECONDS - t0)))")
}

# --- 1. card, driver, binary --------------------------------------------------------------------
step nvidia-smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step binary 30 "$BIN" --version

# --- 2. kernels against the references -------------------------------------------------------------
step compile 90 "$BIN" selftest --compile-only --arch sm_90a --json
step selftest 150 "$BIN" selftest --device cuda --shapes full --skip-steps --json
# compute-sanitizer over the self-test at small shapes: out-of-bounds and misaligned accesses
# (memcheck) and shared-memory hazards (racecheck) on silicon, what the emulated GPU checks in CI.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
SMALL=(selftest --device cuda --shapes reduced --plan tiny --image-size 48 --batch 2 --skip-steps)
if [ -n "$SAN" ]; then
  step sanitize-mem 90 "$SAN" --tool memcheck --error-exitcode 9 "$BIN" "${SMALL[@]}"
  step sanitize-race 90 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 9 "$BIN" "${SMALL[@]}"
else
  SUMMARY+=("$(printf '%-18s %-24s %5ss' sanitize "SKIP (no compute-sanitizer)" 0)")
fi
# Whole training steps (tiny, v4 batch 8) at O2, O0 and O3 against the CPU backend, and the
# device loss scaler (overflow skip, growth).
step whole-steps 150 "$BIN" selftest --device cuda --shapes full --steps-only --json
# NCCL with one rank (no mpirun): communicator init, all-reduces of v4's 42,679,816 gradients in
# 16 MiB buckets and whole, the first sum checked against the known buffer. First through the
# libnccl.so link of gpu-env.sh, then with only the wheel's libnccl.so.2 (found by the engine's
# own discovery, INCEPTION_NCCL_HOME, as a machine without the link would).
if [ -n "$NCCL" ]; then
  step nccl-smoke 45 "$BIN" bench allreduce --transport nccl --buckets 16,whole --iters 3 --json
  step nccl-discovery 45 env LD_LIBRARY_PATH="${LD_LIBRARY_PATH//$NCCL_DIR/}" \
    INCEPTION_NCCL_HOME="$(dirname "$NCCL")" "$BIN" bench allreduce --transport nccl \
    --buckets whole --iters 1
else
  SUMMARY+=("$(printf '%-18s %-24s %5ss' nccl-smoke "SKIP (no libnccl.so.2)" 0)")
fi

# --- 3./4. benchmarks and end-to-end training, then the PyTorch baseline ----------------------------
# O2 with the default loss scale (dynamic, on the device), the step as it was before the
# leaner-step changes (baseline) and with them (lean) in one run, each with its limit at the
# card's measured matrix rate and copy bandwidth; then O3 (fp16 BN as well) on the lean path.
step bench-train 180 "$BIN" bench train --plan v4 --device cuda --batch-size 128 --amp O2 \
  --kernels baseline --kernels lean --json
step bench-train-o3 120 "$BIN" bench train --plan v4 --device cuda --batch-size 128 --amp O3 --json
# A short real training run: O2 with dynamic loss scaling; the loss should fall. By default the
# bundled Fashion-MNIST sample (about 300 steps of batch 16 at 75x75); with GPU_CHECK_PACKS=1 and
# the Fashion-MNIST packs under bench/data, one epoch of the full set instead (longer).
TRAIN_PACK=$(ls bench/data/*train*.pack 2>/dev/null | head -n1)
TEST_PACK=$(ls bench/data/*t10k*.pack bench/data/*test*.pack 2>/dev/null | head -n1)
if [ "${GPU_CHECK_PACKS:-0}" = 1 ] && [ -n "$TRAIN_PACK" ]; then
  DATA_ARGS=(--data "$TRAIN_PACK" ${TEST_PACK:+--eval-data "$TEST_PACK"} --batch-size 64 --image-size 75 --epochs 1)
else
  DATA_ARGS=(--epochs 8)
fi
step train-o2 240 "$BIN" train --device cuda --amp O2 --loss-scale dynamic --log-every 10 \
  "${DATA_ARGS[@]}" --out "$OUT/train-o2"
# The same checkpoint on both backends (interchangeable checkpoints; the figures should agree to
# fp16 accuracy), and predict on the GPU.
CKPT=$(ls -t "$OUT"/train-o2/*.safetensors 2>/dev/null | head -n1)
EVAL_DATA=data/fashion-mnist-mini/val
[ "${GPU_CHECK_PACKS:-0}" = 1 ] && [ -n "$TEST_PACK" ] && EVAL_DATA=$TEST_PACK
if [ -n "$CKPT" ]; then
  step eval-cuda 90 "$BIN" eval --checkpoint "$CKPT" --data "$EVAL_DATA" --device cuda --json
  step eval-cpu 90 "$BIN" eval --checkpoint "$CKPT" --data "$EVAL_DATA" --device cpu --json
  IMG=$(find data/fashion-mnist-mini/val -type f \( -name '*.png' -o -name '*.jpg' \) | head -n1)
  step predict-cuda 60 "$BIN" predict --checkpoint "$CKPT" --device cuda "$IMG"
else
  SUMMARY+=("$(printf '%-18s %-24s %5ss' eval-cuda "SKIP (no checkpoint)" 0)")
fi
if [ -f tools/torch_baseline.py ]; then
  # bench (issue 6): timm inception_v4, AMP fp16 + GradScaler, channels_last, eager then torch.compile.
  step torch-baseline 240 python3 tools/torch_baseline.py --mode both --batch-size 128 --image-size 299 \
    --steps 30 --warmup 10 --json-out "$OUT/torch-baseline.json"
else
  SUMMARY+=("$(printf '%-18s %-24s %5ss' torch-baseline "SKIP (no script)" 0)")
fi

# The data loader on all cores against torchvision + PIL (same transforms, same JPEGs): the two
# stand-in sets of tools/make_loader_sets.py (bench/loader-data-384, made here when missing and
# scikit-image is installed). The engine's line says which JPEG decoder it found.
# 384 images a set, so that batches of 64 make six per epoch.
LOADER_DATA=${LOADER_DATA:-bench/loader-data-384}
if [ ! -d "$LOADER_DATA/progressive-512" ]; then
  python3 tools/make_loader_sets.py --out "$LOADER_DATA" --per-photo 64 >"$OUT/loader-data.log" 2>&1
fi
if [ -d "$LOADER_DATA/progressive-512" ]; then
  CORES=$(nproc)
  for set in progressive-512 baseline-500x375; do
    step "loader-$set" 60 "$BIN" bench loader --data "$LOADER_DATA/$set" --workers "$CORES" \
      --batch-size 64 --batches 40 --json
    step "loader-torch-$set" 60 python3 tools/loader_baseline.py --data "$LOADER_DATA/$set" \
      --workers "$CORES" --batch-size 64 --batches 40 --json
  done
else
  SUMMARY+=("$(printf '%-18s %-24s %5ss' loader "SKIP (no loader data)" 0)")
fi

# bench (issue 6): every conv shape vs cuDNN (cudnnFind per shape and mode), FC vs cuBLAS, bandwidth
# kernels; the --json report goes to bench-kernels.json (--out) so the console keeps the text rows.
# Both kernel paths: the references (cuDNN, cuBLAS, the copy and the matrix rate) run once.
step bench-kernels 240 "$BIN" bench kernels --kernels baseline --kernels lean \
  --out "$OUT/bench-kernels.json"
rm -rf "$NCCL_DIR"
# --- 5. summary last --------------------------------------------------------------------------------
{
  echo
  echo "=== summary (logs in $OUT)"
  printf '%-18s %-24s %6s\n' step status time
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"

# --- bench (issue 6): kernel table and end-to-end ratio engine/PyTorch, appended to the summary ---
TRAIN_JSON="$OUT/bench-train.json"; [ -f "$TRAIN_JSON" ] || TRAIN_JSON="$OUT/bench-train.log"
[ -f "$OUT/bench-kernels.json" ] && python3 tools/bench_table.py --kernels "$OUT/bench-kernels.json" \
  --train "$TRAIN_JSON" --torch "$OUT/torch-baseline.json" >"$OUT/bench-table.md" 2>&1
{
  echo
  echo "=== end to end (batch 128, 299x299; kernel table in $OUT/bench-table.md)"
  python3 tools/bench_table.py --ratio-only --train "$TRAIN_JSON" --torch "$OUT/torch-baseline.json"
} | tee -a "$OUT/summary.txt"
