"""Run I/O: what a compress run writes (file names), the specs built from its recipe, and reopening a finished run
(its base and compressed models, rebuilt offline from the run dir). Below the pipeline: it imports no stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ltmpctl

from . import models
from .config import Recipe, resolve
from .data.loaders import DataSpec
from .errors import ConfigError
from .rundir import RECIPE_FILE, RunDir

MODEL_FILE = "model.safetensors"  # the compressed model, thresholds included
BASE_FILE = "base.safetensors"  # the uncompressed weights, written only when full fine-tuning changed them


def data_spec(recipe: Recipe) -> DataSpec:
    d = recipe.data
    return DataSpec(path=d.path, input_size=tuple(d.input_size) if d.input_size else None,
                    mean=tuple(d.mean) if d.mean else None, std=tuple(d.std) if d.std else None,
                    batch_size=d.batch_size, workers=d.workers)


def model_spec(recipe: Recipe) -> models.ModelSpec:
    m = recipe.model
    return models.ModelSpec(m.name, pretrained=m.pretrained, checkpoint=m.checkpoint, kwargs=dict(m.kwargs))


def load_run(run_dir: Path | str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(base_model, compressed_model, info) of a run; info: input_size, flops_ratio, compressor, params, data."""
    run = RunDir.open(run_dir)
    recipe_file = run.file(RECIPE_FILE)
    weights = run.file(MODEL_FILE)
    if not recipe_file.exists() or not weights.exists():
        raise ConfigError(f"{run.path} holds no finished compress run (no {RECIPE_FILE} / {MODEL_FILE})",
                          "run `ltmpctl compress` first, or --resume it if it was interrupted")
    recipe = resolve(recipe_file)
    summary = run.read_summary()
    spec = model_spec(recipe)
    # The run dir is self-contained: weights come from it, never from the network.
    spec = models.ModelSpec(spec.name, pretrained=False, checkpoint=None, kwargs=spec.kwargs)
    # models' readers: a truncated or foreign weights file is one ModelError naming it, not a traceback.
    state = models.load_state_dict(weights)
    base = models.create(spec)
    base_file = run.file(BASE_FILE) if run.file(BASE_FILE).exists() else weights
    base_state = state if base_file == weights else models.load_state_dict(base_file)
    models.load_weights(base, {k: v for k, v in base_state.items() if k in base.state_dict()}, base_file)
    params = summary.get("params") or recipe.compressor.params
    compressed = ltmpctl.apply(models.create(spec), recipe.compressor.name, **params)
    models.load_weights(compressed, state, weights)
    data_config = models.data_config(base, spec)
    info = {"input_size": list(data_config["input_size"]), "flops_ratio": summary.get("flops_ratio"),
            "compressor": recipe.compressor.name, "params": params, "model": spec.name,
            "data": data_spec(recipe).__dict__, "data_config": data_config, "recipe": recipe}
    return base.eval(), compressed.eval(), info
