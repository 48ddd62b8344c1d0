"""On-device benchmarks over adb: command lines and output parsers of three runners the user supplies, and
`bench_adb`, which pushes runner + model (+ input files) to the phone, runs, parses, fingerprints and cleans up.

Inputs: given images (a run's preprocessed evaluation images), each runner reads them its own way, so a
data-dependent program (ltmp) does the work it does on real pictures rather than on constant input:
executor_runner `--inputs=input_0.bin` (raw float32 of the program's input tensor), onnxruntime_perf_test the
`test_data_set_0/input_0.pb` TensorProto beside the model (instead of -I), speed_benchmark_torch a copy of the .pt
with the images bundled (`--use_bundled_input=0`). Without images each runner makes its own input, said in the row.

Runner            model   what we parse (stdout and stderr together)
executor_runner   .pte    ExecuTorch's ET_LOG lines `Iteration 3 of 25: 41.2 ms` (per run, newer runners) or
                          `Model executed successfully 25 time(s) in 1030.5 ms.` (total; older runners print only it)
onnxruntime_perf_test .onnx  `Average inference time cost[ total]: 41.2 ms`, `P50 Latency: 0.0412 s` (also P90,
                          P99) and `Peak working set size: N bytes`; it prints no per-run times
speed_benchmark_torch .pt  `PyTorchObserver {"type": "NET", "unit": "us", "metric": "latency", "value": "41233"}` per
                          run (we pass --report_pep=true), else `Main run finished. Microseconds per iter: 41233.1`
"""
from __future__ import annotations

import json
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

from ..errors import ConfigError, DeviceError
from .adb import Adb, list_devices
from .devices import Device, default_query, resolve
from .stats import make_row, summarize, summarize_mean

REMOTE_ROOT = "/data/local/tmp/ltmpctl"
NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
RUN_TIMEOUT_S = 1800.0
RUN_IMAGES = "run images"  # the `input` of rows timed on the images the caller passed


class RunnerOutputError(DeviceError):
    """The runner ran but printed nothing we recognise."""


@dataclass
class Timing:
    stats: dict[str, Any]  # stats.summarize / summarize_mean output
    timing: str  # per-iteration, percentiles or mean
    warmup: int  # untimed runs that really happened
    repeats: int  # timed runs the numbers cover
    peak_mem_mb: Optional[float] = None


def _unparseable(runner: str, output: str) -> RunnerOutputError:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()][:3]
    quoted = " | ".join(lines)[:300] or "no output"
    return RunnerOutputError(f"could not parse {runner}'s output: {quoted}",
                             "run the runner by hand (`adb shell`) to see what it prints; is it the right binary?")


