"""Benchmarks on this machine: torch eager (CPU or CUDA) and onnxruntime, in the shared result schema."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..errors import ConfigError, ModelError
from .stats import compare_rows, make_row, summarize

__all__ = ["set_threads", "random_batch", "bench_torch", "bench_torch_models", "bench_onnx", "bench_onnx_files",
           "bench_pte_files", "compare_rows", "flops_ratio"]

_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def set_threads(n: Optional[int]) -> int:
    """Set torch's intra-op threads (None: leave as is); returns the previous count.

    Also defaults OMP_WAIT_POLICY to passive: with cores shared between jobs, OpenMP's spin-wait made deit_tiny's
    batch-1 forward 20x slower (shared/SETUP.md). The variable only takes effect if set before OpenMP starts its
    threads, which is why the CLI sets it first thing as well.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    previous = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ConfigError(f"--threads must be >= 1, got {n}", "give a positive thread count")
        torch.set_num_threads(n)
    return previous


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[int]:
    """Run with `n` torch threads and restore the caller's count afterwards (it is process-global)."""
    previous = set_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _maxrss_mb() -> float:
    """The process's peak resident set so far, MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _check_counts(batch: int, warmup: int, repeats: int) -> None:
    if batch < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(f"bad benchmark sizes: batch={batch}, warmup={warmup}, repeats={repeats}",
                          "batch and repeats must be >= 1, warmup >= 0")


def _torch_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but torch sees no GPU", "use --device cpu")
    return dev


def _first_forward(run: Callable[[], Any], shape: tuple[int, ...]) -> None:
    """One untimed forward whose failure (wrong input size, bad export) becomes a one-line error, not a traceback."""
    try:
        run()
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"forward on a {shape} input failed: {msg}", "check --input-size and --batch") from None


def _sync(dev: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock would stop before the GPU finished.
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_batch(input_shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """The seeded (batch, *input_shape) normal batch every local benchmark feeds (and flops_ratio measures on)."""
    return torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(seed))


def interleaved(runs: Sequence[Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> list[list[float]]:
    """Seconds per call of each run, `repeats` rounds of one call each in turn.

    Round-robin rather than one model after the other, so that whatever else the machine does meanwhile (another
    job on shared cores, clock changes) falls on every model alike and the speedups between them hold.
    """
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, acc in zip(runs, times):
            t0 = time.perf_counter()
            run()
            sync()
            acc.append(time.perf_counter() - t0)
    return times


def bench_torch(model: torch.nn.Module, input_shape: Sequence[int], batch: int, warmup: int, repeats: int,
                device: str = "cpu", threads: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """Time `repeats` eager forwards of a (batch, *input_shape) random batch after `warmup` untimed ones.

    The model is put in eval mode and moved to `device` in place. Peak memory: see stats.SCHEMA["peak_mem_mb"].
    """
    return bench_torch_models([model], input_shape, batch, warmup, repeats, device, threads, seed)[0]


def _timed_batch(input_shape: Sequence[int], batch: int, seed: int, images: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch a benchmark times: the first `batch` of `images` when given (a data-dependent compressor's cost
    depends on what it sees), else the seeded random batch."""
    if images is None:
        return random_batch(input_shape, batch, seed)
    if len(images) < batch or tuple(images.shape[1:]) != tuple(input_shape):
        raise ConfigError(f"{len(images)} images of shape {tuple(images.shape[1:])} can't make a batch of {batch} "
                          f"{tuple(input_shape)} inputs", "give at least --batch images of the model's input size")
    return images[:batch].contiguous()


def bench_torch_models(models: Sequence[torch.nn.Module], input_shape: Sequence[int], batch: int, warmup: int,
                       repeats: int, device: str = "cpu", threads: Optional[int] = None,
                       seed: int = 0, images: Optional[torch.Tensor] = None) -> list[dict[str, Any]]:
    """`bench_torch` for several models on the same batch, timed interleaved (one row each, in order).

    Each model's first forward and warm-up run on their own first, which is where its peak memory is taken.
    `images`: time on these (the first `batch`) instead of the seeded random batch.
    """
    _check_counts(batch, warmup, repeats)
    dev = _torch_device(device)
    models = [m.eval().to(dev) for m in models]
    x = _timed_batch(input_shape, batch, seed, images).to(dev)  # (B, C, H, W)
    peaks = []
    with _threads(threads) as used, torch.inference_mode():
        for model in models:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            rss0 = _maxrss_mb()
            _first_forward(lambda: model(x), tuple(x.shape))
            for _ in range(warmup):
                model(x)
            _sync(dev)
            peaks.append(torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _maxrss_mb() - rss0)
        times = interleaved([lambda m=m: m(x) for m in models], repeats, lambda: _sync(dev))
    name = f"{dev.type}:{dev.index or 0}" if dev.type == "cuda" else "cpu"
    return [make_row(backend="torch", device=name, batch=batch, threads=used if dev.type == "cpu" else None,
                     warmup=warmup, repeats=repeats, stats=summarize(t, batch), peak_mem_mb=peak,
                     timing="per-iteration") for t, peak in zip(times, peaks)]


