"""TorchScript export with `torch.jit.trace`, for compressors whose token counts are static (tome, topk).

`torch.jit.script` can't compile the class-swapped model (plugins use closures and lambdas, the forward reads
module attributes set at patch time), so this traces. Tracing records the ops one example runs: any Python-level
decision about sizes is frozen to the example's, which is harmless when counts depend only on the input size but
unsafe when they depend on the image. Data-dependent compressors (ltmp) are refused; their ONNX export keeps the
counts dynamic.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ExportError
from .verify import Runner, is_data_dependent


def check(model: torch.nn.Module) -> None:
    if is_data_dependent(model):
        raise ExportError(
            f"torchscript can't export {model.ltmpctl_compressor}: its token counts differ per image and a trace "
            "freezes them to the example's",
            "use --format onnx, where token counts stay data-dependent in the graph",
        )


def export(model: torch.nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """Trace and save. `opset` is ONNX-only and ignored."""
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings flag Python values frozen into the trace; for static-count models they are the input
        # size's asserts, and the verification against eager is the real check. Also silences jit's deprecation.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def load(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return module(images)

    return run
