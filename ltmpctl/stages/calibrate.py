"""calibrate: choose a compressor's parameters so the measured FLOPs fraction hits the target, without training.

The FLOPs fraction is measured: the compressed model runs in eval mode on calibration images, `token_counts`
gives each image's real tokens per block, and the one FLOPs formula (`ltmpctl.flops`, cross-checked against fvcore
by the flops stage) turns them into MACs, averaged over images.

Each compressor exposes one monotone knob ("more reduction"), searched by bisection, or a discrete ladder:
- ltmp: a shared strength s in [0, 1] sets every block's thresholds: merge_threshold = 1 - s * MERGE_SPAN,
  prune_threshold = s * PRUNE_SPAN / N (N = tokens at the first block, so 1/N is the mean importance there).
  The split lets merging (cheaper in accuracy, as ToMe and the LTMP paper found) do most of the work at mild
  targets, with pruning joining in as s grows. Fine-tuning then moves each block's pair on its own.
- tome: ToMe's constant r per block, refined by giving the first j blocks r + 1 (a finer ladder than r alone).
- topk: one keep_rate for every block, bisected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

import ltmpctl
import ltmpctl.registry

from ..flops import measured_ratio, vit_shape

MERGE_SPAN = 0.7  # s = 1 -> merge_threshold 0.3
PRUNE_SPAN = 1.0  # s = 1 -> prune tokens below the first block's mean importance


@dataclass
class Calibration:
    params: dict[str, Any]
    flops_ratio: float
    iterations: int
    knob: str  # what was searched, for the report


def ltmp_params(strength: float, tokens: int) -> dict[str, Any]:
    return {"merge_threshold": round(1.0 - strength * MERGE_SPAN, 6),
            "prune_threshold": round(strength * PRUNE_SPAN / tokens, 8)}


def _bisect(ratio_of: Callable[[float], float], target: float, tol: float, iters: int, lo: float = 0.0,
            hi: float = 1.0) -> tuple[float, float, int]:
    """Knob in [lo, hi] with ratio_of(knob) closest to target; ratio_of is non-increasing in the knob."""
    start = 0.0 if lo <= 0.0 <= hi else lo
    best_k, best_r = start, ratio_of(start)
    n = 1
    while n < iters and abs(best_r - target) > tol:
        mid = (lo + hi) / 2
        r = ratio_of(mid)
        n += 1
        if abs(r - target) < abs(best_r - target):
            best_k, best_r = mid, r
        if r > target:
            lo = mid
        else:
            hi = mid
    return best_k, best_r, n


def calibrate(base: torch.nn.Module, compressor: str, params: dict[str, Any], target: float,
              images: torch.Tensor, tolerance: float, max_iters: int) -> Calibration:
    """Search the compressor's parameters for `target`; other given params (tau, prop_attn, ...) are kept."""
    depth = len(base.blocks)
    tokens = vit_shape(base).tokens
    # Static-count compressors keep the same tokens for every image: a couple of images measure them.
    probe = images if ltmpctl.registry.get(compressor).data_dependent else images[:2]

    def ratio_with(p: dict[str, Any]) -> float:
        return measured_ratio(ltmpctl.apply(copy.deepcopy(base), compressor, **{**params, **p}), probe)

    if compressor == "ltmp":
        k, r, n = _bisect(lambda s: ratio_with(ltmp_params(s, tokens)), target, tolerance, max_iters)
        return Calibration(ltmp_params(k, tokens), r, n, f"shared strength s={k:.4f}")
    if compressor == "topk":
        k, r, n = _bisect(lambda s: ratio_with({"keep_rate": max(1e-3, 1.0 - s)}), target, tolerance, max_iters)
        return Calibration({"keep_rate": round(max(1e-3, 1.0 - k), 6)}, r, n, "keep_rate")
    if compressor == "tome":
        return _calibrate_tome(ratio_with, depth, tokens - base.num_prefix_tokens, target)
    from ..errors import ConfigError

    raise ConfigError(f"calibration does not know compressor {compressor!r}",
                      "disable stages.calibrate and give its params in the recipe")


def shifted(params: dict[str, Any], shift: float, tokens: int) -> dict[str, Any]:
    """LTMP per-block thresholds all moved by one shared amount, in the calibration knob's units, kept in [0, 1]."""
    clamp = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return {**params,
            "merge_threshold": [clamp(m - shift * MERGE_SPAN) for m in params["merge_threshold"]],
            "prune_threshold": [clamp(p + shift * PRUNE_SPAN / tokens) for p in params["prune_threshold"]]}


def recalibrate(base: torch.nn.Module, params: dict[str, Any], target: float, images: torch.Tensor,
                tolerance: float, max_iters: int) -> Calibration:
    """After fine-tuning, move LTMP's learned per-block thresholds together until eval FLOPs hit the target.

    Fine-tuning learns how the thresholds relate across blocks, but its FLOPs term sees train-mode masks (tokens
    kept in the tensor, importance averaged over every row, as the reference trains), and a short fine-tune can
    end away from the target; the inference model is what `--target` promises, so its budget is restored here.
    """
    tokens = vit_shape(base).tokens

    def ratio_of(shift: float) -> float:
        return measured_ratio(ltmpctl.apply(copy.deepcopy(base), "ltmp", **shifted(params, shift, tokens)), images)

    k, r, n = _bisect(ratio_of, target, tolerance, max_iters, lo=-1.0, hi=1.0)
    return Calibration(shifted(params, k, tokens), r, n, f"shared shift {k:+.4f} of the learned thresholds")


def _calibrate_tome(ratio_with: Callable[[dict[str, Any]], float], depth: int, patches: int, target: float
                    ) -> Calibration:
    """Walk r up until the ratio drops below target, then refine with r+1 on the first j blocks."""
    cache: dict[tuple[int, ...], float] = {}

    def ratio(schedule: list[int]) -> float:
        key = tuple(schedule)
        if key not in cache:
            cache[key] = ratio_with({"r": schedule})
        return cache[key]

    r = 0
    while ratio([r + 1] * depth) > target and r + 1 < patches // 2:
        r += 1
    ladder = [[r + 1] * j + [r] * (depth - j) for j in range(depth + 1)]
    best = min(ladder, key=lambda sch: abs(ratio(sch) - target))
    value: Any = best[0] if len(set(best)) == 1 else best
    return Calibration({"r": value}, ratio(best), len(cache), "r per block")
