"""Check an exported file before anything runs it: a truncated or foreign .onnx/.pte/.pt is one ExportError that
names the file, not a parser's traceback from deep inside onnx, ExecuTorch or TorchScript."""
from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from ..errors import ExportError

_HINT = "it is truncated or not an ltmpctl export; export it again with `ltmpctl export RUN_DIR`"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def check_file(path: str | Path) -> None:
    """Parse `path` by its suffix (onnx: the protobuf; pte: ExecuTorch's program loader; pt: TorchScript);
    ExportError when that fails. Files of other suffixes are left to their callers."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(p), load_external_data=False))
        elif suffix == ".pte":
            _check_pte(p)
        elif suffix == ".pt":
            import torch

            with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not about this file
                warnings.simplefilter("ignore")
                torch.jit.load(str(p), map_location="cpu")
        else:
            return
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001  (every parser has its own error types; all mean "unreadable")
        raise ExportError(f"{p} is not a readable {suffix[1:]} file ({_first_line(e)})", _HINT) from None


def _check_pte(p: Path) -> None:
    # A .pte is a flatbuffer whose file identifier (bytes 4..8) reads ET and a two-digit version. A truncated
    # program keeps that header, so the runtime can tell it is cut short; a file without one is not ours to
    # judge (a runner build may take other formats) and is left to the device's runner.
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:6] != b"ET":
        return
    try:
        with _quiet():
            from executorch.runtime import Runtime
    except ImportError:
        return  # without the runtime only the header can be checked; the device's runner checks the rest
    with _quiet():  # the runtime logs its own diagnosis (C++, to fd 2); the one-line error says it for us
        Runtime.get().load_program(p)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence stderr, Python's and the file descriptor C++ libraries write to."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
