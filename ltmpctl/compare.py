"""The `compare` job: several compressors x several FLOPs targets on one model, one table and one Pareto plot.

    validate everything -> for each (compressor, target): reuse a finished run or compress -> bench base + each
    -> compare.json, compare.csv, pareto.png in the compare dir

Runs live under `<compare dir>/runs/<compressor>-<target>/` and are matched by `result_hash` of their resolved
recipe, so repeating a compare (or widening it by a target) only runs what is missing; an interrupted run with the
same recipe is resumed rather than restarted. Finished `ltmpctl compress` runs under runs/ count too: the one
`ltmpctl compress demo --target 0.5` left is reused by `ltmpctl compare ltmp tome` for its ltmp @ 0.5 cell.
"""
from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from . import report
from .bench.local import bench_torch_models, compare_rows
from .config import Recipe, load_yaml, resolve, to_dict
from .errors import ConfigError, LtmpctlError
from .models import DEMO
from .pipeline import Hooks, resolve_device, run_compress
from .rundir import RECIPE_FILE, RUNS_ROOT, STATUS, RunDir
from .runs import load_run

TARGETS_HINT = "write comma-separated fractions of FLOPs to keep, e.g. --targets 0.4,0.5,0.6,0.7"
# compare.csv's columns, in order; the table shows the same ones (run_dir aside).
COLUMNS = ("compressor", "target", "flops_ratio", "gmacs", "top1", "delta_top1", "latency_p50_ms", "speedup",
           "run_dir")
# The compare benchmarks every model itself and needs no exports, so these stages are off unless --set turns them on.
STAGE_DEFAULTS: dict[str, Any] = {"stages.flops.enabled": False, "stages.export.enabled": False,
                                  "stages.bench.enabled": False}
RESUMABLE = ("failed", "interrupted")
# Stages that measure or package a finished model but never change it, its top-1 or its GMACs: a run that had
# them on gives the same compare row as one that had them off.
REPORT_ONLY_STAGES = ("flops", "export", "bench")
HASH_KEY = "result_hash"  # where a compare stores a run's result_hash in its summary.json


@dataclass
class CompareSpec:
    """What to compare; the CLI fills it from its flags."""

    model: str = DEMO  # alias, timm name, or `demo` (offline: the bundled Fashion-MNIST ViT)
    compressors: list[str] = field(default_factory=list)  # registered compressor names, in table order
    targets: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7])  # FLOPs fractions, in (0, 1]
    recipe: Optional[Path] = None  # base recipe; None = the demo recipe for `demo`, else the defaults
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted recipe keys from flags (data.path, ...)
    sets: list[str] = field(default_factory=list)  # --set PATH=VALUE, applied last, to every run
    out: Optional[Path] = None  # compare dir; None = runs/compare-<UTC time>/
    batch: int = 1  # benchmark batch size
    warmup: Optional[int] = None  # untimed forwards; None = the recipe's stages.bench.warmup
    repeats: Optional[int] = None  # timed forwards; None = the recipe's stages.bench.repeats


@dataclass
class Planned:
    """One (compressor, target) cell: its resolved recipe and the hash that finds a run of it."""

    compressor: str
    target: float
    recipe: Recipe
    hash: str
    run: Optional[Path] = None  # set once a complete run exists
    reused: bool = False


# -- validation --------------------------------------------------------------------------------------------------


