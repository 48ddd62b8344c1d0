"""evaluate: top-1/top-5, throughput, measured FLOPs and tokens per block of a model on the val split."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

import ltmpctl

from ..flops import base_macs, image_macs, vit_shape


def _quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[list[float]]:
    return [[round(float(v), 2) for v in torch.quantile(x, q, dim=0)] for q in qs]


def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             progress: Optional[Callable[[int], None]] = None) -> dict:
    """Accuracy and cost of `model` (compressed or not) over `batches`.

    MACs are per image from the tokens it really kept (the analytic formula, which the flops stage cross-checks
    against fvcore), averaged; images/s times only the forward passes.
    """
    s = vit_shape(model)
    name = getattr(model, "ltmpctl_compressor", None)
    base = base_macs(s)
    correct1 = correct5 = n = 0
    seconds = 0.0
    macs: list[float] = []
    counts: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(-1).sum())
            n += len(labels)
            if name:
                c = ltmpctl.token_counts(model).cpu()  # (B, depth, 2)
                counts.append(c)
                macs += image_macs(model, c)
            if progress is not None:
                progress(len(labels))
    if n == 0:
        from ..errors import DataError

        raise DataError("no readable validation images", "check the data path and the skipped-image report")
    gmacs = (sum(macs) / n if macs else base) / 1e9
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "images": n,
           "images_per_s": n / seconds if seconds else None, "gmacs": gmacs, "flops_ratio": gmacs * 1e9 / base}
    if counts:
        allc = torch.cat(counts).float()  # (N, depth, 2)
        out["tokens_per_block"] = [round(float(v), 2) for v in allc[:, :, 1].mean(0)]
        out["tokens_attn_per_block"] = [round(float(v), 2) for v in allc[:, :, 0].mean(0)]
        p10, p50, p90 = _quantiles(allc[:, :, 1], (0.1, 0.5, 0.9))
        out["tokens_p10"], out["tokens_p50"], out["tokens_p90"] = p10, p50, p90
    else:
        out["tokens_per_block"] = [float(s.tokens)] * s.depth
    return out
