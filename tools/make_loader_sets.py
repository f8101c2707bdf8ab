#!/usr/bin/env python3
"""Writes the two JPEG sets `bench loader` and tools/loader_baseline.py are measured on.

No ImageNet images are available offline, so these stand in for the issue's two ImageNet sets:
real photographs that scikit-image ships (`skimage.data`), cut to random crops and re-encoded
with Pillow:

  OUT/progressive-512/<photo>/<n>.jpg   512x512, progressive, quality 90, 4:2:0
  OUT/baseline-500x375/<photo>/<n>.jpg  500x375, baseline, quality 90, 4:2:0
  OUT/large-1000x750/<photo>/<n>.jpg    1000x750, baseline, quality 90 (only with --large: the
                                        500x375 crops enlarged, for the scaled-decoding figure)

Usage: python3 tools/make_loader_sets.py --out bench/loader-data [--per-photo 8]
Needs scikit-image and Pillow (pip install scikit-image pillow).
"""
import argparse
import os
import random

from PIL import Image
import skimage.data

# Colour photographs stored inside the scikit-image package (no download).
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins_rgb"]


def load(name):
    if name == "coins_rgb":  # a grey photo, kept as a three-channel image
        return Image.fromarray(skimage.data.coins()).convert("RGB")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def random_crop(img, rng, aspect):
    """A crop covering 55-100% of the shorter dimension with the given width/height aspect."""
    w, h = img.size
    scale = rng.uniform(0.55, 1.0)
    cw = min(w, int(round(min(w, h * aspect) * scale)))
    ch = min(h, int(round(cw / aspect)))
    x = rng.randint(0, w - cw)
    y = rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-photo", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--large", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sets = [
        ("progressive-512", (512, 512), dict(progressive=True)),
        ("baseline-500x375", (500, 375), dict(progressive=False)),
    ]
    for set_name, size, opts in sets:
        n = 0
        for photo in PHOTOS:
            img = load(photo)
            folder = os.path.join(args.out, set_name, photo)
            os.makedirs(folder, exist_ok=True)
            for k in range(args.per_photo):
                crop = random_crop(img, rng, size[0] / size[1])
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop = crop.resize(size, Image.BICUBIC)
                crop.save(os.path.join(folder, f"{k:03d}.jpg"), "JPEG", quality=90,
                          subsampling=2, optimize=False, **opts)
                n += 1
        print(f"{set_name}: {n} images of {size[0]}x{size[1]} in {os.path.join(args.out, set_name)}")
    if args.large:
        src = os.path.join(args.out, "baseline-500x375")
        dst = os.path.join(args.out, "large-1000x750")
        for photo in PHOTOS:
            os.makedirs(os.path.join(dst, photo), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(src, photo))):
                img = Image.open(os.path.join(src, photo, name)).resize((1000, 750), Image.BICUBIC)
                img.save(os.path.join(dst, photo, name), "JPEG", quality=90, subsampling=2)
        print(f"large-1000x750: the baseline set enlarged, in {dst}")


if __name__ == "__main__":
    main()
