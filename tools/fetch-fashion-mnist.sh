#!/usr/bin/env bash
# Fetch Fashion-MNIST from Debian's dataset-fashion-mnist package and convert it.
#
#   tools/fetch-fashion-mnist.sh OUT_DIR         mini ImageFolder: 50 train + 20 val images per
#                                                class (what data/fashion-mnist-mini holds)
#   tools/fetch-fashion-mnist.sh --full OUT_DIR  OUT_DIR/train.pack (60,000 images) and
#                                                OUT_DIR/val.pack (10,000), via `inception-engine pack`
#
# Needs apt-get (no root: `apt-get download` only fetches the .deb), dpkg-deb and python3.
# The packer is $INCEPTION_ENGINE if set, else `cargo run --release`.
set -euo pipefail

full=0
if [[ "${1:-}" == "--full" ]]; then full=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--full] OUT_DIR" >&2
    exit 2
fi
out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get download dataset-fashion-mnist)
deb="$(ls "$work"/dataset-fashion-mnist_*.deb)"
echo "using $(basename "$deb")"
dpkg-deb -x "$deb" "$work/root"
idx="$work/root/usr/share/datasets/fashion-mnist"

mkdir -p "$out"
if [[ $full -eq 0 ]]; then
    python3 "$here/fashion_mnist_to_png.py" "$idx" "$out" --per-class-train 50 --per-class-val 20
    exit 0
fi

python3 "$here/fashion_mnist_to_png.py" "$idx" "$work/png"
if [[ -n "${INCEPTION_ENGINE:-}" ]]; then
    pack=("$INCEPTION_ENGINE" pack)
else
    pack=(cargo run --release --quiet --manifest-path "$here/../Cargo.toml" -- pack)
fi
"${pack[@]}" "$work/png/train" --out "$out/train.pack"
"${pack[@]}" "$work/png/val" --out "$out/val.pack"
