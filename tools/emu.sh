#!/usr/bin/env bash
# Runs inception-engine on the emulated GPU (emu/: the real kernels/*.cu compiled for the CPU behind
# an emulated CUDA driver), building both first if needed:
#   tools/emu.sh selftest --device cuda --json
#   tools/emu.sh train --device cuda --plan tiny --image-size 32 --epochs 1
# Emulator settings (environment): INCEPTION_EMU_SCHEDULE=rr|reverse|random[:SEED] (the order in
# which a block's threads run), INCEPTION_EMU_RACECHECK=1 (shared-memory race checker),
# INCEPTION_EMU_THREADS=N (OS threads), INCEPTION_EMU_MEMORY_MB (emulated device memory).
# NVRTC is still needed (the CUBINs give the kernel names and resources): see .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin inception-engine -p inception-engine
cargo build --release --quiet -p inception-emu
driver="$(target/release/inception-emu path)"
INCEPTION_CUDA_DRIVER="$driver" exec target/release/inception-engine "$@"
