"""Shared by the benchmark scripts: each compressor calibrated to one FLOPs target on a probe batch, and the fresh
process they calibrate and export in."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any, Callable, TypeVar

import torch

from ltmpctl.registry import create
from ltmpctl.stages.calibrate import calibrate

COMPRESSORS = ("ltmp", "tome", "topk")
T = TypeVar("T")


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


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a newly spawned Python process; its (picklable) result.

    The benchmarks calibrate and export there, so that the process which times has done nothing but build its
    models, as a deployed one has. On a 2-core Xeon VM, ltmp's deit_tiny batch-1 latency ratio (one thread) was 0.84
    in a fresh process, 0.89 after a calibration and 0.88-0.90 after an ONNX export in the same process (the demo at
    batch 64 on two threads: 0.97 against 1.03 after a calibration); the base moved much less. `gc.freeze` or
    `malloc_trim` after the calibration got part of it back, after the export neither did.
    """
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
