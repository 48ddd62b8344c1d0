"""On-device export: an ExecuTorch `.pte` program with the XNNPACK delegate, run with ExecuTorch's Python runtime.

ExecuTorch is the working mobile route on current torch builds (`optimize_for_mobile` and lite-interpreter files
fail here, ../shared/SETUP.md). It is heavy (torchao, coremltools, pandas, ...), so it is an optional extra and
imported only when this format is asked for. The program takes one image (batch 1), as an app runs it.

XNNPACK takes the dense layers; the token bookkeeping (matching, merging, compaction) runs on ExecuTorch's portable
kernels, which is why `ltmpctl.tokens` sticks to ops they have (scatter_add, topk, cumsum; no sort or
scatter_reduce). For ltmp the token count inside the program is data-dependent, exactly as in the ONNX export.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ExportError
from .verify import Runner

INSTALL_HINT = "pip install 'ltmpctl[mobile]' (executorch==1.5.1, ~19 MB plus its dependencies)"


def _require_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise ExportError("mobile export needs ExecuTorch, which is not installed", INSTALL_HINT) from None


def check(model: torch.nn.Module) -> None:
    _require_executorch()


def export(model: torch.nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """Export at batch 1, lower the supported parts to XNNPACK, write the program. `opset` is ignored."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.export's notes on data-dependent symbols
        program = torch.export.export(model, (example[:1],))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        executable = lowered.to_executorch()
    with open(path, "wb") as f:
        executable.write_to_file(f)


def load(path: Path) -> Runner:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(images: Tensor) -> Tensor:
        if images.shape[0] != 1:
            raise ExportError(f"the mobile program takes one image, got {images.shape[0]}", "run it at batch 1")
        return method.execute((images.contiguous(),))[0]

    return run
