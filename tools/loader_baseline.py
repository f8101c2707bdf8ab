#!/usr/bin/env python3
"""The reference for `inception-engine bench loader`: torchvision + PIL, the same training transforms.

RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)), RandomHorizontalFlip, ColorJitter(0.4,
0.4, 0.4), ToTensor, Normalize(ImageNet), batched by a DataLoader over an ImageFolder (PIL decodes).
Like the engine's bench it times --batches batches after one untimed batch and starts a new epoch
when the data set runs out. --workers 0 decodes in the main process (the one-core figure); N > 0
uses N worker processes.

Usage: python3 tools/loader_baseline.py --data DIR [--image-size 299] [--batch-size 32]
       [--batches 20] [--workers 0] [--json]
Needs torch, torchvision and Pillow.
"""
import argparse
import json
import time

import torch
from torchvision import datasets, transforms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                     antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(args.data, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers,
                                     persistent_workers=args.workers > 0)

    def batches():
        while True:
            yield from dl

    it = batches()
    next(it)  # untimed
    images, start = 0, time.perf_counter()
    for _ in range(args.batches):
        x, _ = next(it)
        images += x.shape[0]
    secs = time.perf_counter() - start
    ips = images / secs
    print(f"torchvision+PIL loader: {ips:.0f} images/s at {args.image_size}x{args.image_size} with "
          f"{args.workers} workers ({images} images in {secs:.2f} s)")
    if args.json:
        print(json.dumps({"images_per_sec": ips, "images": images, "seconds": secs,
                          "workers": args.workers, "image_size": args.image_size,
                          "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
