"""On-device export: an ExecuTorch `.pte` program with the XNNPACK delegate, run with ExecuTorch's Python runtime.

ExecuTorch is the working mobile route on current torch builds (`optimize_for_mobile` and lite-interpreter files
fail here, ../shared/SETUP.md). It is heavy (torchao, coremltools, pandas, ...), so it is an optional extra and
imported only when this format is asked for. The program takes one image (batch 1), as an app runs it.

XNNPACK takes the dense layers; the token bookkeeping (matching, merging, compaction) runs on ExecuTorch's portable
kernels, which is why `ltmpctl.tokens` sticks to ops they have (scatter_add, topk, cumsum; no sort or
scatter_reduce). For ltmp the token count inside the program is data-dependent, exactly as in the ONNX export, and
XNNPACK takes those layers too (`_bounded_dynamic_sizes`).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

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
    executable = lower(model, example).to_executorch()
    with open(path, "wb") as f:
        executable.write_to_file(f)


def lower(model: torch.nn.Module, example: Tensor) -> Any:
    """`model` exported at batch 1 with its XNNPACK-supported parts delegated (an `EdgeProgramManager`)."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings(), torch.no_grad(), _bounded_dynamic_sizes():
        warnings.simplefilter("ignore")  # torch.export's notes on data-dependent symbols
        program = torch.export.export(model, (example[:1],))
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


@contextlib.contextmanager
def _bounded_dynamic_sizes() -> Iterator[None]:
    """Let XNNPACK take tensors whose sizes are data-dependent but provably in [1, some bound].

    ExecuTorch 1.5.1's XNNPACK partitioner refuses every tensor with a data-dependent (unbacked) size, because
    XNNPACK can't take empty tensors and the symbol alone doesn't say it is never 0. ltmp's token counts are such
    sizes, so past its first reduction every layer fell to the portable kernels: the program ran 13x slower than
    the base (deit_tiny, 2026-12-02). Their ranges are known, though: compaction keeps at least prefix + 2 tokens
    (`torch._check` in `ltmpctl.tokens.compact`) and never more than it had. XNNPACK sizes such tensors at their
    upper bound and reshapes them to the real sizes on every run, as for any dynamic shape; the export is then
    verified on images that keep other counts than the example, like every export. Sizes that may be 0 or have
    no bound stay refused, and a partitioner without that check is left as it is.
    """
    try:
        from executorch.backends.xnnpack.partition.config import xnnpack_config
    except ImportError:
        yield
        return
    refuses = getattr(xnnpack_config, "has_free_unbacked_symbols", None)
    if refuses is None:
        yield
        return
    xnnpack_config.has_free_unbacked_symbols = _may_be_empty
    try:
        yield
    finally:
        xnnpack_config.has_free_unbacked_symbols = refuses


def _may_be_empty(t: Any) -> bool:
    """True when a dimension of `t` is data-dependent and not provably in [1, a finite bound]."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch.utils._sympy.value_ranges import bound_sympy

    if not isinstance(t, Tensor) or not free_unbacked_symbols(t):
        return False
    for d in t.shape:
        if isinstance(d, torch.SymInt) and free_unbacked_symbols(d):
            r = bound_sympy(d.node.expr, d.node.shape_env.var_to_range)
            if not (r.lower >= 1 and r.upper.is_finite):
                return True
    return False


def input_size(path: Path) -> Optional[tuple[int, ...]]:
    """(C, H, W) of the program's image input, or None where ExecuTorch is missing or can't read the program (a
    phone's runner then judges it)."""
    try:
        from executorch.runtime import Runtime

        sizes = list(Runtime.get().load_program(Path(path)).metadata("forward").input_tensor_meta(0).sizes())
    except Exception:  # ImportError, or the runtime's own error on a program it can't load
        return None
    return tuple(sizes[1:]) if len(sizes) == 4 else None


def load(path: Path) -> Runner:
    _require_executorch()
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(images: Tensor) -> Tensor:
        if images.shape[0] != 1:
            raise ExportError(f"the mobile program takes one image, got {images.shape[0]}", "run it at batch 1")
        return method.execute((images.contiguous(),))[0]

    return run
