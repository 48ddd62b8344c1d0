"""Train the demo ViT on the Fashion-MNIST train split; reproduces `ltmpctl/demo/demo_vit.safetensors`.

    python -m ltmpctl.demo.train --epochs 8 --out ltmpctl/demo/demo_vit.safetensors

Resumable: a checkpoint is written after every epoch to `<out>.ckpt` and picked up on restart.
AdamW, cosine schedule with warm-up, label smoothing 0.1, random 2-px shifts + horizontal flips (done on the whole
batch at once: per-sample Python augmentation would cost more than the model on 2 cores).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (zero padding) and random horizontal flip; x (B, 1, 28, 28) normalised."""
    b = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), value=float(x.min()))  # pad with the background value
    dy = torch.randint(0, 5, (b,), generator=gen)
    dx = torch.randint(0, 5, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]  # (B, 28, 1)
    cols = (dx[:, None] + ar)[:, None, :]  # (B, 1, 28)
    out = pad[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), bs):
            correct += (model(images[i:i + bs]).argmax(-1) == labels[i:i + bs]).sum().item()
    return correct / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="write the checkpoint after this epoch of the --epochs schedule (resumes from <out>.ckpt)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("demo_vit.safetensors"))
    args = p.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import timm
    from safetensors.torch import save_file

    from ..data.fashion_mnist import MEAN, STD, load_split
    from . import MODEL_KWARGS

    def prep(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, lbls = load_split(split)
        return ((imgs.float() / 255 - MEAN[0]) / STD[0]).unsqueeze(1), lbls

    x_train, y_train = prep("train")
    x_test, y_test = prep("test")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_KWARGS)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(y_train) // args.batch_size
    total, warm = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    ckpt_path = args.out.with_suffix(".ckpt")
    start_epoch = 0
    gen = torch.Generator().manual_seed(args.seed)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start_epoch = ck["epoch"]
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", flush=True)

    last = args.epochs if args.stop_after_epoch is None else min(args.epochs, args.stop_after_epoch)
    for epoch in range(start_epoch, last):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(y_train), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(x_train[idx], gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item()
        acc = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / steps_per_epoch:.4f} "
              f"test top-1 {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch + 1}, tmp)
        os.replace(tmp, ckpt_path)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = args.out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"description": "ViT self-trained on Fashion-MNIST by ltmpctl.demo.train",
                                         "test_top1": f"{evaluate(model, x_test, y_test):.4f}",
                                         "epochs": f"{max(start_epoch, last)} of a {args.epochs}-epoch schedule",
                                         "seed": str(args.seed)})
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
