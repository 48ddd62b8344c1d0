"""`ltmpctl compress`: run a recipe's stages on a model and print base vs compressed."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import ConfigError
from ..rundir import RECIPE_FILE
from ._app import app, console, err_console
from ._pairs import PairsCommand


def _csv(value: Optional[str], cast: type, what: str) -> Optional[list]:
    if value is None:
        return None
    try:
        return [cast(v) for v in value.split(",")]
    except ValueError:
        raise ConfigError(f"bad {what} {value!r}", f"write comma-separated numbers, e.g. {what}=3,224,224") from None


def _params(items: list[str]) -> dict[str, Any]:
    from ..models import parse_kwargs

    return parse_kwargs(items)


class _Progress:
    """Rich progress bars on a terminal; plain stage lines otherwise (CI logs, pipes)."""

    def __init__(self, enabled: bool, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                            "{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err_console, transient=True) if enabled else None
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def stage(self, name: str) -> None:
        if not self.quiet:
            err_console.print(f"[cyan]>[/] {name}")

    def log(self, msg: str) -> None:
        if not self.quiet:
            err_console.print(f"  {msg}", highlight=False)

    def progress(self, task: str, done: int, total: int, info: dict) -> None:
        if self.bar is None:
            return
        text = " ".join(f"{k} {v:.4f}" for k, v in info.items())
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total, info=text)
        self.bar.update(self.tasks[task], completed=done, info=text)


def render_summary(s: dict[str, Any]) -> Table:
    t = Table(title=f"{s.get('model')} with {s.get('compressor')} (target {s.get('target')} of FLOPs)")
    t.add_column("")
    for col in ("top-1 %", "top-5 %", "GMACs", "FLOPs ratio", "img/s", "speedup"):
        t.add_column(col, justify="right")
    base_ips = (s.get("base") or {}).get("images_per_s")
    for label in ("base", "compressed"):
        r = s.get(label)
        if not r:
            continue
        ips = r.get("images_per_s")
        # img/s of both were timed on the same batches side by side (the evaluate stage), so their ratio is the speedup.
        speedup = f"{ips / base_ips:.2f}x" if ips and base_ips else "-"
        t.add_row(label, f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['gmacs']:.4f}", f"{r['flops_ratio']:.3f}",
                  f"{ips:.1f}" if ips else "-", speedup)
    return t


def render_params(params: dict[str, Any]) -> Table:
    """The learned parameters, one row per block, rounded (`--json` prints them in full)."""
    from ..report import params_by_block

    columns, rows, scalars = params_by_block(params)
    note = "rounded; --json has full precision"
    if len(columns) == 1:  # no per-block values: one row per parameter
        t = Table("parameter", "value", title="parameters", caption=note)
        for k, v in scalars.items():
            t.add_row(k, v)
        return t
    extra = "".join(f"; {k} {v}" for k, v in scalars.items())
    t = Table(title="parameters per block", caption=note + extra)
    for c in columns:
        t.add_column(c, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


@app.command(cls=PairsCommand)
def compress(
    model: str = typer.Argument(..., help="alias (deit_tiny), timm ViT name, or `demo`"),
    target: Optional[float] = typer.Option(None, "--target", "-t", help="fraction of FLOPs to keep, in (0, 1]"),
    compressor: Optional[str] = typer.Option(None, "--compressor", "-c", help="ltmp, tome, topk, or a plugin"),
    param: list[str] = typer.Option([], "--param", "-p", help="compressor parameter key=value (repeatable)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML recipe (defaults < recipe < flags)"),
    data: Optional[str] = typer.Option(None, "--data", help="`demo` or an ImageFolder root with train/ and val/"),
    input_size: Optional[str] = typer.Option(None, help="C,H,W for custom models"),
    mean: Optional[str] = typer.Option(None, help="per-channel mean, comma-separated"),
    std: Optional[str] = typer.Option(None, help="per-channel std, comma-separated"),
    checkpoint: Optional[str] = typer.Option(None, help="weights file (safetensors or torch state dict)"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="timm's weights"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="timm.create_model key=value: several after one flag (img_size=32 patch_size=4), or the flag repeated"),
    epochs: Optional[float] = typer.Option(None, help="fine-tune epochs (fractions allowed)"),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill", help="label-free: learn from the base"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="run directory (default runs/<time>-...)"),
    resume: Optional[Path] = typer.Option(None, help="continue an interrupted run directory"),
    set_: list[str] = typer.Option([], "--set", help="override any recipe key: path=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print summary.json to stdout"),
) -> None:
    """Compress MODEL to a FLOPs target: calibrate, fine-tune, evaluate (and flops/export/bench per recipe)."""
    from ..config import resolve
    from ..models import DEMO, parse_kwargs
    from ..pipeline import Hooks, run_compress

    if resume is not None:
        if not (resume / RECIPE_FILE).is_file():
            raise ConfigError(f"{resume} is not a run directory (no {RECIPE_FILE})", "give the RUN_DIR to resume")
        recipe = resume / RECIPE_FILE
    elif recipe is None and model == DEMO:
        from ..demo import RECIPE

        recipe = RECIPE
    overrides: dict[str, Any] = {
        "model.name": model, "model.checkpoint": checkpoint, "model.pretrained": pretrained,
        "model.kwargs": parse_kwargs(model_kwargs) or None, "target": target, "compressor.name": compressor,
        "compressor.params": _params(param) or None, "data.path": data,
        "data.input_size": _csv(input_size, int, "input_size"), "data.mean": _csv(mean, float, "mean"),
        "data.std": _csv(std, float, "std"), "stages.finetune.epochs": epochs, "stages.finetune.distill": distill,
        "device": device, "threads": threads, "seed": seed, "out": out,
    }
    resolved = resolve(recipe, {k: v for k, v in overrides.items() if v is not None}, set_)
    with _Progress(console.is_terminal and not as_json, quiet=as_json) as ui:
        summary = run_compress(resolved, Hooks(ui.stage, ui.progress, ui.log), resume=resume)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    console.print(render_summary(summary))
    params = summary.get("params") or {}
    if params:
        console.print(render_params(params))
    check = summary.get("flops", {}).get("compressed", {}).get("check")
    if check:
        console.print(f"GMACs analytic {check['analytic_gmacs']:.4f} vs fvcore {check['fvcore_gmacs']:.4f} "
                      f"({100 * check['rel_diff']:.2f}% apart)", highlight=False)
    if summary.get("run_dir"):
        console.print(f"run: {summary['run_dir']}", highlight=False)
