#!/usr/bin/env bash
# The whole test suite on a fresh machine in one command: installs what the tests need, then
# runs cargo test --release --features mpi. Extra arguments go to cargo test
# (tools/test.sh --test train_loop).
#
# - System packages, through apt-get and only where missing: a C/C++ compiler, python3 with
#   venv, libturbojpeg0 (the loader's libjpeg-turbo decoder), and for distributed training Open
#   MPI (libopenmpi-dev, openmpi-bin: mpirun and the library the `mpi` feature links) with
#   libclang-dev (bindgen of the MPI headers). Rust itself comes from rustup.
# - The suite runs with `--features mpi`, so the distributed tests (tests/dist_mpi.rs) launch the
#   built binary under mpirun (as root: tests pass --allow-run-as-root).
# - Python packages (tools/test-requirements.txt: the NVRTC wheels, onnx, onnxruntime) in a
#   project-local virtual environment, .venv/ (ignored by git; delete it to start over).
# - INCEPTION_REQUIRE_ALL=1: a test group that cannot find its tools fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "tools/test.sh: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }

missing=()
command -v cc >/dev/null && command -v g++ >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# libjpeg-turbo: the loader's faster JPEG decoder (opened at run time; zune-jpeg without it).
ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so\.0' || missing+=(libturbojpeg0)
# Distributed training: Open MPI's launcher and library, libclang for rsmpi's bindgen.
command -v mpirun >/dev/null || missing+=(openmpi-bin)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || missing+=(libopenmpi-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tools/test.sh: installing ${missing[*]} with apt-get" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tools/test-requirements.txt

export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
# The ONNX tests run this python; the engine finds the NVRTC wheels under VIRTUAL_ENV, and
# naming their folder makes that independent of the venv's layout.
export INCEPTION_PYTHON="$VIRTUAL_ENV/bin/python"
NV_CU13="$("$INCEPTION_PYTHON" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
export INCEPTION_CUDA_HOME="$NV_CU13"
export LD_LIBRARY_PATH="$NV_CU13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export INCEPTION_REQUIRE_ALL=1
# A fresh CUBIN cache, so the compile test really runs NVRTC and ptxas on this commit's kernels.
INCEPTION_CACHE_DIR="$(mktemp -d)"
export INCEPTION_CACHE_DIR
trap 'rm -rf "$INCEPTION_CACHE_DIR"' EXIT

# The default build (no MPI), the one the README's first command runs, must stay green too.
cargo check --release --bin inception-engine
cargo test --release --features mpi "$@"
