"""`ltmpctl plugins`, `models`, `doctor` and `flops`: what is installed, what can be compressed, and what it costs."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import types
import typing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, PluginError
from ..rundir import RECIPE_FILE
from ._app import app, console, err_console
from ._pairs import PairsCommand

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# Distributions whose versions decide what ltmpctl can do here; executorch is optional (mobile export).
VERSIONED = ("ltmpctl", "torch", "torchvision", "timm", "fvcore", "onnx", "onnxruntime", "executorch")
FLOPS_FILE = "flops.json"


# ---- plugins --------------------------------------------------------------------------------------------------------

@app.command("plugins")
def plugins_cmd(as_json: JsonOption = False) -> None:
    """List the registered compressors: where each comes from, its traits and its parameters; then any that
    can't load (exit 2)."""
    from ..registry import entries

    found = sorted(entries().values(), key=lambda e: e.name)
    rows = [_plugin_row(e.name, e.cls, e.source) for e in found if e.ok]
    broken = [{"name": e.name, "source": e.source, "error": str(e.error)} for e in found if not e.ok]
    if as_json:
        typer.echo(json.dumps(rows + broken, indent=2))
    else:
        for r in rows:
            traits = ", ".join(t.replace("_", "-") for t in ("learnable", "data_dependent") if r[t]) or \
                "fixed token counts"
            console.print(f"[bold]{escape(r['name'])}[/]  {escape(r['source'])}  [dim]{traits}[/]", highlight=False)
            if r["summary"]:
                console.print(f"  {escape(r['summary'])}", highlight=False)
            console.print(_params_table(r["params"]))
        for b in broken:
            err_console.print(f"[bold red]error:[/] {escape(b['error'])}", highlight=False)
    if broken:
        raise typer.Exit(PluginError.exit_code)


def _params_table(params: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 2))
    for header in ("parameter", "type", "default"):
        table.add_column(header, no_wrap=True)  # short and exact: only the description wraps
    table.add_column("description")
    for p in params:
        default = "required" if p["required"] else json.dumps(p["default"])  # JSON spelling: --param takes YAML
        table.add_row(*(escape(str(v)) for v in (p["name"], p["type"], default, p["description"])))
    return table


def _plugin_row(name: str, cls: Any, source: str) -> dict[str, Any]:
    from pydantic_core import to_jsonable_python

    params = []
    for field_name, info in cls.Params.model_fields.items():
        required = info.is_required()
        default = None if required else to_jsonable_python(info.get_default(call_default_factory=True))
        params.append({"name": field_name, "type": _type_name(info.annotation), "default": default,
                       "required": required, "description": info.description or ""})
    return {"name": name, "source": source, "summary": _summary(cls), "learnable": bool(cls.learnable),
            "data_dependent": bool(cls.data_dependent), "params": params}


def _summary(cls: type) -> str:
    """First line of the class docstring, else of its module's (the built-ins document themselves there)."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _type_name(tp: Any) -> str:
    """A readable annotation: `int | list[int]`, `'mean' | 'cls'`, `float`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


# ---- models ---------------------------------------------------------------------------------------------------------

