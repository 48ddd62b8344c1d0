"""Reopen a finished compress run: its base and compressed models, rebuilt offline from the run dir."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ltmpctl

from . import models
from .config import resolve
from .errors import ConfigError
from .pipeline import BASE_FILE, MODEL_FILE, data_spec, model_spec
from .rundir import RunDir


def load_run(run_dir: Path | str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(base_model, compressed_model, info) of a run; info: input_size, flops_ratio, compressor, params, data."""
    run = RunDir.open(run_dir)
    recipe_file = run.file("resolved.yaml")
    weights = run.file(MODEL_FILE)
    if not recipe_file.exists() or not weights.exists():
        raise ConfigError(f"{run.path} holds no finished compress run (no resolved.yaml / {MODEL_FILE})",
                          "run `ltmpctl compress` first, or --resume it if it was interrupted")
    recipe = resolve(recipe_file)
    summary = run.read_summary()
    spec = model_spec(recipe)
    # The run dir is self-contained: weights come from it, never from the network.
    spec = models.ModelSpec(spec.name, pretrained=False, checkpoint=None, kwargs=spec.kwargs)
    from safetensors.torch import load_file

    state = load_file(str(weights))
    base = models.create(spec)
    base_state = load_file(str(run.file(BASE_FILE))) if run.file(BASE_FILE).exists() else state
    base.load_state_dict({k: v for k, v in base_state.items() if k in base.state_dict()})
    params = summary.get("params") or recipe.compressor.params
    compressed = ltmpctl.apply(models.create(spec), recipe.compressor.name, **params)
    compressed.load_state_dict(state)
    data_config = models.data_config(base, spec)
    info = {"input_size": list(data_config["input_size"]), "flops_ratio": summary.get("flops_ratio"),
            "compressor": recipe.compressor.name, "params": params, "model": spec.name,
            "data": data_spec(recipe).__dict__, "data_config": data_config, "recipe": recipe}
    return base.eval(), compressed.eval(), info
