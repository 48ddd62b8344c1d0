"""Shared by the benchmark scripts: each compressor calibrated to one FLOPs target on a probe batch."""
from __future__ import annotations

from typing import Any

import torch

from ltmpctl.registry import create
from ltmpctl.stages.calibrate import calibrate

COMPRESSORS = ("ltmp", "tome", "topk")


def methods_at(base: torch.nn.Module, target: float, probe: torch.Tensor, names: tuple[str, ...] = COMPRESSORS
               ) -> list[tuple[str, dict[str, Any], float]]:
    """(compressor, params, measured FLOPs ratio on `probe`) for each of `names` (every built-in one) at `target`."""
    out = []
    for name in names:
        cal = calibrate(base, create(name), {}, target, probe, tolerance=0.01, max_iters=20)
        out.append((name, cal.params, cal.flops_ratio))
    return out


def short(params: dict[str, Any]) -> str:
    """Compact parameter text for a table cell (per-block lists shown as their range)."""
    parts = []
    for k, v in params.items():
        if isinstance(v, list):
            v = f"{min(v):.4g}..{max(v):.4g}" if len(set(v)) > 1 else f"{v[0]:.4g}"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    return " ".join(parts)
