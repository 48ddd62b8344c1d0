"""tome: Token Merging (Bolya et al., ICLR 2023), as facebookresearch/ToMe does it on timm.

Per block after attention: bipartite soft matching between alternating token sets A and B on the head-mean keys,
the r A-tokens with the most similar B partner merged into it (size-weighted average), proportional attention.
Unlike ToMe's own timm patch, LayerScale is kept, and every prefix token (distillation, registers) stays in front
instead of only the class token.

Eager inference of one image (C kernel built): attention stays the fused kernel and hands its keys over raw; one
kernel call takes their similarities, each A token's partner, ranks the A tokens and merges the r most similar
(`reduce_raw`). Batched, traced and training forwards run `reduce`.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ltmpctl.compressor import Compressor, Knob, Params, TokenBlock, per_block
from ltmpctl.flops import vit_shape
from ltmpctl.tokens import AttentionOut, ab_starts, ascending, fused_merge_prune, match, merge_rows, merge_top_raw


def parse_r(depth: int, r: int, inflect: float) -> list[int]:
    """ToMe's (r, inflect) schedule: linear from r*(1-inflect) to r*(1+inflect); inflect 0 = constant r."""
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(1, depth - 1)
    return [int(lo + step * i) for i in range(depth)]


class ToMeParams(Params):
    r: Union[int, list[int]] = Field(8, description="tokens merged per block: int or one per block")
    inflect: float = Field(0.0, ge=-1.0, le=1.0, description="ToMe schedule: -1 decreasing, 0 constant, +1 rising")
    prop_attn: bool = Field(True, description="proportional attention (log size bias on keys)")

    @field_validator("r", mode="before")
    @classmethod
    def _nonneg(cls, v: object) -> object:
        vals = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, int) and x < 0 for x in vals):
            raise ValueError("r must be >= 0")
        return v


class ToMeBlock(TokenBlock):
    need_metric = True
    r: int = 0

    def raw_probs(self, n: int) -> bool:
        """Batch 1: keys only, attention stays timm's fused kernel (`TokenBlock._forward_single`)."""
        return False

    def _merges(self, n: int) -> int:
        """Tokens merged in a sequence of n: r, at most half the non-prefix tokens."""
        return min(self.r, (n - self.num_prefix) // 2)

    def onnx_merge_macs(self, n: int, m: int) -> int:
        """Sizes and size-weighted features (C + 1 columns) of the r = n - m sources."""
        return n * (n - m) * (self.attn.qkv.in_features + 1)

    def reduce_raw(self, x: Tensor, size: Tensor, probs: Optional[Tensor], keys: Tensor) -> tuple[Tensor, Tensor]:
        r = self._merges(x.shape[1])
        return merge_top_raw(x, size, self.num_prefix, r, keys) if r > 0 else (x, size)

    def reduce(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        P = self.num_prefix
        B, N, C = x.shape
        r = self._merges(N)
        if r <= 0:
            return x, size, mask
        node_max, node_idx = match(a.metric, P, None)  # (B, NA)
        edge_idx = node_max.topk(node_max.shape[1], dim=-1).indices  # most similar first (argsort, portably)
        src_idx = edge_idx[:, :r]  # the r most similar A tokens are merged
        # Eager inference: the merge in one C call (same values); the torch form below for everything else.
        fused = fused_merge_prune(x.reshape(B * N, C), size.reshape(B * N, 1), P, B, node_idx=node_idx,
                                  src_order=src_idx)
        if fused is not None:
            return fused[0].view(B, N - r, C), fused[1].view(B, N - r, 1), mask
        unm_idx = ascending(edge_idx[:, r:])  # the rest keep their order
        dst_idx = node_idx.gather(1, src_idx)

        # Whole rows out of the flattened batch, by row index, not gathers and scatter_adds with an index expanded over
        # the features: ExecuTorch's portable kernels run those slowly (deit_tiny's tome .pte at batch 1 went from
        # 0.73 / 0.62 to 0.65 / 0.59 of the base's latency, two interleaved runs; the same logits).
        first_a, first_b = ab_starts(P)
        start = torch.arange(B, device=x.device).unsqueeze(1) * N  # (B, 1): each image's first row
        src_rows = (start + first_a + 2 * src_idx).reshape(-1)
        prefix = torch.arange(P, device=x.device).expand(B, P)
        dst = torch.arange(first_b, N, 2, device=x.device).expand(B, -1)
        rows = (torch.cat([prefix, first_a + 2 * unm_idx, dst], dim=1) + start).reshape(-1)  # prefix, unmerged A, B
        out = []
        # x * size and size each on their own: one (B, N, C + 1) tensor divided through a strided slice of it broke
        # the ONNX export (its decomposition made the next block's attention reshape a view of a transposed tensor).
        for t in (x * size, size):  # sources added to their B rows in src_idx's order, then the kept rows in order
            t = merge_rows(t, dst_idx, t.reshape(B * N, -1).index_select(0, src_rows).view(B, r, -1), P)
            out.append(t.reshape(B * N, -1).index_select(0, rows).view(B, N - r, -1))
        return out[0] / out[1], out[1], mask


class ToMe(Compressor):
    name = "tome"
    Params = ToMeParams
    block_class = ToMeBlock

    @classmethod
    def identity_params(cls) -> dict:
        return {"r": 0}

    def configure_block(self, block: TokenBlock, index: int, depth: int, params: ToMeParams) -> None:
        if isinstance(params.r, list):
            schedule = per_block(params.r, depth, "tome r")
        else:
            schedule = parse_r(depth, params.r, params.inflect)
        block.r = int(schedule[index])
        block.prop_attn = params.prop_attn

    def calibration_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        """ToMe's constant r, refined: step k gives the first k % depth blocks r + 1 and the rest r = k // depth,
        a ladder finer than r alone whose FLOPs fall with every step. With a non-zero `inflect` the recipe chose
        ToMe's schedule shape, so the knob is r itself under that shape."""
        depth = len(model.blocks)
        r_max = (vit_shape(model).tokens - model.num_prefix_tokens) // 2
        if params.get("inflect", 0.0):
            return Knob(lambda k: {"r": int(k)}, 0, r_max, integer=True, describe=lambda k: f"r={int(k)}")

        def schedule(k: float) -> dict[str, Any]:
            r, j = divmod(int(k), depth)
            return {"r": r if j == 0 else [r + 1] * j + [r] * (depth - j)}

        return Knob(schedule, 0, depth * r_max, integer=True, describe=lambda k: f"r per block {schedule(k)['r']}")
