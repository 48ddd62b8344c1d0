"""The `compress` job: a recipe's stages in order, results in a run directory.

    model -> calibrate -> finetune -> evaluate -> flops -> export -> bench

Only rank 0 writes the run dir when launched with torchrun; fine-tune and evaluate run on every rank.
"""
from __future__ import annotations

import copy
import functools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

import ltmpctl
import ltmpctl.registry

from . import models
from .config import Recipe, dump
from .data.loaders import DataSpec, SkippingLoader, build_loader
from .data.sanity import check_classes
from .errors import ConfigError
from .rundir import RECIPE_FILE, SUMMARY, RunDir
from .runs import BASE_FILE, MODEL_FILE, data_spec, model_spec
from .stages.calibrate import calibrate, fit
from .stages.evaluate import evaluate
from .stages.finetune import CKPT, finetune


@dataclass
class Hooks:
    """How the caller (the CLI) shows progress; all optional."""

    stage: Callable[[str], None] = lambda name: None
    progress: Callable[[str, int, int, dict], None] = lambda task, done, total, info: None
    log: Callable[[str], None] = lambda msg: None


@dataclass
class Context:
    recipe: Recipe
    device: torch.device
    rank: int = 0
    world: int = 1
    run: Optional[RunDir] = None
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoints: Optional[Path] = None  # where fine-tuning checkpoints live: the run dir, on every rank

    def write(self, **sections: Any) -> None:
        self.summary.update(sections)
        if self.run is not None:
            self.run.update_summary(**sections)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available", "use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's RandAugment picks its ops with NumPy
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train_images(spec: DataSpec, data_config: dict, n: int, seed: int) -> torch.Tensor:
    """n training images without augmentation, seeded: what calibration measures (never the val split)."""
    loader, _ = build_loader(spec, "train", data_config, train=True, augment=False, batch_size=min(n, 256),
                             limit=n, seed=seed)
    return torch.cat([x for x, _ in loader])[:n]


def _evaluate_both(ctx: Context, base: torch.nn.Module, compressed: torch.nn.Module, spec: DataSpec,
                   data_config: dict, hooks: Hooks) -> None:
    cfg = ctx.recipe.stages.evaluate
    loader, info = build_loader(spec, "val", data_config, train=False, batch_size=cfg.batch_size,
                                limit=cfg.images, seed=ctx.recipe.seed)
    if ctx.world > 1:
        loader = _shard(loader, ctx.rank, ctx.world)
    total, done = info.num_images, 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        hooks.progress("evaluate base and compressed", done, total, {})

    # One pass over the images, each batch through both models: their img/s are timed side by side.
    results = evaluate({"base": base, "compressed": compressed}, loader, ctx.device, tick)
    for r in results.values():
        r["skipped_images"] = len(info.skipped)
    if info.skipped:
        hooks.log(f"{len(info.skipped)} unreadable images skipped (e.g. {info.skipped[0][0]}: "
                  f"{info.skipped[0][1]})")
    if ctx.world > 1:
        results = _gather_eval(results)
    base_r, comp_r = results["base"], results["compressed"]
    ctx.write(base=base_r, compressed=comp_r, flops_ratio=comp_r["gmacs"] / base_r["gmacs"],
              tokens_per_block=comp_r["tokens_per_block"])


def _shard(loader: SkippingLoader, rank: int, world: int) -> SkippingLoader:
    """This rank's images of an evaluation loader: every world-th from `rank`, none twice (DistributedSampler
    pads with repeats, which would count some images twice; evaluation needs no equal shards)."""
    return SkippingLoader(loader.dataset, on_skip=loader.on_skip, batch_size=loader.batch_size,
                          sampler=range(rank, len(loader.dataset), world),  # type: ignore[arg-type]
                          num_workers=loader.num_workers)


def _gather_eval(results: dict) -> dict:
    """Combine per-rank evaluation shards: image-weighted means of every averaged metric."""
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, results)
    out = {}
    for label in results:
        parts = [s[label] for s in shards]
        n = sum(p["images"] for p in parts)
        merged = dict(parts[0], images=n)
        for key in ("top1", "top5", "gmacs", "flops_ratio"):
            merged[key] = sum(p[key] * p["images"] for p in parts) / n
        for key in ("tokens_per_block", "tokens_attn_per_block"):
            if key in merged:
                merged[key] = [round(sum(p[key][i] * p["images"] for p in parts) / n, 2)
                               for i in range(len(merged[key]))]
        merged["images_per_s"] = sum(p["images_per_s"] or 0 for p in parts)
        merged["skipped_images"] = sum(p["skipped_images"] for p in parts)
        out[label] = merged
    return out


