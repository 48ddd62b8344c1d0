"""Latency statistics and the one result schema shared by the local and the on-device (adb) benchmarks."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

# Every benchmark row carries these keys (extra keys such as "fingerprint" or "speedup" may follow).
SCHEMA: dict[str, str] = {
    "backend": "what ran the model: torch, onnxruntime, executorch, onnxruntime_perf_test, speed_benchmark_torch",
    "device": "where it ran: cpu / cuda:0 on this host, or the Android device's model and serial",
    "batch": "images per forward",
    "threads": "intra-op threads (None: the runtime's default)",
    "warmup": "untimed forwards before the timed ones",
    "repeats": "timed forwards",
    "mean_ms": "mean latency of one forward (one batch), milliseconds",
    "p50_ms": "median latency; None when the runner reports only a mean",
    "p90_ms": "90th percentile latency; None when unknown",
    "p99_ms": "99th percentile latency; None when unknown",
    "std_ms": "standard deviation of the per-forward latencies; None when the runner gives no per-forward times",
    "images_per_s": "batch / median latency (batch / mean latency when the median is unknown)",
    "peak_mem_mb": ("peak memory, MiB. torch on GPU: torch.cuda.max_memory_allocated over warmup + timed runs. "
                    "torch/onnxruntime on CPU: growth of the process's peak RSS (ru_maxrss) during the benchmark, so "
                    "0 when an earlier peak was higher. onnxruntime_perf_test: its whole-process peak working set. "
                    "None when the runner reports nothing"),
    "timing": "per-iteration (every forward timed), percentiles (runner's own percentiles) or mean (a mean only)",
}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), `q` in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_s: Sequence[float], batch: int) -> dict[str, Any]:
    """Per-forward times in seconds -> mean/p50/p90/p99/std in ms, images/s from the median, and n."""
    if not times_s:
        raise ValueError("no timings to summarize")
    ms = sorted(t * 1000.0 for t in times_s)
    p50 = percentile(ms, 50)
    return {
        "mean_ms": statistics.fmean(ms),
        "p50_ms": p50,
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "images_per_s": batch * 1000.0 / p50 if p50 > 0 else math.inf,
        "n": len(ms),
    }


def summarize_mean(mean_ms: float, batch: int, p50_ms: Optional[float] = None, p90_ms: Optional[float] = None,
                   p99_ms: Optional[float] = None) -> dict[str, Any]:
    """Stats for runners that print only aggregates: whatever is known, None for the rest."""
    ref = p50_ms if p50_ms is not None else mean_ms
    return {
        "mean_ms": mean_ms, "p50_ms": p50_ms, "p90_ms": p90_ms, "p99_ms": p99_ms, "std_ms": None,
        "images_per_s": batch * 1000.0 / ref if ref > 0 else math.inf,
    }


def make_row(*, backend: str, device: str, batch: int, threads: Optional[int], warmup: int, repeats: int,
             stats: dict[str, Any], peak_mem_mb: Optional[float], timing: str) -> dict[str, Any]:
    """One result row in SCHEMA order."""
    row = {"backend": backend, "device": device, "batch": batch, "threads": threads, "warmup": warmup,
           "repeats": repeats}
    for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "images_per_s"):
        row[key] = stats.get(key)
    row["peak_mem_mb"] = peak_mem_mb
    row["timing"] = timing
    return row


FLOPS_LATENCY_FLAG = "FLOPs dropped, latency did not"


def compare_rows(base: dict[str, Any], compressed: dict[str, Any], flops_ratio: Optional[float]) -> dict[str, Any]:
    """The compressed row plus `speedup` (base p50 / compressed p50), `latency_ratio` (its inverse),
    `flops_ratio`, and a `flag` when FLOPs fell by more than 5% but latency did not."""
    b = base.get("p50_ms") or base["mean_ms"]  # runners without a median compare means
    c = compressed.get("p50_ms") or compressed["mean_ms"]
    latency_ratio = c / b if b > 0 else math.inf
    flag = None
    if flops_ratio is not None and flops_ratio < 0.95 and latency_ratio > 0.95:
        flag = FLOPS_LATENCY_FLAG
    return {**compressed, "speedup": b / c if c > 0 else math.inf, "latency_ratio": latency_ratio,
            "flops_ratio": flops_ratio, "flag": flag}
