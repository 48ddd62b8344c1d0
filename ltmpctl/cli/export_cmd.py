"""`ltmpctl export RUN_DIR`: ONNX / TorchScript / ExecuTorch files of a run's compressed model, each verified."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from ..errors import ExportError
from ._app import app, console, err_console

# Two-line headers and collapsed padding keep the table within 80 columns (pipes, CI logs).
COLUMNS = ("format", "file", "size\nMB", "opset", "max\n|diff|", "top-1\nagree", "tokens\nmin-max", "verdict")
NUMERIC = {"size\nMB", "opset", "max\n|diff|", "top-1\nagree", "tokens\nmin-max"}


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `ltmpctl compress`.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="onnx|torchscript|mobile|all",
                                     help="What to write; `all` skips formats that can't take the model.")] = "all",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, 18 or newer.  \\[default: 18]",
                                                 show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory.  \\[default: RUN_DIR/export]",
                                                show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Export the run's compressed model and check each file against eager (max |diff| <= 1e-4, same top-1)
    on 32 images that keep different numbers of tokens, at batch 1 and batched. Writes verify.json beside."""
    from ..export import DEFAULT_OPSET, export_run, resolve_formats

    formats = resolve_formats(fmt)
    records = export_run(run_dir, formats, out, DEFAULT_OPSET if opset is None else opset,
                         keep_going=len(formats) > 1, progress=_progress)
    if as_json:
        typer.echo(json.dumps(records, indent=2))
    else:
        _render(records)
    failed = [r["format"] for r in records if r.get("error")]
    if failed:
        raise ExportError(f"{len(failed)} of {len(records)} exports failed: {', '.join(failed)}",
                          "the reasons are printed above and recorded in verify.json")


def _progress(fmt: str) -> None:
    err_console.print(f"[dim]exporting {fmt} and verifying it against eager[/]", highlight=False)


def _verdict(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return "[yellow]skipped[/]"
    if r.get("passed"):
        return "[green]pass[/]"
    return "[bold red]FAIL[/]"


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tokens(r: dict[str, Any]) -> str:
    lo, hi = r.get("tokens_min"), r.get("tokens_max")
    return "-" if lo is None else f"{lo}-{hi}"


def _top1(r: dict[str, Any]) -> str:
    images, agree = r.get("images"), r.get("top1_agree")
    return "-" if images is None or agree is None else f"{round(agree * images)}/{images}"


def _render(records: list[dict[str, Any]]) -> None:
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in COLUMNS:
        # Nothing wraps: a cut file name or number is worse than a wide table.
        table.add_column(header, no_wrap=True, justify="right" if header in NUMERIC else "left")
    for r in records:
        size = r.get("size_bytes")
        table.add_row(r["format"], r.get("file") or "-", _num(None if size is None else size / 1e6, ".2f"),
                      _num(r.get("opset"), "d"), _num(r.get("max_abs_diff"), ".1e"), _top1(r), _tokens(r),
                      _verdict(r))
    console.print(table)
    for r in records:
        for note in _notes(r):
            err_console.print(f"{r['format']}: {note}", highlight=False, markup=False)


def _notes(r: dict[str, Any]) -> list[str]:
    """Why a row is skipped or failed, and a warning when data-dependent counts went unexercised."""
    notes = [r[k] for k in ("skipped", "error") if r.get(k)]
    if r.get("data_dependent") and r.get("tokens_spread") == 0:
        notes.append(f"every verification image kept {r['tokens_min']} tokens, so differing counts were not "
                     "exercised")
    return notes
