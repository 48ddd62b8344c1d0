"""calibrate: choose a compressor's parameters so the measured FLOPs fraction hits the target, without training.

The FLOPs fraction is measured: the compressed model runs in eval mode on calibration images, `token_counts`
gives each image's real tokens per block, and the one FLOPs formula (`ltmpctl.flops`, cross-checked against fvcore
by the flops stage) turns them into MACs, averaged over images.

What is searched is the compressor's own `Knob` (`Compressor.calibration_knob` before training, by `calibrate`;
`Compressor.refit_knob` after it, by the pipeline through `fit`): one monotone dial, bisected (over whole values
for an integer knob).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import ltmpctl

from ..compressor import Compressor, Knob
from ..errors import ConfigError
from ..flops import measured_ratio


@dataclass
class Calibration:
    params: dict[str, Any]
    flops_ratio: float
    iterations: int
    knob: str  # what was searched, for the report


def search(ratio_of: Callable[[float], float], knob: Knob, target: float, tol: float, iters: int
           ) -> tuple[float, float, int]:
    """(k, ratio, evaluations): the knob setting whose ratio is closest to target among those bisection visits;
    ratio_of is non-increasing in k. Stops within `tol`, after `iters` evaluations, or (integer knobs) when the
    crossing lies between two neighbours, both of which are then measured."""
    seen: dict[float, float] = {}

    def at(k: float) -> float:
        if k not in seen:
            seen[k] = ratio_of(k)
        return seen[k]

    closest = lambda: min(seen, key=lambda k: abs(seen[k] - target))  # noqa: E731
    lo, hi = knob.lo, knob.hi
    at(0.0 if lo <= 0.0 <= hi else lo)  # reduce nothing first: a target of 1 needs no search
    while len(seen) < iters and abs(seen[closest()] - target) > tol:
        if knob.integer and hi - lo <= 1:
            at(lo), at(hi)  # the crossing lies between them: measure both, keep the closer
            break
        mid = (lo + hi) // 2 if knob.integer else (lo + hi) / 2
        if at(mid) > target:
            lo = mid
        else:
            hi = mid
    best = closest()
    return best, seen[best], len(seen)


def fit(model: torch.nn.Module, comp: Compressor, params: dict[str, Any], knob: Optional[Knob], target: float,
        images: torch.Tensor, tolerance: float, max_iters: int) -> Calibration:
    """Search `knob` so that `model` compressed with {params, knob's params} keeps `target` of the FLOPs.

    `model` is what the parameters will run on: the uncompressed model before fine-tuning, the fine-tuned model
    (weights included, when they were trained) after it.
    """
    if knob is None:
        raise ConfigError(f"compressor {comp.name!r} has no calibration knob",
                          "disable stages.calibrate and give its params in the recipe")
    # Static-count compressors keep the same tokens for every image: a couple of images measure them.
    probe = images if comp.data_dependent else images[:2]

    def ratio_of(k: float) -> float:
        compressed = ltmpctl.apply(copy.deepcopy(model), comp.name, **{**params, **knob.params_at(k)})
        return measured_ratio(compressed, probe)

    k, r, n = search(ratio_of, knob, target, tolerance, max_iters)
    return Calibration(knob.params_at(k), r, n, knob.describe(k))


def calibrate(base: torch.nn.Module, comp: Compressor, params: dict[str, Any], target: float,
              images: torch.Tensor, tolerance: float, max_iters: int) -> Calibration:
    """Fit the compressor's calibration knob on the uncompressed `base`; other given params are kept."""
    return fit(base, comp, params, comp.calibration_knob(base, params), target, images, tolerance, max_iters)