@app.command("models")
def models_cmd(
    pattern: Annotated[Optional[str], typer.Argument(help="Filter: a substring or a glob (deit, '*small*').",
                                                     show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """List the model names ltmpctl takes: short aliases, the offline demo, then timm's ViT/DeiT models."""
    rows = _model_rows(pattern)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "kind", "what", box=box.SIMPLE_HEAD)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["what"])
    console.print(table)
    if not rows:
        err_console.print(f"no model matches {pattern!r}", highlight=False)


def _model_rows(pattern: Optional[str]) -> list[dict[str, str]]:
    import fnmatch

    from .. import demo
    from ..models import ALIASES, DEMO, list_vits

    glob = None if not pattern else (pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")

    def keep(*names: str) -> bool:
        return glob is None or any(fnmatch.fnmatch(n, glob) for n in names)

    rows = [{"name": a, "kind": "alias", "what": f"= {full}"} for a, full in ALIASES.items() if keep(a, full)]
    if keep(DEMO):
        rows.append({"name": DEMO, "kind": "demo", "what": f"{demo.DESCRIPTION} (offline; not an ImageNet model)"})
    rows += [{"name": n, "kind": "timm", "what": "timm ViT/DeiT"} for n in list_vits(pattern)]
    return rows


# ---- doctor ---------------------------------------------------------------------------------------------------------

@app.command("doctor")
def doctor_cmd(as_json: JsonOption = False) -> None:
    """Check the environment: versions, threads, CUDA, ONNX Runtime providers, adb, the demo data and model."""
    report = _doctor_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table("check", "value", box=box.SIMPLE_HEAD)
    for name, value in report["versions"].items():
        table.add_row(name, value or "[dim]not installed[/]")
    table.add_row("torch threads", f"{report['torch_threads']} intra-op, {report['torch_interop_threads']} inter-op")
    policy = report["omp_wait_policy"]
    table.add_row("OMP_WAIT_POLICY", policy or "[yellow]unset[/] (spin-waiting slows shared cores)")
    cuda = report["cuda"]
    table.add_row("CUDA", f"[green]yes[/] ({', '.join(cuda['devices'])})" if cuda["available"] else "[dim]no[/]")
    table.add_row("onnxruntime providers", ", ".join(report["onnxruntime_providers"]) or "[dim]none[/]")
    adb = report["adb"]
    table.add_row("adb", f"{adb['path']} ({adb['version']})" if adb["path"] else "[yellow]not on PATH[/]")
    table.add_row("cache dir", report["cache_dir"])
    data = report["demo_data"]
    table.add_row("Fashion-MNIST (demo data)", data["path"] if data["found"] else "[yellow]not found[/]")
    ckpt = report["demo_checkpoint"]
    table.add_row("demo checkpoint", ckpt["path"] if ckpt["found"] else "[yellow]missing[/]")
    console.print(table)


def _doctor_report() -> dict[str, Any]:
    import torch

    from .. import demo
    from ..data.fashion_mnist import cache_dir, local_dir

    data = local_dir()
    return {
        "versions": {"python": platform.python_version(), **{d: _dist_version(d) for d in VERSIONED}},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": _cuda(),
        "onnxruntime_providers": _ort_providers(),
        "adb": _adb(),
        "cache_dir": str(cache_dir()),
        "demo_data": {"found": data is not None, "path": None if data is None else str(data)},
        "demo_checkpoint": {"found": demo.CHECKPOINT.is_file(), "path": str(demo.CHECKPOINT)},
    }


def _dist_version(dist: str) -> Optional[str]:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "version": torch.version.cuda, "devices": []}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"available": True, "version": torch.version.cuda, "devices": names}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _adb() -> dict[str, Optional[str]]:
    path = shutil.which("adb")
    if path is None:
        return {"path": None, "version": None}
    try:
        done = subprocess.run([path, "version"], capture_output=True, text=True, timeout=10)
        line = (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        line = f"`adb version` failed: {type(e).__name__}"
    return {"path": path, "version": line or "no version output"}


# ---- flops ----------------------------------------------------------------------------------------------------------

@app.command("flops", cls=PairsCommand)
def flops_cmd(
    model: Annotated[str, typer.Argument(help="Model name (deit_tiny, demo, a timm name) or a run directory.",
                                         show_default=False)],
    compressor: Annotated[Optional[str], typer.Option("--compressor", "-c", help="Compressor to apply "
                                                      "(`ltmpctl plugins`).", show_default=False)] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", metavar="KEY=VALUE",
                                                       help="Compressor parameter, e.g. r=8 (repeatable; YAML).",
                                                       show_default=False)] = None,
    model_kwargs: Annotated[Optional[list[str]], typer.Option("--model-kwargs", metavar="KEY=VALUE",
                                                              help="timm.create_model keyword, e.g. img_size=32; several after one flag or the flag repeated.",
                                                              show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Weights (.safetensors or torch).",
                                                       show_default=False)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                             help="Load timm's pretrained weights.")] = True,
    images: Annotated[int, typer.Option("--images", "-n", help="Images to count tokens on.")] = 16,
    data: Annotated[Optional[str], typer.Option("--data", metavar="demo|PATH", help="Images from the demo data "
                                                "or an ImageFolder root.  \\[default: demo for the demo model and "
                                                "run data for a run dir, else seeded random images]",
                                                show_default=False)] = None,
    as_json: JsonOption = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write flops.json here.  \\[default: the run "
                                                "directory for a run, else nowhere]", show_default=False)] = None,
) -> None:
    """Tokens and GMACs per block of a model and its compressed copy; the analytic count checked against fvcore."""
    from ..analysis import analyze_flops

    if images < 1:
        raise ConfigError(f"--images {images} must be at least 1", "e.g. --images 16")
    run_dir = _run_dir(model)
    if run_dir is not None:
        if compressor or param or model_kwargs or checkpoint:
            raise ConfigError("a run directory carries its own model, compressor and parameters",
                              "drop --compressor/--param/--model-kwargs/--checkpoint, or give a model name")
        target = _from_run(run_dir, images, data)
    else:
        target = _from_name(model, compressor, param or [], model_kwargs or [], checkpoint, pretrained, images, data)
    _progress(f"counting on {target.source}")
    result = analyze_flops(target.base, target.compressed, target.images, target.data_dependent)
    doc = {"model": model, "input_size": list(target.images.shape[1:]), "images_source": target.source, **result}
    saved = _save(doc, out if out is not None else run_dir)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        _render_flops(doc)
    if saved is not None:
        err_console.print(f"saved {saved}", highlight=False)