def run_compress(recipe: Recipe, hooks: Optional[Hooks] = None, resume: Optional[Path] = None) -> dict[str, Any]:
    """Run the recipe's stages; returns summary.json's content. `resume` continues an interrupted run dir."""
    hooks = hooks or Hooks()
    _check_stages(recipe)
    device = resolve_device(recipe.device)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    rank, world = init_distributed(device)
    seed_everything(recipe.seed)
    mspec, dspec = model_spec(recipe), data_spec(recipe)
    base = models.create(mspec).to(device)
    data_config = models.data_config(base, mspec)
    label_warning = check_classes(dspec.path, base.num_classes, mspec.name)  # before any work
    if label_warning and rank == 0:
        hooks.log(f"warning: {label_warning}")
    ctx = Context(recipe, device, rank, world, checkpoints=resume)  # other ranks read rank 0's checkpoint
    if rank == 0:
        if resume is not None:
            ctx.run = RunDir.open(resume)
            ctx.summary = ctx.run.read_summary()
        else:
            ctx.run = RunDir.create(recipe.out, mspec.name, recipe.compressor.name, recipe.target)
            # A reused unfinished run dir: its results and checkpoint are an earlier attempt's (maybe another
            # recipe's); only --resume continues them.
            for stale in (SUMMARY, CKPT):
                ctx.run.file(stale).unlink(missing_ok=True)
            ctx.run.write_text(RECIPE_FILE, dump(recipe))
        ctx.checkpoints = ctx.run.path
        ctx.write(run_dir=str(ctx.run.path))
        ctx.run.write_env(recipe.seed, str(device), torch.get_num_threads())
    if ctx.run is None:
        return _stages(ctx, base, mspec, dspec, data_config, hooks)
    with ctx.run.guard():
        return _stages(ctx, base, mspec, dspec, data_config, hooks)


def _stages(ctx: Context, base: torch.nn.Module, mspec: models.ModelSpec, dspec: DataSpec, data_config: dict,
            hooks: Hooks) -> dict[str, Any]:
    recipe, st = ctx.recipe, ctx.recipe.stages
    comp = ltmpctl.registry.create(recipe.compressor.name)
    params = dict(ctx.summary.get("params") or recipe.compressor.params)
    ctx.write(model=mspec.name, compressor=comp.name, target=recipe.target, seed=recipe.seed,
              data=dspec.path, input_size=list(data_config["input_size"]))

    @functools.cache
    def calibration_images() -> torch.Tensor:
        """The seeded train images calibration and re-fitting measure: decoded once, only if one of them runs."""
        return train_images(dspec, data_config, st.calibrate.images, recipe.seed).to(ctx.device)

    if st.calibrate.enabled and "calibration" not in ctx.summary:
        hooks.stage("calibrate")
        images = calibration_images()
        cal = calibrate(base, comp, params, recipe.target, images, st.calibrate.tolerance, st.calibrate.max_iters)
        params = {**params, **cal.params}
        ctx.write(params=params, calibration={"flops_ratio": cal.flops_ratio, "iterations": cal.iterations,
                                              "searched": cal.knob, "params": cal.params,
                                              "images": len(images)})
        hooks.log(f"calibrated {cal.knob}: FLOPs ratio {cal.flops_ratio:.3f} on {len(images)} train images")
    compressed = ltmpctl.apply(copy.deepcopy(base), comp.name, **params)

    if st.finetune.enabled and (comp.learnable or st.finetune.full):
        hooks.stage("finetune")
        teacher = base if st.finetune.distill else None
        result = finetune(compressed, teacher, st.finetune, dspec, data_config, recipe.target, recipe.seed,
                          ctx.device, ctx.checkpoints,
                          lambda d, t, info: hooks.progress("finetune", d, t, info))
        params = {**params, **comp.trained_params(compressed)}
        knob = comp.refit_knob(compressed, params) if st.calibrate.enabled else None
        if knob is not None:
            # On the fine-tuned model: with `full` its weights changed too, and they are what the params serve.
            cal = fit(compressed, comp, params, knob, recipe.target, calibration_images(), st.calibrate.tolerance,
                      st.calibrate.max_iters)
            ctx.write(recalibration={"flops_ratio": cal.flops_ratio, "iterations": cal.iterations,
                                     "searched": cal.knob})
            hooks.log(f"recalibrated {cal.knob}: FLOPs ratio {cal.flops_ratio:.3f}")
            params = {**params, **cal.params}
        compressed = ltmpctl.apply(compressed, comp.name, **params)
        ctx.write(params=params, finetune={"steps": result.steps, "final_loss": result.final_loss,
                                           "final_train_flops_ratio": result.final_ratio,
                                           "resumed_from_step": result.resumed_from,
                                           "distill": st.finetune.distill, "full": st.finetune.full})
    else:
        ctx.write(params=params)
    if ctx.run is not None:
        _save_models(ctx.run, base, compressed, st.finetune.full)

    if st.evaluate.enabled:
        hooks.stage("evaluate")
        _evaluate_both(ctx, base, compressed, dspec, data_config, hooks)
    if ctx.rank != 0:
        return ctx.summary
    if st.flops.enabled:
        hooks.stage("flops")
        from .analysis import analyze_flops
        from .data.loaders import calibration_batch

        images = calibration_batch(dspec, data_config, st.flops.images, recipe.seed)
        ctx.write(flops=analyze_flops(base.cpu(), copy.deepcopy(compressed).cpu(), images, comp.data_dependent))
    if st.export.enabled:
        hooks.stage("export")
        ctx.write(export=_export(ctx, compressed, dspec, data_config))
    if st.bench.enabled:
        hooks.stage("bench")
        ctx.write(bench=_bench(ctx, base, compressed, dspec, data_config))
    return ctx.summary