def parse_targets(text: str) -> list[float]:
    """`0.4,0.5` -> [0.4, 0.5]; a malformed list or a fraction outside (0, 1] is a one-line ConfigError."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ConfigError(f"--targets {text!r}: empty entry", TARGETS_HINT)
    try:
        targets = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise ConfigError(f"--targets {text!r}: {bad!r} is not a number", TARGETS_HINT) from None
    check_targets(targets)
    return targets


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_targets(targets: Sequence[float]) -> list[float]:
    """Targets in order without repeats; refuses none at all and any outside (0, 1] (nan included)."""
    if not targets:
        raise ConfigError("--targets: no targets given", TARGETS_HINT)
    for t in targets:
        if not 0.0 < t <= 1.0:  # also false for nan
            raise ConfigError(f"--targets: {t:g} is outside (0, 1]", TARGETS_HINT)
    return list(dict.fromkeys(targets))


def check_compressors(names: Sequence[str]) -> list[str]:
    """Names in order without repeats; an unknown one raises the registry's PluginError (it lists the known)."""
    from . import registry

    if not names:
        raise ConfigError("no compressors given", "name at least one, e.g. `ltmpctl compare ltmp tome`")
    for name in names:
        registry.get(name)
    return list(dict.fromkeys(names))


# -- recipes -----------------------------------------------------------------------------------------------------


def _base_tree(spec: CompareSpec) -> dict[str, Any]:
    """The base recipe's mapping without compressor params: each compressor starts from its own defaults."""
    path = spec.recipe
    if path is None and spec.model == DEMO:
        from .demo import RECIPE

        path = RECIPE
    if path is None:
        return {}
    resolve(path)  # refuse a broken recipe file here, where its errors still carry line numbers
    tree = load_yaml(path)
    if isinstance(tree.get("compressor"), dict):
        tree["compressor"] = {k: v for k, v in tree["compressor"].items() if k != "params"}
    return tree


def check_bench(spec: CompareSpec) -> None:
    """Benchmark sizes are checked up front: finding them wrong after an hour of compressing helps nobody."""
    bad_warmup = spec.warmup is not None and spec.warmup < 0
    bad_repeats = spec.repeats is not None and spec.repeats < 1
    if spec.batch < 1 or bad_warmup or bad_repeats:
        raise ConfigError(f"bad benchmark sizes: batch={spec.batch}, warmup={spec.warmup}, repeats={spec.repeats}",
                          "--batch and --repeats must be >= 1, --warmup >= 0")


def plan(spec: CompareSpec) -> list[Planned]:
    """Every cell's resolved recipe, validated before anything runs (a bad --set fails here, once)."""
    compressors = check_compressors(spec.compressors)
    check_bench(spec)
    targets = check_targets(spec.targets)
    tree = _base_tree(spec)
    cells = []
    for name in compressors:
        for target in targets:
            # Later keys win inside one layer: recipe < compare's stage defaults < flags < this cell.
            layer = {**tree, **STAGE_DEFAULTS, **spec.overrides, "model.name": spec.model,
                     "compressor.name": name, "target": target}
            recipe = resolve(None, layer, spec.sets)
            if not recipe.stages.evaluate.enabled:
                raise ConfigError("stages.evaluate.enabled: compare reads top-1 and GMACs from the evaluate stage",
                                  "leave stages.evaluate enabled")
            cells.append(Planned(name, target, recipe, result_hash(recipe)))
    return cells


# -- runs --------------------------------------------------------------------------------------------------------


def default_dir(when: Optional[datetime] = None) -> Path:
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return RUNS_ROOT / f"compare-{stamp}"


def result_hash(recipe: Recipe) -> str:
    """A short hash of everything that decides a compare row (the recipe without `out` and the report-only
    stages): equal for two runs exactly when a compare may use one for the other."""
    tree = to_dict(recipe)
    for stage in REPORT_ONLY_STAGES:
        tree.get("stages", {}).pop(stage, None)
    tree.pop("out", None)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _run_hash(run: RunDir) -> Optional[str]:
    """The run's result_hash: from its summary, else recomputed from resolved.yaml; None if it has neither."""
    try:
        stored = run.read_summary().get(HASH_KEY)
        if stored:
            return str(stored)
        if run.file(RECIPE_FILE).is_file():
            return result_hash(resolve(run.file(RECIPE_FILE)))
    except LtmpctlError:  # a hand-edited or foreign directory: never a match
        return None
    return None