def _ort_providers(requested: Optional[Sequence[str]]) -> list[str]:
    """Provider names (short `cpu`/`cuda` accepted) that this onnxruntime build has, in the order asked."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [_ORT_PROVIDERS.get(p.lower(), p) for p in (requested or ["cpu"])]
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ConfigError(f"onnxruntime providers {wanted} are not available here",
                          f"this onnxruntime has: {', '.join(available)}")
    return chosen


def _ort_session(path: Path, threads: Optional[int], providers: list[str]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (one per physical core)
    so.inter_op_num_threads = 1
    # Same reason as OMP_WAIT_POLICY=passive: spinning worker threads starve everything else on shared cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        raise ModelError(f"onnxruntime can't load {str(path)!r}: {str(e).splitlines()[0][:200]}",
                         "check the file is a complete ONNX export (with its .onnx.data next to it)") from None


def _check_batch_dim(session: Any, batch: int, path: Path) -> str:
    """The input's name; refuses a batch the model's fixed batch dimension can't take."""
    inp = session.get_inputs()[0]
    dim0 = inp.shape[0] if inp.shape else None
    if isinstance(dim0, int) and dim0 != batch:
        raise ConfigError(f"{path.name} was exported with a fixed batch of {dim0}, not {batch}",
                          f"bench it with --batch {dim0}, or export with a dynamic batch")
    return inp.name


def bench_onnx(path: str | Path, input_shape: Sequence[int], batch: int, warmup: int, repeats: int,
               threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
               seed: int = 0) -> dict[str, Any]:
    """Time onnxruntime `InferenceSession.run` on a (batch, *input_shape) float32 random batch.

    `providers`: e.g. ["cuda", "cpu"]; the first available one runs it (inputs are host numpy arrays, so CUDA
    timings include the copies). Peak memory: RSS growth from before the session was created (weights included).
    """
    return bench_onnx_files([path], input_shape, batch, warmup, repeats, threads, providers, seed)[0]


def bench_onnx_files(paths: Sequence[str | Path], input_shape: Sequence[int], batch: int, warmup: int, repeats: int,
                     threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                     seed: int = 0, images: Optional[torch.Tensor] = None) -> list[dict[str, Any]]:
    """`bench_onnx` for several files on the same batch, timed interleaved (one row each, in order).
    `images`: time on these (the first `batch`) instead of the seeded random batch."""
    import numpy as np

    _check_counts(batch, warmup, repeats)
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise ConfigError(f"ONNX file {str(p)!r} not found", "check the path")
    chosen = _ort_providers(providers)
    if images is None:
        x = np.random.default_rng(seed).standard_normal((batch, *input_shape), dtype=np.float32)
    else:
        x = _timed_batch(input_shape, batch, seed, images).numpy()
    runs, peaks, devices = [], [], []
    for p in files:
        rss0 = _maxrss_mb()
        session = _ort_session(p, threads, chosen)
        feed = {_check_batch_dim(session, batch, p): x}
        run = lambda s=session, f=feed: s.run(None, f)  # noqa: E731
        _first_forward(run, x.shape)
        for _ in range(warmup):
            run()
        runs.append(run)
        peaks.append(_maxrss_mb() - rss0)
        devices.append("cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")
    times = interleaved(runs, repeats, lambda: None)
    return [make_row(backend="onnxruntime", device=d, batch=batch, threads=threads, warmup=warmup, repeats=repeats,
                     stats=summarize(t, batch), peak_mem_mb=peak, timing="per-iteration")
            for t, peak, d in zip(times, peaks, devices)]


def bench_pte_files(paths: Sequence[str | Path], input_shape: Sequence[int], warmup: int, repeats: int,
                    seed: int = 0, images: Optional[torch.Tensor] = None) -> list[dict[str, Any]]:
    """ExecuTorch `.pte` programs (batch 1, as `ltmpctl export --format mobile` writes them) timed interleaved in
    ExecuTorch's runtime on this machine: the XNNPACK delegate and portable kernels a phone runs, on this CPU."""
    from ..export.mobile import load

    _check_counts(1, warmup, repeats)
    x = _timed_batch(input_shape, 1, seed, images)
    runs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"ExecuTorch program {str(p)!r} not found", "check the path")
        run = load(p)
        _first_forward(lambda r=run: r(x), tuple(x.shape))
        for _ in range(warmup):
            run(x)
        runs.append(lambda r=run: r(x))
    times = interleaved(runs, repeats, lambda: None)
    return [make_row(backend="executorch", device="cpu", batch=1, threads=None, warmup=warmup, repeats=repeats,
                     stats=summarize(t, 1), peak_mem_mb=None, timing="per-iteration") for t in times]


def flops_ratio(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Measured FLOPs fraction of `model` on `images` (the one formula, per image; 1.0 when unpatched)."""
    from ..flops import measured_ratio

    return measured_ratio(model, images)