@dataclasses.dataclass
class _Target:
    """What `flops` measures: the models, the images and where the images came from."""

    base: Any
    compressed: Any
    images: Any  # (N, C, H, W)
    source: str  # for the report, e.g. "16 random images (seed 0; no --data given)"
    data_dependent: bool


def _run_dir(target: str) -> Optional[Path]:
    """The run directory `target` names, None for a model name; a directory that is not a run is an error."""
    p = Path(target)
    if p.is_dir():
        if not (p / RECIPE_FILE).is_file():
            raise ConfigError(f"{target!r} is a directory without {RECIPE_FILE}",
                              "give a run directory made by `ltmpctl compress`, or a model name")
        return p
    if os.sep in target or p.suffix in (".yaml", ".yml", ".safetensors"):
        raise ConfigError(f"{target!r} is not a model name and no such directory exists",
                          "give a model name (`ltmpctl models`) or a run directory")
    return None


def _from_run(run_dir: Path, n: int, data: Optional[str]) -> _Target:
    from ..data.loaders import DataSpec
    from ..registry import get

    from ..runs import load_run

    base, compressed, info = load_run(run_dir)
    fields = {f.name for f in dataclasses.fields(DataSpec)}
    spec = DataSpec(**{k: v for k, v in (info.get("data") or {}).items() if k in fields})
    if data is not None:
        spec = DataSpec(path=data)
    batch, source = _load_images(spec, info["data_config"], n)
    return _Target(base, compressed, batch, source, get(info["compressor"]).data_dependent)


def _from_name(name: str, compressor: Optional[str], param: list[str], model_kwargs: list[str],
               checkpoint: Optional[Path], pretrained: bool, n: int, data: Optional[str]) -> _Target:
    import copy

    import ltmpctl

    from ..bench.local import random_batch
    from ..data.loaders import DataSpec
    from ..models import DEMO, ModelSpec, create, data_config, parse_kwargs
    from ..registry import get

    params = parse_kwargs(param, "--param")
    if params and not compressor:
        raise ConfigError("--param needs --compressor", "e.g. --compressor tome --param r=8")
    cls = get(compressor) if compressor else None  # an unknown name fails before the model is built
    spec = ModelSpec(name, pretrained=pretrained, checkpoint=None if checkpoint is None else str(checkpoint),
                     kwargs=parse_kwargs(model_kwargs))
    base = create(spec)
    compressed = ltmpctl.apply(copy.deepcopy(base), compressor, **params) if compressor else None
    cfg = data_config(base, spec)
    data = data if data is not None else (DEMO if name == DEMO else None)
    if data is None:  # the same seeded images `bench` times
        batch, source = random_batch(cfg["input_size"], n, seed=0), f"{n} random images (seed 0; no --data given)"
    else:
        batch, source = _load_images(DataSpec(path=data), cfg, n)
    return _Target(base, compressed, batch, source, bool(cls is not None and cls.data_dependent))


def _load_images(spec: Any, cfg: dict[str, Any], n: int) -> tuple[Any, str]:
    from ..data.loaders import calibration_batch

    # A handful of images: decoding them in this process beats starting loader workers.
    batch = calibration_batch(dataclasses.replace(spec, workers=0), cfg, n, seed=0)
    where = "the demo data (Fashion-MNIST test split)" if spec.path == "demo" else spec.path
    return batch, f"{batch.shape[0]} images from {where} (seed 0)"


