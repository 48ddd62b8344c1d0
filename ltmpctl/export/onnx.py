"""ONNX export through torch.export (`dynamo=True`), run with onnxruntime.

The batch dimension is dynamic. For data-dependent compressors (ltmp) the token dimension is data-dependent inside
the graph: `ltmpctl.tokens.compact` sizes it with the batch's largest kept count read from the data (`.item()`),
which torch.export keeps as a symbol instead of the example's count, so the file really drops a different number of
tokens per image.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ExportError
from ..tokens import onnx_products
from .verify import Runner

# torch.onnx's exporter writes opset 18 and newer; lower ones go through a converter that fails on these graphs
# and then silently keeps opset 18.
MIN_OPSET = 18
BATCH_LIMIT = 4096  # upper bound of the dynamic batch dimension (torch.export wants one)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def check(model: torch.nn.Module) -> None:
    """Every supported model exports to ONNX (the opset is checked in `export`)."""


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ExportError(f"onnx opset {opset} is not supported", f"use --opset {MIN_OPSET} or newer")


def export(model: torch.nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """Write a single-file ONNX model (weights inside) with a dynamic batch dimension."""
    check_opset(opset)
    if example.shape[0] < 2:
        # torch.export specialises a dimension of size 1 to a constant; two images keep the batch symbolic.
        example = torch.cat([example, example.flip(-1)])
    batch = torch.export.Dim("batch", min=1, max=BATCH_LIMIT)
    with warnings.catch_warnings(), onnx_products():
        # The exporter warns about every data-dependent symbol it creates; the verification is what counts.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False,
        )
    written = file_opset(path)
    if written != opset:
        raise ExportError(f"onnx export could not target opset {opset}: the file has opset {written}",
                          f"use --opset {written}")


def file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def load(path: Path) -> Runner:
    """An onnxruntime CPU session as a tensor-in, tensor-out function."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Like OpenMP's spin-wait (../shared/SETUP.md), onnxruntime's busy-waiting threads starve shared cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: Tensor) -> Tensor:
        (logits,) = session.run([OUTPUT_NAME], {name: images.detach().cpu().numpy()})
        return torch.from_numpy(logits)

    return run
