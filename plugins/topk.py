"""topk: fixed-rate pruning of the least important tokens per block (a DynamicViT/EViT-style baseline).

Per block after attention: keep ceil(keep_rate * n) of the n non-prefix tokens with the highest importance (mean
attention received, or the class token's attention as in EViT); with `fuse`, the pruned tokens are folded into one
extra token, weighted by importance. Token counts depend only on the input length, so batching and export are plain.

Eager inference of one image without `fuse` (C kernel built): attention hands its probabilities over raw where the
block prunes (the fused kernel runs where it doesn't), and one kernel call computes importance and keeps the top
tokens (`reduce_raw`). Batched, traced and training forwards run `reduce`.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ltmpctl.compressor import Compressor, Knob, Params, TokenBlock, per_block
from ltmpctl.tokens import AttentionOut, ascending, keep_top_raw


class TopKParams(Params):
    keep_rate: Union[float, list[float]] = Field(0.7, description="fraction of non-prefix tokens kept per block")
    importance: Literal["mean", "cls"] = Field("mean", description="mean attention received, or class attention")
    fuse: bool = Field(False, description="fold pruned tokens into one token weighted by importance")

    @field_validator("keep_rate")
    @classmethod
    def _range(cls, v: object) -> object:
        vals = v if isinstance(v, list) else [v]
        if any(not (0.0 < float(x) <= 1.0) for x in vals):
            raise ValueError("keep_rate must be in (0, 1]")
        return v


class TopKBlock(TokenBlock):
    importance_mode = "mean"
    keep_rate: float = 1.0
    fuse: bool = False

    def _keep(self, n: int) -> int:
        """Non-prefix tokens kept of a sequence of n."""
        return math.ceil(self.keep_rate * (n - self.num_prefix))

    def raw_probs(self, n: int) -> Optional[bool]:
        """Batch 1 (`TokenBlock._forward_single`): the probabilities where this block prunes, else timm's fused
        attention kernel; `fuse` keeps the general form."""
        return None if self.fuse else self._keep(n) < n - self.num_prefix

    def reduce_raw(self, x: Tensor, size: Tensor, probs: Optional[Tensor], keys: Tensor) -> tuple[Tensor, Tensor]:
        if probs is None:  # nothing to prune (`raw_probs`)
            return x, size
        return keep_top_raw(x, size, self.num_prefix, self._keep(x.shape[1]), probs, self.importance_mode == "cls")

    def reduce(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        P = self.num_prefix
        B, N, C = x.shape
        keep = self._keep(N)
        if keep >= N - P:
            return x, size, mask
        imp = a.importance[:, P:]  # (B, N - P)
        top = ascending(imp.topk(keep, dim=1).indices)  # spatial order kept
        gather = lambda t, i: t.gather(1, i[..., None].expand(i.shape + t.shape[2:]))  # noqa: E731
        kept_x = gather(x[:, P:], top)
        if not self.fuse:  # every size is 1 (`uniform_size`): the first P + keep of them are the kept tokens' sizes
            return torch.cat([x[:, :P], kept_x], dim=1), size[:, :P + keep], mask
        # A tensor source, not the scalar False: jit tracing (TorchScript export, fvcore) rejects a bool scalar.
        dropped = torch.ones_like(imp, dtype=torch.bool).scatter(1, top, torch.zeros_like(top, dtype=torch.bool))
        # A weighted *average* (EViT sums raw class attention), so the fused token keeps the feature scale; its size
        # is the patches it stands for, which proportional attention then accounts for.
        w = imp.masked_fill(~dropped, 0.0)[..., None]  # (B, N - P, 1)
        fused_x = (w * x[:, P:]).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
        fused_s = (size[:, P:] * dropped[..., None]).sum(1, keepdim=True)
        return (torch.cat([x[:, :P], kept_x, fused_x], dim=1),
                torch.cat([size[:, :P], gather(size[:, P:], top), fused_s], dim=1), mask)


class TopK(Compressor):
    name = "topk"
    Params = TopKParams
    block_class = TopKBlock

    @classmethod
    def identity_params(cls) -> dict:
        return {"keep_rate": 1.0}

    def configure_block(self, block: TokenBlock, index: int, depth: int, params: TopKParams) -> None:
        block.keep_rate = float(per_block(params.keep_rate, depth, "topk keep_rate")[index])
        block.importance_mode = params.importance
        block.fuse = params.fuse
        if not params.fuse:  # nothing is merged, so every token stands for one patch in every block
            block.uniform_size = True

    def calibration_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        """One keep_rate for every block, 1 - s for s in [0, 0.999] (a block keeps at least one token)."""
        rate = lambda s: round(max(1e-3, 1.0 - s), 6)  # noqa: E731
        return Knob(lambda s: {"keep_rate": rate(s)}, 0.0, 0.999, describe=lambda s: f"keep_rate {rate(s):g}")
