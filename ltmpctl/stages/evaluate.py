"""evaluate: top-1/top-5, throughput, measured FLOPs and tokens per block of models on the val split."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

import ltmpctl

from ..flops import base_macs, image_macs, vit_shape


def _quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[list[float]]:
    return [[round(float(v), 2) for v in torch.quantile(x, q, dim=0)] for q in qs]


class _Tally:
    """One model's running accuracy, timing and token counts over the evaluation batches."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.correct1 = self.correct5 = self.n = 0
        self.seconds = 0.0
        self.timed = 0  # images whose forward was timed
        self.first = (0.0, 0)  # (seconds, images) of the first forward
        self.macs: list[float] = []
        self.counts: list[torch.Tensor] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = self.model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        # The first forward pays one-time costs (allocator growth, kernel selection for new shapes): it is timed
        # apart and counts only when it is the only one.
        if self.n == 0:
            self.first = (dt, len(labels))
        else:
            self.seconds += dt
            self.timed += len(labels)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.correct1 += int((top5[:, 0] == labels).sum())
        self.correct5 += int((top5 == labels[:, None]).any(-1).sum())
        self.n += len(labels)
        if getattr(self.model, "ltmpctl_compressor", None):
            c = ltmpctl.token_counts(self.model).cpu()  # (B, depth, 2)
            self.counts.append(c)
            self.macs += image_macs(self.model, c)

    def result(self) -> dict:
        s = vit_shape(self.model)
        base = base_macs(s)
        seconds, timed = (self.seconds, self.timed) if self.timed else self.first
        gmacs = (sum(self.macs) / self.n if self.macs else base) / 1e9
        out = {"top1": 100.0 * self.correct1 / self.n, "top5": 100.0 * self.correct5 / self.n, "images": self.n,
               "images_per_s": timed / seconds if seconds else None, "gmacs": gmacs, "flops_ratio": gmacs * 1e9 / base}
        if self.counts:
            allc = torch.cat(self.counts).float()  # (N, depth, 2)
            out["tokens_per_block"] = [round(float(v), 2) for v in allc[:, :, 1].mean(0)]
            out["tokens_attn_per_block"] = [round(float(v), 2) for v in allc[:, :, 0].mean(0)]
            p10, p50, p90 = _quantiles(allc[:, :, 1], (0.1, 0.5, 0.9))
            out["tokens_p10"], out["tokens_p50"], out["tokens_p90"] = p10, p50, p90
        else:
            out["tokens_per_block"] = [float(s.tokens)] * s.depth
        return out


def evaluate(models: dict[str, torch.nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, progress: Optional[Callable[[int], None]] = None) -> dict[str, dict]:
    """Accuracy and cost of each of `models` (compressed or not) over the same `batches`, by label.

    MACs are per image from the tokens it really kept (the analytic formula, which the flops stage cross-checks
    against fvcore), averaged. images/s times only the forward passes, and compares like with like: every batch goes
    through each model in turn (the order alternating from batch to batch), so a busy host slows them alike, and
    each model's first forward (one-time costs) is left out of its timing when there are more.
    """
    tallies = {label: _Tally(m.eval()) for label, m in models.items()}
    order = list(tallies.values())
    with torch.inference_mode():  # no autograd state per op: the same values, fewer host-side costs
        for i, (images, labels) in enumerate(batches):
            images, labels = images.to(device), labels.to(device)
            for tally in (order if i % 2 == 0 else order[::-1]):
                tally.step(images, labels, device)
            if progress is not None:
                progress(len(labels))
    if not order or order[0].n == 0:
        from ..errors import DataError

        raise DataError("no readable validation images", "check the data path and the skipped-image report")
    return {label: t.result() for label, t in tallies.items()}
