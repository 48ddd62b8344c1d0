"""`ltmpctl devices` and `ltmpctl bench`: latency of base vs compressed models, here or on an Android phone."""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from ..rundir import RECIPE_FILE, RunDir
from ._app import app, console, err_console
from ._pairs import PairsCommand

FILE_SUFFIXES = (".onnx", ".pte", ".pt")
DEFAULT_INPUT = (3, 224, 224)
BACKENDS = ("torch", "onnxruntime", "executorch")
# The export each non-torch backend runs: what `ltmpctl export --format` writes for it.
EXPORT_FORMATS = {"onnxruntime": "onnx", "executorch": "mobile"}


@app.command("devices")
def devices_cmd(json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Your phone setup (devices.yaml: runners, aliases, default device) and the Android devices adb sees."""
    from ..bench import devconfig
    from ..bench.adb import list_devices

    cfg = devconfig.load()
    if not json_out:
        _render_setup(cfg)
    found = list_devices()  # after the setup: it is worth showing even where adb is missing
    if json_out:
        typer.echo(json.dumps({"setup": cfg.as_dict(), "attached": [asdict(d) for d in found]}, indent=2))
        return
    if not found:
        err_console.print("no devices attached (plug the phone in with USB debugging on)")
        return
    table = Table("serial", "state", "model", "device", "product", title="attached")
    for d in found:
        table.add_row(d.serial, d.state, d.model or "-", d.device or "-", d.product or "-")
    console.print(table)


def _render_setup(cfg: Any) -> None:
    from ..bench.devconfig import RUNTIMES

    state = "" if cfg.exists else " (not created yet)"
    console.print(f"setup: {cfg.path}{state}", highlight=False)
    console.print(f"default device (--adb default): {cfg.default_device or '-'}", highlight=False)
    table = Table("runtime", "runner", "runs", "host path", title="runners")
    for runtime, (binary, suffix) in RUNTIMES.items():
        path = cfg.runners.get(runtime)
        where = "-" if path is None else (str(path) if path.is_file() else f"{path} [red](missing)[/]")
        table.add_row(runtime, binary, suffix, where)
    console.print(table)
    if cfg.aliases:
        console.print("aliases: " + ", ".join(f"{k} -> {v}" for k, v in cfg.aliases.items()), highlight=False)


@dataclass
class _Opts:
    """The timing settings every benchmark in one `ltmpctl bench` shares."""

    batches: list[int]
    warmup: int
    repeats: int
    threads: Optional[int]
    device: str


def _parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    if not re.fullmatch(r"\d+,\d+,\d+", text.replace(" ", "")):
        raise ConfigError(f"bad --input-size {text!r}", "write C,H,W, e.g. 3,224,224")
    return tuple(int(v) for v in text.replace(" ", "").split(","))


def _classify(target: str) -> tuple[str, Any]:
    """("run", dir) | ("file", path) | ("model", name)."""
    p = Path(target)
    if p.is_dir():
        if not (p / RECIPE_FILE).is_file():
            raise ConfigError(f"{target!r} is a directory without {RECIPE_FILE}",
                              "give a run directory, an exported .onnx/.pte/.pt file or a model name")
        return "run", p
    if p.is_file():
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(f"can't benchmark a {p.suffix or 'suffix-less'} file", "give a .onnx, .pte or .pt file")
        from ..export.files import check_file

        check_file(p)  # a truncated export: one line naming it, not a parser's traceback
        return "file", p
    if p.suffix.lower() in FILE_SUFFIXES or os.sep in target:
        raise ConfigError(f"{target!r} not found", "check the path")
    return "model", target


def _progress(what: str) -> None:
    err_console.print(f"[dim]benchmarking {what}[/]", highlight=False)


def _bench_pair(base: Any, compressed: Optional[Any], input_size: tuple[int, ...], opts: _Opts,
                flops_ratio: Optional[float], label: str, images: Optional[Any] = None) -> list[dict[str, Any]]:
    """Base (and compressed) torch eager rows at each batch, the compressed rows compared with the base ones.

    The two are timed interleaved on the same batch, so the speedup is measured under the same conditions.
    `images`: the batch source (a run's evaluation images); None times seeded random input, said in each row."""
    from ..bench.local import bench_torch_models

    models = [base] if compressed is None else [base, compressed]

    def timed(x: Any) -> list[dict[str, Any]]:
        return bench_torch_models(models, input_size, x.shape[0], opts.warmup, opts.repeats, opts.device,
                                  opts.threads, images=x)

    return _pair_rows(timed, compressed, input_size, opts, flops_ratio, label, images)


def _bench_exported_pair(backend: str, base: Any, compressed: Optional[Any], input_size: tuple[int, ...],
                         opts: _Opts, flops_ratio: Optional[float], label: str,
                         images: Optional[Any] = None) -> list[dict[str, Any]]:
    """`_bench_pair` in another runtime: base (and compressed) exported for it (onnxruntime: ONNX; executorch: the
    mobile `.pte`, XNNPACK on this CPU), each file verified against eager as `ltmpctl export` does, then timed
    interleaved on the same batches. The files live only as long as the benchmark."""
    from ..bench.local import bench_onnx_files, bench_pte_files
    from ..export import FORMATS, MIN_IMAGES, export_model, probe_images

    fmt = EXPORT_FORMATS[backend]
    enough = images is not None and len(images) >= MIN_IMAGES
    verify = images if enough else probe_images(input_size, MIN_IMAGES)
    models = {"base": base} if compressed is None else {"base": base, label: compressed}
    with tempfile.TemporaryDirectory(prefix="ltmpctl-bench-") as tmp:
        files = []
        for name, model in models.items():
            _progress(f"exporting {name} for {backend} (verified on {len(verify)} images)")
            export_model(model, fmt, Path(tmp) / name, verify[:2], verify)
            files.append(Path(tmp) / name / FORMATS[fmt].filename)

        def timed(x: Any) -> list[dict[str, Any]]:
            if backend == "executorch":
                return bench_pte_files(files, input_size, opts.warmup, opts.repeats, images=x)
            providers = ["cuda", "cpu"] if opts.device.startswith("cuda") else ["cpu"]
            return bench_onnx_files(files, input_size, x.shape[0], opts.warmup, opts.repeats, opts.threads,
                                    providers, images=x)

        return _pair_rows(timed, compressed, input_size, opts, flops_ratio, label, images,
                          exported=backend == "onnxruntime")


def _pair_rows(timed: Callable[[Any], list[dict[str, Any]]], compressed: Optional[Any],
               input_size: tuple[int, ...], opts: _Opts, flops_ratio: Optional[float], label: str,
               images: Optional[Any], exported: bool = False) -> list[dict[str, Any]]:
    """Rows of `timed(batch)` (base, then compressed) at each batch size, the compressed row compared with the base
    row on the very batch that was timed (token counts can depend on the input). Executed: what that forward
    computed (data-dependent compressors run attention's n x n products at the batch's widest image; `exported`:
    the ONNX graph's forward, `ltmpctl.flops.batch_ratios`)."""
    from ..bench.local import compare_rows, random_batch
    from ..flops import batch_ratios

    rows = []
    source = "random" if images is None else "run images"
    for batch in opts.batches:
        x = random_batch(input_size, batch) if images is None else images[:batch]
        _progress(f"base{'' if compressed is None else ' and ' + label}, batch {batch}, {source}")
        timed_rows = timed(x)
        b = {"model": "base", "input": source, **timed_rows[0]}
        rows.append(b)
        if compressed is None:
            continue
        c = {"model": label, "input": source, **timed_rows[1]}
        mean, c["executed_flops_ratio"] = batch_ratios(compressed, x, exported)
        rows.append(compare_rows(b, c, flops_ratio if flops_ratio is not None else mean))
    return rows


def _run_images(info: dict[str, Any], n: int, input_size: tuple[int, ...]) -> Optional[Any]:
    """n of the run's evaluation images (seeded subset, the run's eval preprocessing), or None (with a note)
    when they can't be read or don't fit the asked input size; the bench then times random input."""
    from ..data.loaders import DataSpec, calibration_batch
    from ..errors import LtmpctlError

    if tuple(info["input_size"]) != tuple(input_size):
        err_console.print("[yellow]note:[/] --input-size differs from the run's; timing random input")
        return None
    try:
        images = calibration_batch(DataSpec(**info["data"]), info["data_config"], n, seed=0)
    except LtmpctlError as e:
        err_console.print(f"[yellow]note:[/] the run's images can't be read ({e}); timing random input")
        return None
    if len(images) < n:
        err_console.print(f"[yellow]note:[/] the run's data has {len(images)} images, fewer than --batch {n}; "
                          "timing random input")
        return None
    return images


def _build_models(name: str, compressor: Optional[str], params: dict[str, Any], kwargs: dict[str, Any],
                  checkpoint: Optional[Path], pretrained: bool) -> tuple[Any, Optional[Any], tuple[int, ...]]:
    import ltmpctl
    from ..models import ModelSpec, create, data_config

    spec = ModelSpec(name, pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None, kwargs=kwargs)
    base = create(spec)
    input_size = tuple(data_config(base, spec)["input_size"])
    compressed = None
    if compressor:
        compressed = ltmpctl.apply(copy.deepcopy(base), compressor, **params)
    return base, compressed, input_size


def _load_run(run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from ..runs import load_run

    return load_run(run_dir)


def _file_input_size(path: Path) -> tuple[int, ...]:
    """(C, H, W) from the file's first input where it says (an ONNX file with fixed sizes; an ExecuTorch program,
    where ExecuTorch is installed here), else the ImageNet default."""
    suffix = path.suffix.lower()
    if suffix == ".pte":
        from ..export.mobile import input_size

        return input_size(path) or DEFAULT_INPUT
    if suffix != ".onnx":
        return DEFAULT_INPUT
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    chw = [d.dim_value for d in dims[1:]]
    return tuple(chw) if len(chw) == 3 and all(chw) else DEFAULT_INPUT


def _bench_file_local(path: Path, input_size: tuple[int, ...], opts: _Opts) -> list[dict[str, Any]]:
    from ..bench.local import bench_onnx, bench_pte_files, bench_torch

    suffix = path.suffix.lower()
    if suffix == ".pte":  # ExecuTorch's runtime on this CPU (XNNPACK and the portable kernels, as on a phone)
        if set(opts.batches) != {1}:
            raise ConfigError("the ExecuTorch program takes one image", "use --batch 1 for a .pte")
        _progress(f"{path.name}, batch 1, in ExecuTorch's runtime on this machine")
        return [{"model": path.name, **bench_pte_files([path], input_size, opts.warmup, opts.repeats)[0]}]
    rows = []
    for batch in opts.batches:
        _progress(f"{path.name}, batch {batch}")
        if suffix == ".onnx":
            providers = ["cuda", "cpu"] if opts.device.startswith("cuda") else ["cpu"]
            row = bench_onnx(path, input_size, batch, opts.warmup, opts.repeats, opts.threads, providers)
        else:
            row = bench_torch(_load_torchscript(path), input_size, batch, opts.warmup, opts.repeats, opts.device,
                              opts.threads)
        rows.append({"model": path.name, **row})
    return rows


def _load_torchscript(path: Path) -> Any:
    import torch

    from ..errors import ModelError

    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelError(f"{path.name} is not a TorchScript module: {str(e).splitlines()[0][:200]}",
                         "bench a model by name, or a file saved with torch.jit.save") from None


def _bench_file_adb(path: Path, device: str, runner: Optional[Path], input_size: tuple[int, ...], opts: _Opts,
                    taskset: Optional[str], runner_args: list[str]) -> list[dict[str, Any]]:
    from ..bench import devconfig
    from ..bench.ondevice import runner_for_file
    from ..bench.runners import bench_adb

    binary = runner_for_file(path, runner, devconfig.load())
    rows = []
    for batch in opts.batches:
        _progress(f"{path.name} on {device}, batch {batch}")
        row = bench_adb(device, path, binary, input_size, opts.warmup, opts.repeats, taskset, runner_args,
                        batch=batch, threads=opts.threads)
        rows.append({"model": path.name, **row})
    return rows


def _bench_run_adb(run_dir: Path, device: str, runner: Optional[Path], opts: _Opts, taskset: Optional[str],
                   runner_args: list[str]) -> list[dict[str, Any]]:
    """The run's exported program on the phone, fed the run's evaluation images."""
    from ..bench import devconfig
    from ..bench.ondevice import bench_run_on_device, ensure_export, runner_for_run

    runtime, binary = runner_for_run(runner, devconfig.load())  # before any work: a missing runner is one line
    _, compressed, info = _load_run(run_dir)
    model_file = ensure_export(run_dir, runtime, _progress)
    images = _run_images(info, max(opts.batches), tuple(info["input_size"]))
    return bench_run_on_device(run_dir, device, binary, runtime, model_file=model_file, compressed=compressed,
                               info=info, images=images, batches=opts.batches, warmup=opts.warmup,
                               repeats=opts.repeats, threads=opts.threads, taskset=taskset, runner_args=runner_args,
                               progress=_progress)


def _device_key(row: dict[str, Any]) -> str:
    """File name (without .json) for a row's device: local-cpu, local-cuda, or the phone's model-serial."""
    if row.get("serial"):
        raw = f"{row['device'].split(' (')[0]}-{row['serial']}"
    else:
        raw = f"local-{row['device'].split(':')[0]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(rows: list[dict[str, Any]], out_dir: Path, header: dict[str, Any]) -> list[Path]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_device_key(row), []).append(row)
    paths = []
    for key, group in groups.items():
        path = out_dir / f"{key}.json"
        _write_json_atomic(path, {**header, "device": group[0]["device"], "rows": group})
        paths.append(path)
    return paths


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _render(rows: list[dict[str, Any]]) -> None:
    table = Table("model", "backend", "device", "input", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "FLOPs", "exec",
                  "latency", "speedup", "flag")
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        table.add_row(str(r.get("model", "")), r["backend"], r["device"], str(r.get("input", "-")), str(r["batch"]),
                      _fmt(r["p50_ms"], ".2f"),
                      _fmt(r["p90_ms"], ".2f"), _fmt(r.get("p99_ms"), ".2f"), _fmt(r["images_per_s"], ".1f"), _fmt(r.get("flops_ratio"), ".3f"),
                      _fmt(r.get("executed_flops_ratio"), ".3f"), _fmt(r.get("latency_ratio"), ".3f"), speedup,
                      f"[yellow]{r['flag']}[/]" if r.get("flag") else "")
    console.print(table)


def _check_flags(batches: list[int], warmup: int, repeats: int, backends: list[str]) -> None:
    if not batches or min(batches) < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(f"bad sizes: --batch {batches}, --warmup {warmup}, --repeats {repeats}",
                          "batches and repeats must be >= 1, warmup >= 0")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown --backend {', '.join(unknown)}", f"choose from {', '.join(BACKENDS)}")
    if "executorch" in backends and set(batches) != {1}:
        raise ConfigError("the ExecuTorch program takes one image", "use --batch 1 with --backend executorch")


def _bench_model_target(kind: str, target: Any, backends: list[str], opts: _Opts, *, compressor: Optional[str],
                        params: dict[str, Any], kwargs: dict[str, Any], checkpoint: Optional[Path],
                        pretrained: bool, input_size: Optional[tuple[int, ...]]) -> tuple[list, dict[str, Any]]:
    """Rows and saved-file header for a model name or a run directory: base vs compressed in each backend (torch
    eager; onnxruntime and executorch on files exported for the benchmark)."""
    from ..export import MIN_IMAGES

    if kind == "run":
        base, compressed, info = _load_run(target)
        size = input_size or tuple(info["input_size"])
        label, flops = "compressed", info.get("flops_ratio")
        # Exports are verified on MIN_IMAGES images: the run's own, where there are that many.
        verified = [MIN_IMAGES] if set(backends) - {"torch"} else []
        images = _run_images(info, max(opts.batches + verified), size)
    else:
        base, compressed, size0 = _build_models(target, compressor, params, kwargs, checkpoint, pretrained)
        size, label, flops, images = input_size or size0, compressor or "compressed", None, None
    rows = []
    # Torch eager first, whatever the order asked: an export in this process leaves later eager forwards of the
    # compressed model slower than they run in a fresh one (deit_tiny ltmp at batch 1: ~5%), the base much less.
    for backend in sorted(dict.fromkeys(backends), key=lambda b: b != "torch"):
        if backend == "torch":
            rows += _bench_pair(base, compressed, size, opts, flops, label, images)
        else:
            rows += _bench_exported_pair(backend, base, compressed, size, opts, flops, label, images)
    return rows, {"input_size": list(size)}


LOCAL_WARMUP, LOCAL_REPEATS = 5, 20
# On a phone, as the LTMP paper timed: 50 untimed runs (clocks and caches settle), then 200 timed ones.
ADB_WARMUP, ADB_REPEATS = 50, 200


def _pick_target(target: Optional[str], run: Optional[Path]) -> tuple[str, Any]:
    """(kind, object) of what to bench: TARGET, --run, or the latest finished run under runs/ (said on stderr)."""
    from ..latest import latest_run

    if target is not None and run is not None:
        raise ConfigError("give a TARGET or --run, not both", "drop one of them")
    if run is not None:
        kind, obj = _classify(str(run))
        if kind != "run":
            raise ConfigError(f"--run {str(run)!r} is not a run directory", f"give a directory with {RECIPE_FILE}")
        return kind, obj
    if target is not None:
        return _classify(target)
    latest = latest_run()
    err_console.print(f"benchmarking the latest finished run: {latest}", highlight=False)
    return "run", latest


@app.command("bench", cls=PairsCommand)
def bench_cmd(
    target: Optional[str] = typer.Argument(None, help="model name (deit_tiny, demo, timm name), exported "
                                           ".onnx/.pte/.pt file, or run directory (default: the latest finished "
                                           "run under runs/)", show_default=False),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory to bench (instead of TARGET)"),
    local: bool = typer.Option(False, "--local", help="benchmark on this machine (the default without --adb)"),
    adb: Optional[str] = typer.Option(None, "--adb", help="Android device: serial, model (Pixel_7), codename "
                                      "(panther), alias (pixel7) or `default`; see `ltmpctl devices`"),
    runner: Optional[Path] = typer.Option(None, "--runner", help="host path of the on-device runner binary "
                                          "(default: devices.yaml's)"),
    batch: list[int] = typer.Option([1], "--batch", help="batch size; repeat for several"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help=f"untimed forwards first (default {LOCAL_WARMUP}; "
                                         f"{ADB_WARMUP} with --adb)", show_default=False),
    repeats: Optional[int] = typer.Option(None, "--repeats", help=f"timed forwards (default {LOCAL_REPEATS}; "
                                          f"{ADB_REPEATS} with --adb)", show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", help="intra-op threads (default: the runtime's)"),
    device: str = typer.Option("cpu", "--device", help="local device: cpu, cuda or cuda:N"),
    backend: list[str] = typer.Option(["torch"], "--backend", help="torch, onnxruntime or executorch (model names "
                                      "and run dirs: exported for it, verified, then timed); repeatable"),
    compressor: Optional[str] = typer.Option(None, "--compressor", help="also bench a copy patched with it"),
    param: list[str] = typer.Option([], "--param", help="compressor parameter key=value; repeatable"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="timm.create_model key=value: several after "
                                           "one flag (img_size=32 patch_size=4), or the flag repeated"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="weights to load"),
    pretrained: bool = typer.Option(False, "--pretrained/--random-weights", help="timm's pretrained weights; "
                                    "latency needs none, but LTMP's data-dependent token counts do"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W (default: the model's)"),
    taskset: Optional[str] = typer.Option(None, "--taskset", help="hex CPU mask to pin the on-device runner, e.g. "
                                          "f0 for cores 4-7"),
    runner_arg: list[str] = typer.Option([], "--runner-arg", help="extra argument for the runner; repeatable"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    out: Optional[Path] = typer.Option(None, "--out", help="save <device>.json here (run dirs: <run>/bench)"),
) -> None:
    """Latency (p50/p90/p99, images/s) of a model and its compressed copy, on this machine or an Android phone."""
    from ..bench.local import set_threads
    from ..models import parse_kwargs

    set_threads(None)  # OMP_WAIT_POLICY=passive before any OpenMP work (shared/SETUP.md)
    here = _Opts(batch, LOCAL_WARMUP if warmup is None else warmup, LOCAL_REPEATS if repeats is None else repeats,
                 threads, device)
    phone = _Opts(batch, ADB_WARMUP if warmup is None else warmup, ADB_REPEATS if repeats is None else repeats,
                  threads, device)
    _check_flags(batch, here.warmup, here.repeats, backend)
    kind, obj = _pick_target(target, run)
    # <run>/bench is written into the run dir: refused while a compress or export writes it (held until exit).
    writer = RunDir(obj).lock() if kind == "run" and out is None else None  # noqa: F841
    size = _parse_shape(input_size)
    if compressor and kind != "model":
        raise ConfigError("--compressor applies to model names", "a run directory already has its compressed model")
    on_host = local or adb is None
    rows: list[dict[str, Any]] = []
    header: dict[str, Any] = {"target": str(obj)}
    if kind == "file":
        size = size or _file_input_size(obj)
        header["input_size"] = list(size)
        if on_host:
            rows += _bench_file_local(obj, size, here)
        if adb is not None:
            rows += _bench_file_adb(obj, adb, runner, size, phone, taskset, runner_arg)
    else:
        if adb is not None and kind == "model":
            raise ConfigError("--adb runs exported files (a run's program, or a .pte/.onnx/.pt), not a bare model name",
                              "compress it first (`ltmpctl compress NAME --target 0.5`), then `ltmpctl bench --adb "
                              "DEVICE`")
        if on_host:
            host_rows, extra = _bench_model_target(kind, obj, backend, here, compressor=compressor,
                                                   params=parse_kwargs(param, "--param"),
                                                   kwargs=parse_kwargs(model_kwargs), checkpoint=checkpoint,
                                                   pretrained=pretrained, input_size=size)
            rows += host_rows
            header.update(extra)
        if adb is not None:
            rows += _bench_run_adb(obj, adb, runner, phone, taskset, runner_arg)
    out_dir = out if out is not None else (obj / "bench" if kind == "run" else None)
    saved = _save(rows, out_dir, header) if out_dir is not None else []
    if json_out:
        typer.echo(json.dumps({**header, "rows": rows, "saved": [str(p) for p in saved]}, indent=2))
        return
    _render(rows)
    for p in saved:
        err_console.print(f"saved {p}", highlight=False)
