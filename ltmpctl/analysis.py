"""FLOPs analysis of a model and its compressed copy: per-block tokens and MACs from the one formula
(`ltmpctl.flops`), cross-checked against fvcore's count on the reduced model.

Everything is per image. A data-dependent compressor (LTMP) keeps a different number of tokens in each image, and
attention is quadratic in tokens, so MACs are computed per image and then averaged; the formula on the mean token
counts (what LTMP's training loss optimises) is reported beside it.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .compressor import token_counts
from .flops import ViTShape, base_macs, block_table, fvcore_macs, image_macs, is_merging, model_macs, vit_shape

TOLERANCE = 0.02  # largest accepted |analytic - fvcore| / fvcore
G = 1e9
FVCORE_SKIPS = (
    "GMACs: one multiply-add counts 1 (fvcore calls it a FLOP). fvcore counts linear layers, matmuls, convolutions "
    "and LayerNorm; it skips elementwise ops, softmax, GELU, gathers/scatters and fused scaled_dot_product_attention "
    "(attention is traced unfused here, as two matmuls)."
)
QUANTILES = (0.1, 0.5, 0.9)


def analyze_flops(base: torch.nn.Module, compressed: Optional[torch.nn.Module], images: Tensor,
                  data_dependent: bool) -> dict[str, Any]:
    """Per-block tokens and GMACs of `base` (and `compressed`) on `images` (N, C, H, W), totals, the FLOPs ratio,
    and each model's analytic total checked against fvcore.

    Data-dependent compressors are traced by fvcore once per image at batch 1: a batched forward pads every image
    to the batch's largest token count, so a batched trace would count the padding.
    """
    models = [m for m in (base, compressed) if m is not None]
    training = [m.training for m in models]  # counted in eval mode; a caller mid-fine-tune gets its mode back
    try:
        result: dict[str, Any] = {
            "unit": "GMACs", "images": int(images.shape[0]), "tolerance": TOLERANCE, "fvcore_skips": FVCORE_SKIPS,
            "base": _base_section(base, vit_shape(base), images),
        }
        if compressed is not None:
            section = _compressed_section(compressed, images, data_dependent)
            result["compressed"] = section
            result["flops_ratio"] = section["total_gmacs"] / result["base"]["total_gmacs"]
    finally:
        for m, mode in zip(models, training):
            m.train(mode)
    result["ok"] = all(result[k]["check"]["ok"] for k in ("base", "compressed") if k in result)
    return result


def _base_section(model: torch.nn.Module, shape: ViTShape, images: Tensor) -> dict[str, Any]:
    full = [float(shape.tokens)] * shape.depth
    rows = _gmacs_rows(block_table(shape, full, full, merging=False))
    analytic = base_macs(shape)
    fv = _fvcore(model, images)
    return {
        "compressor": None, "params": {}, "blocks": rows, **_ends(shape, rows, analytic),
        "check": _check(analytic, analytic, fv, [_rel(analytic, fv)], f"one batch of {images.shape[0]}"),
    }


def _compressed_section(model: torch.nn.Module, images: Tensor, data_dependent: bool) -> dict[str, Any]:
    shape = vit_shape(model)
    merging = is_merging(model)
    if data_dependent:
        counts, measured = _per_image(model, images)
        runs = f"per image at batch 1 ({images.shape[0]} traces)"
    else:
        counts = _counts(model, images)
        measured = [_fvcore(model, images)] * images.shape[0]
        runs = f"one batch of {images.shape[0]}"
    per_image = image_macs(model, counts)
    analytic = sum(per_image) / len(per_image)
    mean = counts.mean(dim=0)  # (depth, 2)
    at_mean = float(model_macs(shape, mean[:, 0].tolist(), mean[:, 1].tolist(), merging=merging))
    fv = sum(measured) / len(measured)
    rows = _mean_rows(shape, counts, merging)
    if data_dependent:
        _add_quantiles(rows, counts)
    diffs = [_rel(a, m) for a, m in zip(per_image, measured)]
    return {
        "compressor": getattr(model, "ltmpctl_compressor", None), "params": getattr(model, "ltmpctl_params", {}),
        "merging": merging, "data_dependent": data_dependent, "blocks": rows, **_ends(shape, rows, analytic),
        "check": _check(analytic, at_mean, fv, diffs, runs),
    }


def _counts(model: torch.nn.Module, images: Tensor) -> Tensor:
    """Tokens into attention / MLP per image and block from one eval forward: (N, depth, 2), float."""
    with torch.no_grad():
        model.eval()(images.to(_device(model)))
    return token_counts(model).detach().float().cpu()


def _per_image(model: torch.nn.Module, images: Tensor) -> tuple[Tensor, list[float]]:
    """Counts and fvcore MACs of each image alone, so both describe the very same batch-1 forward."""
    counts, measured = [], []
    for i in range(images.shape[0]):
        one = images[i:i + 1]
        counts.append(_counts(model, one)[0])
        measured.append(_fvcore(model, one))
    return torch.stack(counts), measured


def _fvcore(model: torch.nn.Module, images: Tensor) -> float:
    # The tracer warns about data-dependent shapes (token counts); the trace only serves this one count.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fvcore_macs(model, images.to(_device(model))))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean_rows(shape: ViTShape, counts: Tensor, merging: bool) -> list[dict[str, Any]]:
    """Per-block rows averaged over images (MACs per image first: the attention term is quadratic in tokens)."""
    tables = [block_table(shape, c[:, 0].tolist(), c[:, 1].tolist(), merging) for c in counts]
    keys = ("tokens_attn", "tokens_mlp", "attn_macs", "mlp_macs", "cumulative_macs")
    mean = [{"block": i, **{k: sum(t[i][k] for t in tables) / len(tables) for k in keys}}
            for i in range(shape.depth)]
    return _gmacs_rows(mean)


def _gmacs_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"block": r["block"], "tokens_attn": r["tokens_attn"], "tokens_mlp": r["tokens_mlp"],
             "attn_gmacs": r["attn_macs"] / G, "mlp_gmacs": r["mlp_macs"] / G,
             "cumulative_gmacs": r["cumulative_macs"] / G} for r in rows]


def _add_quantiles(rows: list[dict[str, Any]], counts: Tensor) -> None:
    """p10/p50/p90 over images of the tokens entering each block's attention and MLP."""
    # "nearest": a token count an image actually had, not an interpolation between two.
    q = torch.quantile(counts, torch.tensor(QUANTILES), dim=0, interpolation="nearest")  # (3, depth, 2)
    for i, row in enumerate(rows):
        for j, p in enumerate(QUANTILES):
            tag = f"p{round(p * 100)}"
            row[f"tokens_attn_{tag}"] = float(q[j, i, 0])
            row[f"tokens_mlp_{tag}"] = float(q[j, i, 1])


def _ends(shape: ViTShape, rows: list[dict[str, Any]], total: float) -> dict[str, float]:
    """Patch embedding, what follows the last block (final norm, head) and the total, in GMACs."""
    return {"embed_gmacs": shape.embed_macs / G, "head_gmacs": total / G - rows[-1]["cumulative_gmacs"],
            "total_gmacs": total / G}


def _rel(analytic: float, measured: float) -> float:
    return (analytic - measured) / measured if measured else float("inf")


def _check(analytic: float, at_mean: float, measured: float, diffs: list[float], runs: str) -> dict[str, Any]:
    rel = _rel(analytic, measured)
    rel_mean = _rel(at_mean, measured)
    worst = max(diffs, key=abs)
    return {
        "analytic_gmacs": analytic / G, "analytic_mean_counts_gmacs": at_mean / G, "fvcore_gmacs": measured / G,
        "rel_diff": rel, "rel_diff_mean_counts": rel_mean, "max_image_rel_diff": worst, "fvcore_runs": runs,
        "ok": max(abs(rel), abs(rel_mean), abs(worst)) <= TOLERANCE,
    }
