#!/usr/bin/env python3
"""Convert Fashion-MNIST IDX files to an ImageFolder tree of 28x28 grey PNG files.

Usage: fashion_mnist_to_png.py IDX_DIR OUT_DIR [--per-class-train N] [--per-class-val M]

Writes OUT_DIR/train/<class>/<index>.png from train-*-idx*-ubyte.gz and OUT_DIR/val/<class>/...
from t10k-*. With per-class limits, the first N (M) images of each class in file order are taken;
without them, every image is written. Only the standard library is used (gzip, zlib, struct).
"""
import argparse
import gzip
import os
import struct
import zlib

CLASSES = [
    "0-tshirt_top", "1-trouser", "2-pullover", "3-dress", "4-coat",
    "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-ankle_boot",
]


def read_idx(path):
    """Returns (dims, payload bytes) of a gzipped IDX file of unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def png_chunk(kind, body):
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def grey_png(width, height, pixels):
    """An 8-bit greyscale PNG; every row uses filter type 0 (none)."""
    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))


def convert(images_path, labels_path, out_dir, per_class):
    """Writes images of one split; returns {class: [indices written]}."""
    (n, h, w), pixels = read_idx(images_path)
    (n_labels,), labels = read_idx(labels_path)
    if n != n_labels:
        raise ValueError(f"{images_path}: {n} images but {n_labels} labels")
    taken = {c: [] for c in range(len(CLASSES))}
    for i in range(n):
        label = labels[i]
        if per_class is not None and len(taken[label]) >= per_class:
            continue
        class_dir = os.path.join(out_dir, CLASSES[label])
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"{i:05d}.png"), "wb") as f:
            f.write(grey_png(w, h, pixels[i * h * w:(i + 1) * h * w]))
        taken[label].append(i)
    return taken


def describe(taken):
    return ", ".join(f"{CLASSES[c]}: {len(ix)} (indices {ix[0]}..{ix[-1]})"
                     for c, ix in taken.items() if ix)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("idx_dir")
    p.add_argument("out_dir")
    p.add_argument("--per-class-train", type=int)
    p.add_argument("--per-class-val", type=int)
    a = p.parse_args()
    for split, prefix, per_class in (("train", "train", a.per_class_train),
                                     ("val", "t10k", a.per_class_val)):
        taken = convert(os.path.join(a.idx_dir, f"{prefix}-images-idx3-ubyte.gz"),
                        os.path.join(a.idx_dir, f"{prefix}-labels-idx1-ubyte.gz"),
                        os.path.join(a.out_dir, split), per_class)
        print(f"{split} (from {prefix}): {sum(map(len, taken.values()))} images; {describe(taken)}")


if __name__ == "__main__":
    main()