def _save(doc: dict[str, Any], out: Optional[Path]) -> Optional[Path]:
    from ..rundir import RunDir

    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory", "pass a directory")
    return RunDir(out).write_json(FLOPS_FILE, doc)  # atomic: temp file + os.replace


def _progress(what: str) -> None:
    err_console.print(f"[dim]{what}[/]", highlight=False)


# ---- flops rendering ------------------------------------------------------------------------------------------------

def _render_flops(doc: dict[str, Any]) -> None:
    console.print(f"[bold]{escape(doc['model'])}[/] {'x'.join(map(str, doc['input_size']))}, "
                  f"{escape(doc['images_source'])}", highlight=False)
    decimals = _decimals(doc["base"]["total_gmacs"])
    console.print(_blocks_table("base", doc["base"], decimals))
    if "compressed" in doc:
        c = doc["compressed"]
        params = ", ".join(f"{k}={v}" for k, v in c["params"].items())
        console.print(_blocks_table(escape(f"{c['compressor']} ({params})"), c, decimals))
    console.print(_totals_table(doc, decimals))
    runs = "; ".join(f"{k}: {doc[k]['check']['fvcore_runs']}" for k in ("base", "compressed") if k in doc)
    console.print(f"[dim]fvcore traced {runs}. {doc['fvcore_skips']} Diffs above {doc['tolerance']:.0%} "
                  "are red.[/]", highlight=False)


def _decimals(base_gmacs: float) -> int:
    """Decimals that give the base total 4 significant digits (deit_tiny 1.258, the demo 0.06334)."""
    import math

    return min(8, max(2, 3 - math.floor(math.log10(base_gmacs)))) if base_gmacs > 0 else 3


def _blocks_table(title: str, section: dict[str, Any], decimals: int) -> Table:
    spread = "tokens_attn_p10" in section["blocks"][0]
    note = "\nmean (p10/p50/p90)" if spread else ""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in ("block", f"tokens -> attn{note}", f"tokens -> MLP{note}", "attn\nGMACs", "MLP\nGMACs",
                   "cumul.\nGMACs"):
        table.add_column(header, justify="right", no_wrap=True)
    g = f".{decimals}f"
    table.add_row("embed", "-", "-", "-", "-", format(section["embed_gmacs"], g))
    for r in section["blocks"]:
        table.add_row(str(r["block"]), _tokens(r, "attn", spread), _tokens(r, "mlp", spread),
                      format(r["attn_gmacs"], g), format(r["mlp_gmacs"], g), format(r["cumulative_gmacs"], g))
    table.add_row("norm+head", "-", "-", "-", "-", format(section["total_gmacs"], g))
    return table


def _tokens(row: dict[str, Any], part: str, spread: bool) -> str:
    mean = f"{row[f'tokens_{part}']:.1f}"
    if not spread:
        return mean
    spread_text = "/".join(f"{row[f'tokens_{part}_p{p}']:g}" for p in (10, 50, 90))
    return f"{mean} ({spread_text})"


def _totals_table(doc: dict[str, Any], decimals: int) -> Table:
    table = Table(title="per image: analytic vs fvcore", title_justify="left", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    for header in ("model", "GMACs", "ratio", "fvcore\nGMACs", "diff", "diff at\nmean tokens", "worst\nimage"):
        table.add_column(header, justify="left" if header == "model" else "right", no_wrap=True)
    base_total, tol, g = doc["base"]["total_gmacs"], doc["tolerance"], f".{decimals}f"
    for key in ("base", "compressed"):
        if key not in doc:
            continue
        s = doc[key]
        ck = s["check"]
        table.add_row(escape(s["compressor"] or key), format(s["total_gmacs"], g),
                      f"{s['total_gmacs'] / base_total:.3f}", format(ck["fvcore_gmacs"], g),
                      _pct(ck["rel_diff"], tol), _pct(ck["rel_diff_mean_counts"], tol),
                      _pct(ck["max_image_rel_diff"], tol))
    return table


def _pct(rel: float, tol: float) -> str:
    text = f"{rel:+.2%}"
    return f"[bold red]{text}[/]" if abs(rel) > tol else text
