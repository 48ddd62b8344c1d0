"""A run's compressed model on a phone: pick the runner (--runner or devices.yaml), use the run's exported program
for it (exporting and verifying it first if the run has none), push the run's own evaluation images as input and
time it with `runners.bench_adb`.

    runner_for_run(cli_runner, cfg) -> (runtime, host path)      which binary, or one line naming what is missing
    runner_for_file(model_file, cli_runner, cfg) -> host path
    ensure_export(run_dir, runtime) -> model file                 <run>/export/model.pte|.onnx|.pt, verified
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from . import devconfig
from .devconfig import RUNTIMES, DevicesConfig

# ltmpctl export's format for each runtime's runner.
EXPORT_FORMATS = {"executorch": "mobile", "onnxruntime": "onnx", "torch": "torchscript"}
README_SECTION = "README: Benchmark on a phone"


def _missing_runner(what: str, cfg: DevicesConfig) -> ConfigError:
    binaries = ", ".join(b for b, _ in RUNTIMES.values())
    return ConfigError(f"no on-device runner for {what} ({binaries}): --runner not given and {cfg.path} "
                       f"{'names none' if cfg.exists else 'does not exist'}",
                       f"build ExecuTorch's executor_runner for Android ({README_SECTION}), then add "
                       f"`{devconfig.EXAMPLE}` to {cfg.path} or pass --runner PATH")


def _check_binary(path: Path, where: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"runner {str(path)!r} ({where}) not found",
                          "point it at the host copy of the binary (ltmpctl pushes it to the phone)")
    return path


def runner_for_run(cli_runner: Optional[Path], cfg: DevicesConfig) -> tuple[str, Path]:
    """(runtime, host binary) for benchmarking a run: --runner (its name says the runtime), else the first runtime
    devices.yaml names, in RUNTIMES order (ExecuTorch first: it is what apps ship)."""
    if cli_runner is not None:
        runtime = devconfig.runtime_of(cli_runner.name)
        if runtime is None:
            names = ", ".join(b for b, _ in RUNTIMES.values())
            raise ConfigError(f"can't tell which runtime --runner {cli_runner.name} is",
                              f"its file name should be one of {names} (or bench an exported file with it)")
        return runtime, _check_binary(cli_runner, "--runner")
    for runtime in RUNTIMES:
        if runtime in cfg.runners:
            return runtime, _check_binary(cfg.runners[runtime], f"devices.yaml runners.{runtime}")
    raise _missing_runner("this run", cfg)


def runner_for_file(model_file: Path, cli_runner: Optional[Path], cfg: DevicesConfig) -> Path:
    """The host binary that runs `model_file` (.pte/.onnx/.pt): --runner, else devices.yaml's for its runtime."""
    if cli_runner is not None:
        return _check_binary(cli_runner, "--runner")
    suffix = model_file.suffix.lower()
    runtime = next((r for r, (_, s) in RUNTIMES.items() if s == suffix), None)
    if runtime is None:
        raise ConfigError(f"don't know how to run {model_file.name} on a device",
                          "give a .pte (executor_runner), .onnx (onnxruntime_perf_test) or .pt (speed_benchmark_torch)")
    if runtime not in cfg.runners:
        binary = RUNTIMES[runtime][0]
        raise ConfigError(f"no {binary} to run {model_file.name}: --runner not given and {cfg.path} names none",
                          f"add `runners: {{{runtime}: /path/to/{binary}}}` to {cfg.path} or pass --runner PATH")
    return _check_binary(cfg.runners[runtime], f"devices.yaml runners.{runtime}")


def _verified(export_dir: Path, fmt: str) -> bool:
    from ..export import VERIFY_FILE

    try:
        records = json.loads((export_dir / VERIFY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return any(isinstance(r, dict) and r.get("format") == fmt and r.get("passed") is True for r in records)


def ensure_export(run_dir: Path, runtime: str, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The run's exported file for `runtime`, exported and verified against eager now if the run has no verified
    one (the same as `ltmpctl export RUN --format F`); an ExportError if it can't be."""
    from ..export import FORMATS, export_run

    fmt = EXPORT_FORMATS[runtime]
    out = run_dir / "export"
    path = out / FORMATS[fmt].filename
    if path.is_file() and _verified(out, fmt):
        return path
    progress(f"{run_dir.name} has no verified {path.name}: exporting it ({fmt}) and checking it against eager")
    export_run(run_dir, [fmt])  # raises ExportError when the format can't take the model or verification fails
    return path


def bench_run_on_device(run_dir: Path, device: str, runner: Path, runtime: str, *, model_file: Path,
                        compressed: Any, info: dict[str, Any], images: Any, batches: list[int], warmup: int,
                        repeats: int, threads: Optional[int], taskset: Optional[str], runner_args: list[str],
                        progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per batch: `model_file` timed on the phone on the first `batch` of `images` (the run's evaluation
    images; None: the runner's own input), with the run's FLOPs ratio and the executed ratio of those images."""
    from ..flops import batch_ratios
    from .runners import bench_adb

    rows = []
    for batch in batches:
        x = None if images is None else images[:batch]
        progress(f"{model_file.name} on {device}, batch {batch}, {'run images' if x is not None else 'runner input'}")
        row = bench_adb(device, model_file, runner, info["input_size"], warmup, repeats, taskset, runner_args,
                        batch=batch, threads=threads, images=x)
        row = {"model": "compressed", "file": str(model_file), **row, "flops_ratio": info.get("flops_ratio")}
        if x is not None:
            row["executed_flops_ratio"] = batch_ratios(compressed, x)[1]
        rows.append(row)
    return rows