def _save_models(run: RunDir, base: torch.nn.Module, compressed: torch.nn.Module, full: bool) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in compressed.state_dict().items()}
    run.write_bytes(MODEL_FILE, save(state))
    if full:
        run.write_bytes(BASE_FILE, save({k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()}))


def _export(ctx: Context, compressed: torch.nn.Module, dspec: DataSpec, data_config: dict) -> list[dict]:
    from .data.loaders import calibration_batch
    from .export import export_model

    cfg = ctx.recipe.stages.export
    images = calibration_batch(dspec, data_config, max(32, cfg.verify_images), ctx.recipe.seed + 7)
    assert ctx.run is not None
    return [export_model(copy.deepcopy(compressed).cpu(), fmt, ctx.run.file("export"), images[:1], images,
                         cfg.opset) for fmt in cfg.formats]


def _bench(ctx: Context, base: torch.nn.Module, compressed: torch.nn.Module, dspec: DataSpec,
           data_config: dict) -> list[dict]:
    """Base and compressed timed interleaved (same conditions) per backend and batch size, on evaluation images
    (a seeded subset, eval preprocessing): what ltmp keeps depends on the image. onnxruntime times the run's
    exported ONNX file against the base exported alike (into export/base/)."""
    from .bench.local import bench_onnx_files, bench_torch_models, compare_rows
    from .data.loaders import calibration_batch
    from .flops import batch_ratios

    cfg = ctx.recipe.stages.bench
    rows = []
    ratio = ctx.summary.get("flops_ratio")
    images = calibration_batch(dspec, data_config, max(cfg.batch_sizes), ctx.recipe.seed + 11)
    shape = data_config["input_size"]
    onnx_files = _onnx_pair(ctx, base, dspec, data_config) if "onnxruntime" in cfg.backends else None
    for batch in cfg.batch_sizes:
        x = images[:batch]
        timed = []  # (base row, compressed row, what the compressed forward executed)
        if "torch" in cfg.backends:
            timed.append((*bench_torch_models([base, compressed], shape, batch, cfg.warmup, cfg.repeats,
                                              ctx.device.type, ctx.recipe.threads, images=x),
                          batch_ratios(compressed, x.to(ctx.device))[1]))
        if onnx_files is not None:
            timed.append((*bench_onnx_files(onnx_files, shape, batch, cfg.warmup, cfg.repeats, ctx.recipe.threads,
                                            images=x),
                          batch_ratios(compressed, x.to(ctx.device), exported=True)[1]))
        for b, c, executed in timed:
            c["input"] = b["input"] = "run images"
            c["executed_flops_ratio"] = executed
            rows.append({"base": b, "compressed": compare_rows(b, c, ratio)})
    return rows


def _onnx_pair(ctx: Context, base: torch.nn.Module, dspec: DataSpec, data_config: dict) -> list[Path]:
    """(base, compressed) ONNX files for the onnxruntime bench: the export stage's file, and the base exported and
    verified the same way into export/base/."""
    from .data.loaders import calibration_batch
    from .export import export_model

    assert ctx.run is not None
    out = ctx.run.file("export")
    done = [r for r in ctx.summary.get("export", []) if r.get("format") == "onnx" and r.get("passed")]
    assert done, "checked by _check_stages before any work"
    cfg = ctx.recipe.stages.export
    images = calibration_batch(dspec, data_config, max(32, cfg.verify_images), ctx.recipe.seed + 7)
    record = export_model(copy.deepcopy(base).cpu(), "onnx", out / "base", images[:1], images, cfg.opset)
    return [out / "base" / record["file"], out / done[0]["file"]]


def _check_stages(recipe: Recipe) -> None:
    """Stage combinations that can't work, refused before any work is done."""
    st = recipe.stages
    if st.bench.enabled and "onnxruntime" in st.bench.backends and not (
            st.export.enabled and "onnx" in st.export.formats):
        raise ConfigError("stages.bench.backends has onnxruntime, which times the run's exported ONNX file, but the "
                          "export stage writes none", "set stages.export.enabled: true with onnx in its formats")
