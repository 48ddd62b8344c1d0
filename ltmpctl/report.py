"""Report files: atomic writes, CSV/JSON of result rows, and accuracy-vs-cost plots with their Pareto front.

Everything here is plain data in, files out; the caller decides what the rows mean.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .rundir import atomic_write


def write_json(path: Path, obj: Any) -> Path:
    # Serialise before touching the disk; paths and other odd values become their text.
    return atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """One header line of `columns`, one line per row; missing values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return atomic_write(path, buf.getvalue().encode("utf-8"))


def rounded(value: Any, digits: int = 4) -> str:
    """A parameter value for a table: floats to `digits` significant digits, the rest as written."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return format(value, f".{digits}g")


def params_by_block(params: dict[str, Any]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """Learned parameters as a per-block table: (column names, one row per block, scalar parameters).

    A list-valued parameter becomes a column (block i's value in row i; shorter lists leave empty cells); every
    other value (a number, a string, a dict) is a scalar, shown once. Values are rounded for reading; the run's
    summary.json (`--json`) keeps full precision."""
    columns = [k for k, v in params.items() if isinstance(v, (list, tuple))]
    depth = max((len(params[k]) for k in columns), default=0)
    rows = [[str(i)] + [rounded(params[k][i]) if i < len(params[k]) else "" for k in columns] for i in range(depth)]
    scalars = {k: (json.dumps(v) if isinstance(v, dict) else rounded(v)) for k, v in params.items()
               if k not in columns}
    return ["block", *columns], rows, scalars


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x = cheaper, higher y = better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = float("-inf")
    for i in order:
        if points[i][1] > best_y:  # cheaper points all scored lower, so this one is worth its cost
            front.append(i)
            best_y = points[i][1]
    return front


def _panel(ax: Any, series: dict[str, list[tuple[float, float]]], base: Optional[tuple[float, float]],
           xlabel: str) -> None:
    """One axes: a line per series sorted by x, the base as a star, the Pareto front of all points dashed."""
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    everything = [p for pts in series.values() for p in pts] + ([base] if base else [])
    if base:
        ax.plot([base[0]], [base[1]], marker="*", markersize=16, color="black", linestyle="none", label="base")
    front = [everything[i] for i in pareto_front(everything)]
    if front:
        # Steps, not diagonals: between two front points the best reachable accuracy is the cheaper one's.
        ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="grey", marker="o",
                markersize=11, markerfacecolor="none", drawstyle="steps-post", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_pareto(path: Path, rows: Sequence[dict[str, Any]], base: dict[str, Any], title: str,
                batch: int) -> Path:
    """pareto.png: top-1 vs GMACs and top-1 vs latency p50, one line per `compressor` of `rows`."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in ((axes[0], "gmacs", "GMACs per image"),
                            (axes[1], "latency_p50_ms", f"latency p50 (ms, batch {batch})")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get(key) is not None and r.get("top1") is not None:
                series.setdefault(r["compressor"], []).append((float(r[key]), float(r["top1"])))
        point = (float(base[key]), float(base["top1"])) if base.get(key) is not None else None
        _panel(ax, series, point, xlabel)
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs latency")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, buf.getvalue())
