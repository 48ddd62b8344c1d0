"""Export a (token-reduced) timm ViT and prove the file computes what the eager model does.

    export_model(model, "onnx", out_dir, example, verify_images, opset=18) -> dict   (the verify.json record)
    export_run(run_dir, ["onnx", "torchscript"], out_dir=None, opset=18) -> list[dict]

Formats: onnx (torch.export -> ONNX, dynamic batch, onnxruntime), torchscript (trace; static-count compressors
only), mobile (ExecuTorch .pte with XNNPACK; optional extra). Each file is written under a temporary name, run on
the verification images and compared with eager; only a file that passes gets its final name (model.onnx,
model.pt, model.pte). A failing one is kept as `<name>.failed` for inspection and ExportError is raised.
`verify.json` next to the files holds one record per format.
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ExportError
from ..rundir import RunDir, atomic_write
from . import mobile, onnx, torchscript
from .files import check_file
from .verify import (MAX_BATCH, MIN_IMAGES, TOLERANCE, Reference, Verification, check_images, compare,
                     is_data_dependent, reference)

__all__ = ["export_model", "export_run", "probe_images", "check_file", "FORMATS", "DEFAULT_OPSET", "VERIFY_FILE"]

DEFAULT_OPSET = 18
VERIFY_FILE = "verify.json"
ALL = "all"


@dataclass(frozen=True)
class Format:
    name: str
    filename: str
    module: ModuleType  # check(model), export(model, example, path, opset), load(path) -> Runner
    dynamic_batch: bool  # the file takes any batch size: verified at batch 1 and at a larger batch
    uses_opset: bool


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", "model.onnx", onnx, dynamic_batch=True, uses_opset=True),
    "torchscript": Format("torchscript", "model.pt", torchscript, dynamic_batch=True, uses_opset=False),
    "mobile": Format("mobile", "model.pte", mobile, dynamic_batch=False, uses_opset=False),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}", f"choose one of: {', '.join(FORMATS)}, {ALL}")
    return FORMATS[name]


def resolve_formats(fmt: str) -> list[str]:
    """`all` -> every format, otherwise the one named (checked)."""
    return list(FORMATS) if fmt == ALL else [get_format(fmt).name]


# ---- the library entry point -------------------------------------------------------------------------------------

def export_model(model: torch.nn.Module, fmt: str, out_dir: Union[str, Path], example: Tensor,
                 verify_images: Tensor, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export `model` to `out_dir` in format `fmt`, verify the file against eager, return the verify record.

    `example` (B, 3, H, W) drives the export; `verify_images` (>= 32 images of the same size) should keep
    different numbers of tokens. The model is run in eval mode and left in the mode it came in.
    Raises ExportError when the format can't take this model, the export fails, or the file disagrees with eager.
    """
    spec = get_format(fmt)
    check_images(verify_images, example)
    spec.module.check(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        tmp = _export_to_temp(spec, model, example, out, opset)
        try:
            ref = reference(model, verify_images)
            result = _verify(spec, tmp, verify_images, ref)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        model.train(was_training)
    record = _record(spec, model, tmp, opset, result, ref)
    _settle(tmp, out / spec.filename, result.passed)
    _write_record(out / VERIFY_FILE, record)
    if not result.passed:
        raise _verification_error(spec, result, record["file"])
    return record


def _export_to_temp(spec: Format, model: torch.nn.Module, example: Tensor, out: Path, opset: int) -> Path:
    """Export under a hidden temporary name in `out` (same file system, so the final rename is atomic)."""
    tmp = _temp_path(out / spec.filename)
    try:
        spec.module.export(model, example, tmp, opset)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # also on Ctrl-C: no half-written file stays behind
        if isinstance(e, ExportError) or not isinstance(e, Exception):
            raise
        raise ExportError(f"{spec.name} export of {_model_name(model)} failed: {_root_cause(e)}",
                          "export_model() in Python chains the full traceback") from e
    return tmp


def _verify(spec: Format, path: Path, images: Tensor, ref: Reference) -> Verification:
    """Load the file and compare it with eager; a file that can't be loaded or run fails verification."""
    # The batched run uses the same chunks as the eager reference, so each image meets the same padding.
    batch_sizes = [1, MAX_BATCH] if spec.dynamic_batch else [1]
    try:
        runner = spec.module.load(path)
        return compare(runner, images, ref, batch_sizes)
    except Exception as e:
        return Verification(images.shape[0], batch_sizes, float("inf"), 0, f"running the file failed: "
                            f"{_root_cause(e)}", False)


def _record(spec: Format, model: torch.nn.Module, tmp: Path, opset: int, result: Verification, ref: Reference
            ) -> dict[str, Any]:
    tokens = ref.tokens
    return {
        "format": spec.name,
        "file": spec.filename if result.passed else f"{spec.filename}.failed",
        "size_bytes": tmp.stat().st_size,
        "opset": opset if spec.uses_opset else None,
        "images": result.images,
        "max_abs_diff": _json_float(result.max_abs_diff),
        "top1_agree": result.top1_fraction,
        "tokens_min": None if tokens is None else int(tokens.min()),
        "tokens_max": None if tokens is None else int(tokens.max()),
        "tokens_spread": None if tokens is None else int(tokens.max() - tokens.min()),
        "passed": result.passed,
        "compressor": getattr(model, "ltmpctl_compressor", None),
        "data_dependent": is_data_dependent(model),
        "batch_sizes": result.batch_sizes,
        "tolerance": TOLERANCE,
        "worst": result.worst,
    }


def _settle(tmp: Path, final: Path, passed: bool) -> None:
    """Give a verified file its final name; keep a failed one as `.failed` and drop a stale final file."""
    if passed:
        os.replace(tmp, final)
        final.with_name(final.name + ".failed").unlink(missing_ok=True)
    else:
        os.replace(tmp, final.with_name(final.name + ".failed"))
        # An older file under the final name no longer matches this model: leaving it would claim success.
        final.unlink(missing_ok=True)


def _verification_error(spec: Format, result: Verification, kept_as: str) -> ExportError:
    if not math.isfinite(result.max_abs_diff):
        what = result.worst
    elif result.max_abs_diff > TOLERANCE:
        what = f"{result.worst}: max |diff| {result.max_abs_diff:.3g} > {TOLERANCE:g}"
    else:
        what = f"{result.worst} (top-1 agrees on {result.top1_agree}/{result.images} images)"
    return ExportError(f"{spec.name} export failed verification against eager: {what}",
                       f"the file was kept as {kept_as} for inspection; details in {VERIFY_FILE}")


# ---- verify.json -------------------------------------------------------------------------------------------------

def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace this format's record in verify.json (a list, one record per format), atomically."""
    records = [r for r in _read_records(path) if r.get("format") != record["format"]] + [record]
    order = list(FORMATS)
    records.sort(key=lambda r: order.index(r["format"]) if r.get("format") in order else len(order))
    atomic_write(path, (json.dumps(records, indent=2) + "\n").encode("utf-8"))


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # none yet, or unreadable: this export rewrites it
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _temp_path(dest: Path) -> Path:
    """A hidden, unique sibling of `dest`: same file system (atomic rename), the writer's usual permissions."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


# ---- run directories -----------------------------------------------------------------------------------------------

def export_run(run_dir: Union[str, Path], formats: Sequence[str], out_dir: Optional[Union[str, Path]] = None,
               opset: int = DEFAULT_OPSET, keep_going: bool = False,
               progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Export a run's compressed model to `<run>/export/` (or `out_dir`), one verify record per format.

    Verification uses `probe_images` at the run's input size. With `keep_going`, a format that can't take the
    model gives a record with "skipped" (the reason) and a failed one a record with "error", and the others
    still run; without it the first ExportError propagates. `progress` is told each format before it starts.
    """
    run = Path(run_dir)
    _, model, info = _load_run(run)
    shape = model_image_shape(model, info.get("input_size"))
    example, images = probe_images(shape, 2, seed=1), probe_images(shape, MIN_IMAGES, seed=0)
    out = Path(out_dir) if out_dir is not None else run / "export"
    # Writing inside the run dir makes this its writer: refused while a compress (or another export) writes it.
    writer = RunDir(run).lock() if _inside(out, run) else None
    try:
        records = []
        for fmt in formats:
            if progress is not None:
                progress(fmt)
            records.append(_export_one(model, fmt, out, example, images, opset, keep_going))
        return records
    finally:
        if writer is not None:
            writer.unlock()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _export_one(model: torch.nn.Module, fmt: str, out: Path, example: Tensor, images: Tensor, opset: int,
                keep_going: bool) -> dict[str, Any]:
    spec = get_format(fmt)
    if keep_going:
        try:
            spec.module.check(model)
        except ExportError as e:
            return {"format": fmt, "passed": None, "skipped": str(e)}
    try:
        return export_model(model, fmt, out, example, images, opset)
    except ExportError as e:
        if not keep_going:
            raise
        verified = next((r for r in _read_records(out / VERIFY_FILE) if r.get("format") == fmt), {})
        failed = verified if verified.get("passed") is False else {"format": fmt, "passed": False}
        return {**failed, "error": str(e)}


def _load_run(run: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    from ..runs import load_run  # pulls in data and config: imported only when a run is exported

    return load_run(run)


def model_image_shape(model: torch.nn.Module, input_size: Any = None) -> tuple[int, int, int]:
    """(C, H, W) the model takes. The patch embedding knows it even when `img_size` was overridden at creation
    (a run's data config describes the pretrained default); the run's input size is the fallback."""
    from ..models import patch_input_size

    shape = patch_input_size(model)
    if shape is not None:
        return shape
    if input_size is None:
        raise ConfigError("can't tell the model's input size", "the run's info needs an input_size")
    return image_shape(input_size)


def image_shape(input_size: Union[int, Sequence[int]]) -> tuple[int, int, int]:
    """(C, H, W) from a run's input size: 224, (224, 224) or (3, 224, 224)."""
    size = [input_size] if isinstance(input_size, int) else [int(s) for s in input_size]
    if len(size) == 1:
        return 3, size[0], size[0]
    if len(size) == 2:
        return 3, size[0], size[1]
    if len(size) == 3:
        return size[0], size[1], size[2]
    raise ConfigError(f"input size {input_size!r} is not H, (H, W) or (C, H, W)", "check the run's info")


def probe_images(shape: tuple[int, int, int], count: int = MIN_IMAGES, seed: int = 0) -> Tensor:
    """Deterministic synthetic images from smooth to noisy, (count, C, H, W), roughly unit scale.

    Verification needs agreement, not accuracy, but it must cover many token counts: smooth images have many
    alike patches (merged away, little attention to spare), noisy ones few, so a data-dependent compressor keeps
    a different number of tokens on each. Needs no data set.
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        grid = 1 + i % 8  # coarse random field: 1x1 (flat) .. 8x8 (blotchy)
        smooth = F.interpolate(torch.randn(1, c, grid, grid, generator=g), size=(h, w), mode="bilinear",
                               align_corners=False)
        noise = torch.randn(1, c, h, w, generator=g)
        alpha = i / max(1, count - 1)
        images.append((1.0 - alpha) * smooth + alpha * noise)
    return torch.cat(images)


# ---- small helpers -------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost chained exception (torch.onnx wraps the informative one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(model, "ltmpctl_compressor", None)
    return f"the {name} model" if name else "the model"


def _json_float(x: float) -> Optional[float]:
    """JSON has no inf/nan: a difference that isn't finite is recorded as null (and fails)."""
    return x if math.isfinite(x) else None