@dataclass
class Inputs:
    """Input files for one runner: what to push (host file -> path relative to the work dir), the runner
    arguments naming them, and the row's `input`."""

    label: str  # RUN_IMAGES, or what the runner feeds itself
    files: list[tuple[Path, str]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # remote paths filled in: `{work}` stands for the work dir
    model: Optional[Path] = None  # a model file to push instead of the given one (images bundled into it)


class Runner:
    """One on-device runner: how to call it, how it reads input files, and how to read its timings."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    own_input: ClassVar[str] = ""  # what it feeds the model without input files

    def argv(self, runner: str, model: str, *, input_shape: Sequence[int], batch: int, warmup: int,
             iterations: int, threads: Optional[int], extra: Sequence[str], inputs: Sequence[str] = ()) -> list[str]:
        raise NotImplementedError

    def inputs(self, images: Any, model: Path, tmp: Path) -> Inputs:
        """Files that make the runner time `images` (B, C, H, W float32 numpy); written under `tmp`."""
        raise NotImplementedError

    def parse(self, output: str, *, batch: int, warmup: int, iterations: int) -> Timing:
        raise NotImplementedError


class ExecuTorchRunner(Runner):
    """ExecuTorch's `executor_runner`. It has no warmup flag, so it runs warmup + iterations times and the first
    `warmup` per-run times are dropped; an older runner that prints only the total gives a mean over all runs."""

    name = "executorch"
    suffix = ".pte"
    own_input = "ones"  # executor_runner fills every input tensor with ones

    def argv(self, runner: str, model: str, *, input_shape: Sequence[int], batch: int, warmup: int,
             iterations: int, threads: Optional[int], extra: Sequence[str], inputs: Sequence[str] = ()) -> list[str]:
        args = [runner, f"--model_path={model}", f"--num_executions={warmup + iterations}"]
        if inputs:
            args.append(f"--inputs={','.join(inputs)}")
        if threads is not None:
            args.append(f"--cpu_threads={threads}")  # runners built with a threadpool (XNNPACK) take it
        return [*args, *extra]

    def inputs(self, images: Any, model: Path, tmp: Path) -> Inputs:
        if images.shape[0] != 1:
            raise ConfigError(f"the ExecuTorch program takes one image, not a batch of {images.shape[0]}",
                              "bench it with --batch 1")
        # executor_runner copies each file's bytes into the input tensor as they are: raw float32, (1, C, H, W).
        local = tmp / "input_0.bin"
        local.write_bytes(images.astype("<f4", copy=False).tobytes(order="C"))
        return Inputs(RUN_IMAGES, [(local, local.name)], [f"{{work}}/{local.name}"])

    def parse(self, output: str, *, batch: int, warmup: int, iterations: int) -> Timing:
        per_run = [float(ms) / 1000.0 for ms in re.findall(rf"Iteration \d+ of \d+: {NUM} ms", output)]
        if per_run:
            timed = per_run[warmup:] or per_run
            return Timing(summarize(timed, batch), "per-iteration", len(per_run) - len(timed), len(timed))
        total = re.search(rf"Model executed successfully (\d+) time\(s\) in {NUM} ms", output)
        if total is None:
            raise _unparseable("executor_runner", output)
        n, total_ms = int(total.group(1)), float(total.group(2))
        return Timing(summarize_mean(total_ms / max(n, 1), batch), "mean", 0, n)


class OrtPerfTestRunner(Runner):
    """onnxruntime's `onnxruntime_perf_test` with generated inputs (-I), a fixed number of runs (-m times -r N).
    It does one untimed first inference itself; there is no flag for more."""

    name = "onnxruntime_perf_test"
    suffix = ".onnx"
    own_input = "runner-generated"  # -I: tensors it generates itself

    def __init__(self, free_batch_dim: Optional[str] = None, input_name: str = "input") -> None:
        self.free_batch_dim = free_batch_dim  # the symbolic batch dimension's name, if the export has one
        self.input_name = input_name  # the graph's first input, which test data must name

    def argv(self, runner: str, model: str, *, input_shape: Sequence[int], batch: int, warmup: int,
             iterations: int, threads: Optional[int], extra: Sequence[str], inputs: Sequence[str] = ()) -> list[str]:
        # With test data beside the model it reads that instead of generating input (-I); the data fixes the batch.
        args = [runner, "-m", "times", "-r", str(iterations)] if inputs else [runner, "-I", "-m", "times", "-r",
                                                                               str(iterations)]
        if threads is not None:
            args += ["-x", str(threads)]
        if self.free_batch_dim and not inputs:
            args += ["-f", f"{self.free_batch_dim}:{batch}"]  # -I would otherwise give free dims size 1
        return [*args, *extra, model]  # the model path is positional, after the options

    def inputs(self, images: Any, model: Path, tmp: Path) -> Inputs:
        from onnx import numpy_helper

        local = tmp / "input_0.pb"
        local.write_bytes(numpy_helper.from_array(images.astype("float32", copy=False),
                                                  name=self.input_name).SerializeToString())
        # onnxruntime_perf_test reads every test_data_set_N/input_K.pb in the model's folder.
        rel = f"test_data_set_0/{local.name}"
        return Inputs(RUN_IMAGES, [(local, rel)], [f"{{work}}/{rel}"])

    def parse(self, output: str, *, batch: int, warmup: int, iterations: int) -> Timing:
        avg = re.search(rf"Average inference time cost(?: total)?:\s*{NUM}\s*ms", output)
        if avg is None:
            raise _unparseable("onnxruntime_perf_test", output)

        def pct(q: int) -> Optional[float]:
            m = re.search(rf"P{q} Latency:\s*{NUM}\s*s", output)
            return float(m.group(1)) * 1000.0 if m else None

        runs = re.search(r"Total inference requests:\s*(\d+)", output)
        peak = re.search(r"Peak working set size:\s*(\d+)\s*bytes", output)
        p50 = pct(50)
        stats = summarize_mean(float(avg.group(1)), batch, p50, pct(90), pct(99))
        return Timing(stats, "percentiles" if p50 is not None else "mean",
                      1 if "First inference time cost" in output else 0,
                      int(runs.group(1)) if runs else iterations,
                      int(peak.group(1)) / 2**20 if peak else None)


class TorchSpeedBenchmarkRunner(Runner):
    """PyTorch's `speed_benchmark_torch` (binaries/) for TorchScript files, with all-ones float inputs."""

    name = "speed_benchmark_torch"
    suffix = ".pt"
    own_input = "ones"  # --input_dims/--input_type=float: all-ones tensors

    def argv(self, runner: str, model: str, *, input_shape: Sequence[int], batch: int, warmup: int,
             iterations: int, threads: Optional[int], extra: Sequence[str], inputs: Sequence[str] = ()) -> list[str]:
        if threads is not None:
            raise ConfigError("speed_benchmark_torch has no thread-count flag",
                              "drop --threads; pin cores with --taskset instead")
        dims = ",".join(str(d) for d in (batch, *input_shape))
        source = list(inputs) or [f"--input_dims={dims}", "--input_type=float"]
        return [runner, f"--model={model}", *source, f"--warmup={warmup}", f"--iter={iterations}",
                "--report_pep=true", *extra]

    def inputs(self, images: Any, model: Path, tmp: Path) -> Inputs:
        import torch
        from torch.utils.bundled_inputs import augment_model_with_bundled_inputs, bundle_large_tensor

        from ..errors import ModelError

        # speed_benchmark_torch reads no image files; a module carrying its inputs is how it runs given data.
        try:
            module = torch.jit.load(str(model), map_location="cpu")
            augment_model_with_bundled_inputs(module, [(bundle_large_tensor(torch.from_numpy(images)),)])
        except (RuntimeError, ValueError, OSError) as e:  # what jit.load / scripting the bundling raise
            raise ModelError(f"can't bundle the images into {model.name}: {str(e).splitlines()[0][:200]}",
                             "bench a file saved with torch.jit.save") from None
        bundled = tmp / model.name
        torch.jit.save(module, str(bundled))
        return Inputs(RUN_IMAGES, [], ["--use_bundled_input=0"], model=bundled)

    def parse(self, output: str, *, batch: int, warmup: int, iterations: int) -> Timing:
        per_run = []
        for blob in re.findall(r"PyTorchObserver (\{.*\})", output):
            try:
                rec = json.loads(blob)
            except json.JSONDecodeError:
                continue
            if rec.get("metric") == "latency":
                scale = 1e-3 if rec.get("unit") == "ms" else 1e-6
                per_run.append(float(rec["value"]) * scale)
        if per_run:
            return Timing(summarize(per_run, batch), "per-iteration", warmup, len(per_run))
        mean = re.search(rf"(Micro|Milli)seconds per iter:\s*{NUM}", output)
        if mean is None:
            raise _unparseable("speed_benchmark_torch", output)
        ms = float(mean.group(2)) / (1000.0 if mean.group(1) == "Micro" else 1.0)
        return Timing(summarize_mean(ms, batch), "mean", warmup, iterations)


RUNNERS: dict[str, type[Runner]] = {r.suffix: r for r in (ExecuTorchRunner, OrtPerfTestRunner,
                                                           TorchSpeedBenchmarkRunner)}


def onnx_layout(path: Path) -> tuple[Optional[str], Optional[int], list[str]]:
    """The first input's batch dimension (symbolic name, or fixed size) and the external-data files it needs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ConfigError(f"{path.name} is not a readable ONNX file: {str(e).splitlines()[0][:200]}",
                          "export it again") from None
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    name = (dims[0].dim_param or None) if dims else None
    size = (dims[0].dim_value or None) if dims else None
    files = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return name, size, sorted(files)


def onnx_input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return graph.input[0].name if graph.input else "input"


def runner_for(model_file: Path, batch: int = 1) -> tuple[Runner, list[Path]]:
    """The runner for the model's file type, and every file the model needs on the device (itself first)."""
    kind = RUNNERS.get(model_file.suffix.lower())
    if kind is None:
        raise ConfigError(f"don't know how to run {model_file.name} on a device",
                          "give a .pte (executor_runner), .onnx (onnxruntime_perf_test) or .pt "
                          "(speed_benchmark_torch)")
    if kind is OrtPerfTestRunner:
        batch_dim, fixed, data = onnx_layout(model_file)
        if fixed is not None and fixed != batch:
            raise ConfigError(f"{model_file.name} was exported with a fixed batch of {fixed}, not {batch}",
                              f"bench it with --batch {fixed}, or export with a dynamic batch")
        return OrtPerfTestRunner(batch_dim, onnx_input_name(model_file)), [model_file,
                                                                          *(model_file.parent / f for f in data)]
    return kind(), [model_file]


def _check_taskset(mask: Optional[str]) -> None:
    if mask is not None and not re.fullmatch(r"(0x)?[0-9a-fA-F]+", mask):
        raise ConfigError(f"bad --taskset mask {mask!r}", "give a hex CPU mask, e.g. f0 for cores 4-7")


def device_label(dev: Device) -> str:
    return f"{dev.model or dev.device or 'android'} ({dev.serial})"


def _run_on_device(adb: Adb, runner: Runner, runner_path: Path, files: list[Path], *, input_shape: Sequence[int],
                   batch: int, warmup: int, iterations: int, threads: Optional[int], taskset: Optional[str],
                   runner_args: Sequence[str], inputs: Inputs) -> Timing:
    work = f"{REMOTE_ROOT}/{secrets.token_hex(4)}"  # per run, so two benchmarks never share files
    adb.shell(["mkdir", "-p", work])
    try:
        remote_runner = f"{work}/{runner_path.name}"
        adb.push(runner_path, remote_runner)
        adb.shell(["chmod", "755", remote_runner])  # octal: old toolbox chmod has no +x
        if inputs.model is not None:
            files = [inputs.model, *files[1:]]
        for f in files:
            adb.push(f, f"{work}/{f.name}")
        for local, rel in inputs.files:
            if "/" in rel:
                adb.shell(["mkdir", "-p", f"{work}/{rel.rsplit('/', 1)[0]}"])
            adb.push(local, f"{work}/{rel}")
        argv = runner.argv(remote_runner, f"{work}/{files[0].name}", input_shape=input_shape, batch=batch,
                           warmup=warmup, iterations=iterations, threads=threads, extra=runner_args,
                           inputs=[a.replace("{work}", work) for a in inputs.args])
        if taskset:
            argv = ["taskset", taskset, *argv]
        proc = adb.shell(argv, timeout=RUN_TIMEOUT_S)
        return runner.parse(proc.stdout + "\n" + proc.stderr, batch=batch, warmup=warmup, iterations=iterations)
    finally:
        try:
            adb.shell(["rm", "-rf", work])
        except DeviceError:
            pass  # a leftover temp dir is harmless; hiding the real error (e.g. the device vanished) is not


def bench_adb(device_query: str, model_file: str | Path, runner_path: str | Path, input_shape: Sequence[int],
              warmup: int, iterations: int, taskset: Optional[str] = None, runner_args: Sequence[str] = (),
              *, batch: int = 1, threads: Optional[int] = None, adb_path: str = "adb",
              images: Any = None) -> dict[str, Any]:
    """Benchmark an exported model on an Android device; the row has the stats schema plus `input`,
    `fingerprint`, `serial` and `runner`. `input_shape` is (C, H, W); .pte files run at the shape they were
    exported with. `images` (batch, C, H, W; numpy or torch): pushed as the runner's input files, else the runner
    makes its own input (the row's `input` says which). `device_query` `default`: devices.yaml's default device."""
    from . import devconfig

    model, runner_host = Path(model_file), Path(runner_path)
    for p, what in ((model, "model file"), (runner_host, "runner binary")):
        if not p.is_file():
            raise ConfigError(f"{what} {str(p)!r} not found", "check the path (the runner is the host's copy)")
    if warmup < 0 or iterations < 1 or batch < 1:
        raise ConfigError(f"bad benchmark sizes: warmup={warmup}, iterations={iterations}, batch={batch}",
                          "iterations and batch must be >= 1, warmup >= 0")
    _check_taskset(taskset)
    runner, files = runner_for(model, batch)
    attached = list_devices(adb_path)
    if device_query == devconfig.DEFAULT_QUERY:
        device_query = default_query(devconfig.load().default_device, attached)
    dev = resolve(device_query, attached)
    adb = Adb(dev.serial, adb_path)
    with tempfile.TemporaryDirectory(prefix="ltmpctl-inputs-") as tmp:
        inputs = Inputs(runner.own_input) if images is None else runner.inputs(_as_numpy(images), model, Path(tmp))
        t = _run_on_device(adb, runner, runner_host, files, input_shape=input_shape, batch=batch, warmup=warmup,
                           iterations=iterations, threads=threads, taskset=taskset, runner_args=runner_args,
                           inputs=inputs)
    row = make_row(backend=runner.name, device=device_label(dev), batch=batch, threads=threads, warmup=t.warmup,
                   repeats=t.repeats, stats=t.stats, peak_mem_mb=t.peak_mem_mb, timing=t.timing)
    row.update(input=inputs.label, serial=dev.serial, runner=runner_host.name, taskset=taskset,
               fingerprint=adb.fingerprint())
    return row


def _as_numpy(images: Any) -> Any:
    """(B, C, H, W) float32, C-contiguous numpy, from a torch tensor or an array."""
    import numpy as np

    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(images, dtype=np.float32)
