#!/usr/bin/env bash
# Issue 7's run on the GPU machine: InceptionV4 at 299x299 learns Fashion-MNIST.
#
# Prepare on a CPU machine (the GPU machine has no network and no Rust):
#   cargo build --release
#   tools/fetch-fashion-mnist.sh --full bench/data/fashion-mnist     # train.pack, val.pack (36 MiB)
# then run from the repository root on the GPU machine, carrying target/release/inception-engine and
# bench/data/fashion-mnist:
#   OUT=... tools/gpu-convergence.sh [engine|torch] [EPOCHS]
# `engine` (the default) measures the loader alone (images/s on all cores at 299x299), then trains
# with O2 and dynamic loss scaling, batch 128, the RMSProp recipe with lr scaled to the batch,
# evaluating on the 10,000 test images after every epoch. `torch` runs the same recipe in PyTorch
# (tools/torch_baseline.py --data) for the accuracy comparison after the same number of steps; each
# fits one call of the device tool. Logs (log.txt, metrics.jsonl, eval lines) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
BIN="${BIN:-target/release/inception-engine}"
DATA="${DATA:-bench/data/fashion-mnist}"
MODE="${1:-engine}"
EPOCHS="${2:-6}"
source tools/gpu-env.sh

if [ ! -f "$DATA/train.pack" ] || [ ! -f "$DATA/val.pack" ]; then
  echo "missing $DATA/train.pack or val.pack: run tools/fetch-fashion-mnist.sh --full $DATA first" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
if [ "$MODE" = torch ]; then
  timeout 540 python3 tools/torch_baseline.py --data "$DATA/train.pack" --eval-data "$DATA/val.pack" \
    --epochs "$EPOCHS" --batch-size 128 --image-size 299 --crop-min 0.35 --jitter 0 --workers 16 \
    --json-out "$OUT/torch-realdata.json" 2>&1 | tee "$OUT/torch-realdata.log"
  exit "${PIPESTATUS[0]}"
fi
timeout 120 "$BIN" bench loader --data "$DATA/train.pack" --image-size 299 --batch-size 128 --batches 100 --json \
  2>&1 | tee "$OUT/loader.log"
# Fashion-MNIST objects are centred and grey: milder crops than ImageNet's 0.08, no colour jitter.
timeout 420 "$BIN" train --plan v4 --device cuda --amp O2 --loss-scale dynamic \
  --data "$DATA/train.pack" --eval-data "$DATA/val.pack" --out "$OUT/run" \
  --epochs "$EPOCHS" --batch-size 128 --image-size 299 --crop-min 0.35 --jitter 0 \
  --save-every-epochs "$EPOCHS" --log-every 20 --workers 16 2>&1 | tee "$OUT/train.log"
cp "$OUT/run/log.txt" "$OUT/run/metrics.jsonl" "$OUT/" 2>/dev/null
grep -E "metric:|images/s" "$OUT/train.log" | tail -n 5
