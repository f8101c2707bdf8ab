"""Real-data mode of tools/torch_baseline.py: the engine's recipe in PyTorch on the same images.

Trains timm `inception_v4` on a file written by `inception-engine pack` (or an ImageFolder) with the
recipe the engine uses, so that accuracy after the same number of steps can be compared:
- RMSProp as MindSpore/TF1 and the engine: ms = rho*ms + (1-rho)*g^2 with ms starting at 1,
  mom = momentum*mom + lr*g/sqrt(ms + eps) (eps inside the square root), w -= mom; rho 0.9,
  momentum 0.9, eps 1.0; weight decay 4e-5 added to the gradient of conv and FC weights only;
- warmup (1 epoch) + cosine learning rate per step, lr_max = 0.4 * batch / 1024 unless given;
- cross-entropy with label smoothing 0.1, dropout 0.2 before the classifier;
- random resized crop (area crop_min..1), horizontal flip, colour jitter, ImageNet normalisation;
  evaluation: resize the shorter side, centre crop;
- AMP fp16 autocast with the engine's dynamic loss scaling (start 65536, halve and skip the step on
  overflow, double after 2000 clean steps), channels_last.

Prints one line per epoch and a final JSON line {"tool": "torch_realdata", "epochs": [...]}.
"""

import io
import json
import math
import struct
import sys
import time

PACK_MAGIC = b"IEPACK\0\0"


def read_pack(path):
    """(class names, [(label, offset, length)], raw bytes) of an `inception-engine pack` file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != PACK_MAGIC:
        raise ValueError(f"{path} is not a packed dataset")
    version, num_classes, num_images = struct.unpack_from("<IIQ", data, 8)
    if version != 1:
        raise ValueError(f"{path}: unsupported pack version {version}")
    pos = 24
    classes = []
    for _ in range(num_classes):
        (n,) = struct.unpack_from("<I", data, pos)
        classes.append(data[pos + 4:pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    pos = (pos + 7) // 8 * 8
    entries = [struct.unpack_from("<IIQQ", data, pos + 24 * i) for i in range(num_images)]
    return classes, [(e[0], e[2], e[3]) for e in entries], data


def make_dataset(path, transform, torch):
    from PIL import Image

    if not str(path).endswith(".pack"):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(path), transform=transform)
    classes, entries, data = read_pack(path)

    class Packed(torch.utils.data.Dataset):
        def __init__(self):
            self.classes = classes

        def __len__(self):
            return len(entries)

        def __getitem__(self, i):
            label, off, length = entries[i]
            img = Image.open(io.BytesIO(data[off:off + length])).convert("RGB")
            return transform(img), label

    return Packed()


class EngineRmsProp:
    """The engine's RMSProp (see the module docstring), over a list of parameters."""

    def __init__(self, params, torch, rho=0.9, momentum=0.9, eps=1.0, weight_decay=4e-5):
        self.params = [p for p in params if p.requires_grad]
        self.decay = [p.dim() > 1 for p in self.params]  # conv and FC weights, not BN or biases
        self.ms = [torch.ones_like(p) for p in self.params]
        self.mom = [torch.zeros_like(p) for p in self.params]
        self.rho, self.momentum, self.eps, self.wd = rho, momentum, eps, weight_decay

    def step(self, lr):
        for p, d, ms, mom in zip(self.params, self.decay, self.ms, self.mom):
            if p.grad is None:
                continue
            g = p.grad.float()
            if d:
                g = g + self.wd * p.detach()
            ms.mul_(self.rho).addcmul_(g, g, value=1.0 - self.rho)
            mom.mul_(self.momentum).addcdiv_(g, (ms + self.eps).sqrt(), value=lr)
            p.data.sub_(mom)


def lr_at(step, steps_per_epoch, epochs, lr_max, lr_init=4e-5, lr_end=4e-6, warmup_epochs=1):
    """The engine's warmup + cosine schedule (facts.md section 2)."""
    total, warm = steps_per_epoch * epochs, steps_per_epoch * warmup_epochs
    lr_init, lr_end = min(lr_init, lr_max), min(lr_end, lr_max)
    if step < warm:
        return lr_init + (lr_max - lr_init) / warm * (step + 1)
    return lr_end + (lr_max - lr_end) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def evaluate(model, loader, torch, device):
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        for x, y in loader:
            x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            top1 += int((top[:, 0] == y).sum())
            top5 += int((top == y[:, None]).any(dim=1).sum())
            n += y.numel()
    model.train()
    return {"loss": loss_sum / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "images": n}


def run(args):
    import timm
    import torch
    from torchvision import transforms as T

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    size = args.image_size
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    jitter = [T.ColorJitter(args.jitter, args.jitter, args.jitter)] if args.jitter > 0 else []
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(args.crop_min, 1.0)), T.RandomHorizontalFlip(),
                          *jitter, T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    train_set = make_dataset(args.data, train_tf, torch)
    eval_set = make_dataset(args.eval_data, eval_tf, torch) if args.eval_data else None
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **loader_kw)
    eval_loader = torch.utils.data.DataLoader(eval_set, shuffle=False, **loader_kw) if eval_set else None

    classes = len(train_set.classes)
    model = timm.create_model("inception_v4", pretrained=False, num_classes=classes, drop_rate=0.2)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = EngineRmsProp(model.parameters(), torch)
    scaler = LossScaler(65536.0 if device.type == "cuda" else 1.0)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    steps_per_epoch = len(train_loader)
    lr_max = args.lr_max if args.lr_max else 0.4 * args.batch_size / 1024
    log, step = [], 0
    for epoch in range(1, args.epochs + 1):
        t0, loss_sum = time.time(), 0.0
        for x, y in train_loader:
            x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            lr = lr_at(step, steps_per_epoch, args.epochs, lr_max)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x), y)
            for p in model.parameters():
                p.grad = None
            (loss * scaler.scale).backward()
            grads = [p.grad for p in opt.params if p.grad is not None]
            overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
            if not overflow:
                for g in grads:
                    g.div_(scaler.scale)
                opt.step(lr)
            scaler.update(overflow)
            loss_sum += float(loss.detach())
            step += 1
        secs = time.time() - t0
        row = {"epoch": epoch, "step": step, "mean_loss": loss_sum / max(steps_per_epoch, 1),
               "images_per_sec": steps_per_epoch * args.batch_size / secs, "epoch_s": secs}
        if eval_loader is not None:
            row["eval"] = evaluate(model, eval_loader, torch, device)
        log.append(row)
        ev = row.get("eval", {})
        print(f"epoch {epoch}: mean loss {row['mean_loss']:.4f}, {row['images_per_sec']:.0f} img/s"
              + (f", eval top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f}" if ev else ""), flush=True)
    out = {"tool": "torch_realdata", "device": str(device), "data": str(args.data), "batch_size": args.batch_size,
           "image_size": size, "lr_max": lr_max, "steps_per_epoch": steps_per_epoch, "epochs": log}
    print(json.dumps(out))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(json.dumps(out) + "\n")
    return 0


class LossScaler:
    """The engine's dynamic loss scaler (src/optim/loss_scale.rs)."""

    def __init__(self, scale, growth_interval=2000):
        self.scale, self.growth_interval, self.clean = scale, growth_interval, 0

    def update(self, overflow):
        if overflow:
            self.scale, self.clean = max(self.scale / 2, 1.0), 0
            return
        self.clean += 1
        if self.clean >= self.growth_interval:
            self.scale, self.clean = self.scale * 2, 0


if __name__ == "__main__":
    sys.exit("run through tools/torch_baseline.py --data ...")
