"""ltmpctl: token reduction for timm Vision Transformers.

Public Python API:
    ltmpctl.apply(model, "tome", r=8)   -> the model, patched in place
    ltmpctl.token_counts(model)         -> (B, depth, 2): tokens into attention / MLP per block, last forward
"""
from __future__ import annotations

from typing import Any

import torch

from .compressor import Compressor, Knob, ParamGroup, Params, TokenBlock, token_counts
from .errors import LtmpctlError

__version__ = "0.1.0"
__all__ = ["apply", "token_counts", "Compressor", "Knob", "ParamGroup", "Params", "TokenBlock", "LtmpctlError",
           "__version__"]


def apply(model: torch.nn.Module, compressor: str, **params: Any) -> torch.nn.Module:
    """Patch `model` (a timm VisionTransformer) with the named compressor; returns the same model object."""
    from .registry import get

    cls = get(compressor)
    return cls().apply(model, cls.parse_params(params))
