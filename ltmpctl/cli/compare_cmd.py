"""`ltmpctl compare`: several compressors at several FLOPs targets on one model, as a table and a Pareto plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ._app import app, console, err_console
from ._pairs import PairsCommand
from .compress_cmd import _csv, _Progress


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cells(r: dict[str, Any]) -> list[str]:
    return [r["compressor"], _num(r["target"], "g"), _num(r["flops_ratio"], ".3f"), _num(r["gmacs"], ".3g"),
            _num(r["top1"], ".2f"), _num(r["delta_top1"], "+.2f"), _num(r["latency_p50_ms"], ".2f"),
            _num(r["speedup"], ".2f") + "x"]


def render_compare(doc: dict[str, Any]) -> Table:
    """The base row, then one row per (compressor, target) in run order."""
    b = doc["bench"]
    t = Table(title=f"{doc['model']} on {doc['data']}: latency at batch {b['batch']} on {b['device']}")
    rows = [_cells(r) for r in [doc["base"], *doc["rows"]]]
    headers = ("compressor", "target", "FLOPs ratio", "GMACs", "top-1 %", "delta top-1", "p50 ms", "speedup")
    for i, header in enumerate(headers):
        # On a narrow terminal the number headers wrap; cells and the first header keep their full width.
        widest = max(len(row[i]) for row in rows)
        t.add_column(header, justify="left" if i == 0 else "right",
                     min_width=max(widest, len(header)) if i == 0 else widest)
    for row in rows:
        t.add_row(*row)
    return t


@app.command(cls=PairsCommand)
def compare(
    compressors: list[str] = typer.Argument(..., help="compressors to compare, e.g. ltmp tome topk"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="alias (deit_tiny), timm ViT name, or `demo` "
                                        "(the default: offline, minutes on a laptop)", show_default=False),
    targets: str = typer.Option("0.4,0.5,0.6,0.7", "--targets", "-t", help="FLOPs fractions, comma-separated"),
    data: Optional[str] = typer.Option(None, "--data", help="`demo` or an ImageFolder root with train/ and val/"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="base YAML recipe for every run"),
    set_: list[str] = typer.Option([], "--set", help="override any recipe key: path=value (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="compare dir (default runs/compare-<time>)"),
    batch: int = typer.Option(1, "--batch", help="benchmark batch size"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="untimed forwards (default: recipe's bench)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="timed forwards (default: recipe's bench)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="timm.create_model key=value: several after one flag (img_size=32 patch_size=4), or the flag repeated"),
    checkpoint: Optional[str] = typer.Option(None, help="weights file (safetensors or torch state dict)"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="timm's weights"),
    input_size: Optional[str] = typer.Option(None, help="C,H,W for custom models"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    as_json: bool = typer.Option(False, "--json", help="print compare.json to stdout"),
) -> None:
    """Compress MODEL with each COMPRESSOR at each target (reusing finished runs), benchmark, plot the trade-off."""
    from ..compare import CompareSpec, compare as run_compare, parse_targets
    from ..models import DEMO, parse_kwargs
    from ..pipeline import Hooks

    if model is None:
        from ..demo import DESCRIPTION

        model = DEMO
        err_console.print(f"no --model given: comparing on the demo model ({DESCRIPTION}; offline)", highlight=False)

    overrides: dict[str, Any] = {
        "data.path": data, "model.checkpoint": checkpoint, "model.pretrained": pretrained,
        "model.kwargs": parse_kwargs(model_kwargs) or None, "data.input_size": _csv(input_size, int, "input_size"),
        "device": device, "threads": threads,
    }
    spec = CompareSpec(model=model, compressors=list(compressors), targets=parse_targets(targets), recipe=recipe,
                       overrides={k: v for k, v in overrides.items() if v is not None}, sets=list(set_), out=out,
                       batch=batch, warmup=warmup, repeats=repeats)
    with _Progress(console.is_terminal and not as_json, quiet=as_json) as ui:
        doc = run_compare(spec, Hooks(ui.stage, ui.progress, ui.log))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    console.print(render_compare(doc))
    console.print(f"wrote {doc['files']['json']}, {doc['files']['csv']}, {doc['files']['plot']}", highlight=False)