def index_runs(runs_root: Path) -> dict[str, list[tuple[Path, Optional[str]]]]:
    """result_hash -> [(run dir, state)] for every run directory under `runs_root`."""
    found: dict[str, list[tuple[Path, Optional[str]]]] = {}
    if not runs_root.is_dir():
        return found
    for path in sorted(runs_root.iterdir()):
        if not (path / STATUS).is_file():
            continue
        run = RunDir(path)
        h = _run_hash(run)
        if h is not None:
            found.setdefault(h, []).append((path, run.state()))
    return found


def shared_roots(own: Path) -> list[Path]:
    """Where else finished runs live: runs/ itself and every earlier compare's runs/ folder (not `own`)."""
    roots = [RUNS_ROOT, *sorted(RUNS_ROOT.glob("*/runs"))] if RUNS_ROOT.is_dir() else []
    mine = own.resolve()
    return [r for r in roots if r.is_dir() and r.resolve() != mine]


def _free_dir(runs_root: Path, name: str) -> Path:
    """`runs_root/name`, or name-2, name-3, ... when a run of another recipe already holds that name."""
    n = 1
    while True:
        path = runs_root / (name if n == 1 else f"{name}-{n}")
        if not path.exists():
            return path
        n += 1


def ensure_run(cell: Planned, runs_root: Path, index: dict[str, list[tuple[Path, Optional[str]]]],
               hooks: Hooks) -> None:
    """Point `cell.run` at a complete run of its recipe: an existing one, a resumed one, or a new one."""
    label = f"{cell.compressor} @ {cell.target:g}"
    runs = index.get(cell.hash, [])
    complete = [p for p, state in runs if state == "complete"]
    if complete:
        cell.run, cell.reused = complete[0], True
        hooks.log(f"{label}: reusing {complete[0]}")
        return
    resumable = [p for p, state in runs if state in RESUMABLE]
    path = resumable[0] if resumable else _free_dir(runs_root, f"{cell.compressor}-{cell.target:g}")
    hooks.stage(f"{label}: {'resuming' if resumable else 'compressing'} in {path}")
    recipe = cell.recipe.model_copy(update={"out": str(path)})
    run_compress(recipe, hooks, resume=path if resumable else None)
    # Stored so later compares match this run without re-resolving its recipe.
    RunDir(path).update_summary(**{HASH_KEY: cell.hash})
    index.setdefault(cell.hash, []).append((path, "complete"))
    cell.run = path


# -- benchmark and rows ------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    batch: int
    warmup: int
    repeats: int
    device: str
    threads: Optional[int]


def bench_settings(spec: CompareSpec, recipe: Recipe) -> BenchSettings:
    cfg = recipe.stages.bench
    return BenchSettings(spec.batch, cfg.warmup if spec.warmup is None else spec.warmup,
                         cfg.repeats if spec.repeats is None else spec.repeats, resolve_device(recipe.device).type,
                         recipe.threads)


def _bench(base: Any, compressed: Any, input_size: Sequence[int], s: BenchSettings) -> list[dict[str, Any]]:
    """[base row, compressed row], timed interleaved so the speedup is measured under the same conditions."""
    return bench_torch_models([base, compressed], input_size, s.batch, s.warmup, s.repeats, s.device, s.threads)


def _base_row(summary: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    b = summary["base"]
    return {"compressor": "base", "target": 1.0, "flops_ratio": 1.0, "gmacs": b["gmacs"], "top1": b["top1"],
            "delta_top1": 0.0, "latency_p50_ms": bench["p50_ms"], "speedup": 1.0, "run_dir": None,
            "bench": bench}


def _cell_row(cell: Planned, summary: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    c, b = summary["compressed"], summary["base"]
    return {"compressor": cell.compressor, "target": cell.target, "flops_ratio": summary["flops_ratio"],
            "gmacs": c["gmacs"], "top1": c["top1"], "delta_top1": c["top1"] - b["top1"],
            "latency_p50_ms": bench["p50_ms"], "speedup": bench["speedup"], "run_dir": str(cell.run),
            "reused": cell.reused, "bench": bench}


def bench_cells(cells: list[Planned], s: BenchSettings, hooks: Hooks) -> tuple[dict[str, Any], list[dict]]:
    """(base row, one row per cell): each compressed model is timed interleaved with the base, in this process;
    its speedup is against that base timing, and the base row shows the first one."""
    hooks.stage(f"bench: batch {s.batch}, {s.repeats} repeats on {s.device}")
    base_row: dict[str, Any] = {}
    rows = []
    for cell in cells:
        assert cell.run is not None
        base, compressed, info = load_run(cell.run)
        summary = RunDir(cell.run).read_summary()
        base_bench, compressed_bench = _bench(base, compressed, info["input_size"], s)
        if not base_row:  # every cell shares the base model: only the compressor and target differ
            base_row = _base_row(summary, base_bench)
        bench = compare_rows(base_bench, compressed_bench, summary.get("flops_ratio"))
        rows.append(_cell_row(cell, summary, bench))
        hooks.log(f"{cell.compressor} @ {cell.target:g}: p50 {bench['p50_ms']:.2f} ms, "
                  f"speedup {bench['speedup']:.2f}x")
        del base, compressed
        gc.collect()  # one pair of models in memory at a time
    return base_row, rows


# -- the job -----------------------------------------------------------------------------------------------------


def _data_name(recipe: Recipe) -> str:
    path = recipe.data.path
    return path if path == "demo" else (Path(path).name or path)


def write_files(compare_dir: Path, doc: dict[str, Any]) -> dict[str, str]:
    """compare.json, compare.csv and pareto.png in `compare_dir`, each written atomically; returns their paths."""
    files = {"json": compare_dir / "compare.json", "csv": compare_dir / "compare.csv",
             "plot": compare_dir / "pareto.png"}
    doc["files"] = {k: str(v) for k, v in files.items()}
    report.write_csv(files["csv"], doc["rows"], COLUMNS)
    report.plot_pareto(files["plot"], doc["rows"], doc["base"], f"{doc['model']} on {doc['data']}",
                       doc["bench"]["batch"])
    report.write_json(files["json"], doc)  # last: its presence means the other two are there too
    return doc["files"]


def compare(spec: CompareSpec, hooks: Optional[Hooks] = None) -> dict[str, Any]:
    """Run (or reuse) every cell, benchmark them, write the report files; returns compare.json's content."""
    hooks = hooks or Hooks()
    cells = plan(spec)
    compare_dir = spec.out or default_dir()
    if compare_dir.exists() and not compare_dir.is_dir():
        raise ConfigError(f"out: {compare_dir} is a file, not a directory", "pass a directory path to --out")
    runs_root = compare_dir / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    index = index_runs(runs_root)
    for root in shared_roots(runs_root):
        # Finished runs of the same recipe elsewhere (`ltmpctl compress demo --target 0.5`, an earlier compare) are
        # reused as they are; unfinished ones there are left to their owner rather than resumed from here.
        for h, found in index_runs(root).items():
            index.setdefault(h, []).extend((p, st) for p, st in found if st == "complete")
    for cell in cells:
        ensure_run(cell, runs_root, index, hooks)
    settings = bench_settings(spec, cells[0].recipe)
    base_row, rows = bench_cells(cells, settings, hooks)
    first = cells[0].recipe
    doc: dict[str, Any] = {
        "model": first.model.name, "data": _data_name(first), "compare_dir": str(compare_dir),
        "compressors": list(dict.fromkeys(c.compressor for c in cells)),
        "targets": list(dict.fromkeys(c.target for c in cells)),
        "bench": {"batch": settings.batch, "warmup": settings.warmup, "repeats": settings.repeats,
                  "device": settings.device, "threads": settings.threads},
        "base": base_row, "rows": rows,
    }
    write_files(compare_dir, doc)
    return doc
