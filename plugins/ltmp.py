"""ltmp: Learned Thresholds token Merging and Pruning (Bonnaerens & Dambre, TMLR 2023), as Mxbonn/ltmp does it.

Per block: attention (proportional) -> residual -> merge, then prune -> MLP, with two learned scalars per block.
- merge: A tokens (alternate positions, ToMe's split) whose best cosine similarity to a B token exceeds
  `merge_threshold` are merged into it (size-weighted); the destination's importance becomes the max of its sources.
- prune: tokens whose importance (attention received, mean over heads and queries) is below `prune_threshold`
  are dropped.

Train mode keeps every token in the tensor with a differentiable mask (straight-through sigmoid of
(value - threshold) / tau); attention is renormalised over alive keys. Eval mode really removes tokens.

Eval at batch 1 (eager) simply selects the kept tokens. Batched eval: images keep different numbers of tokens, so
after each block each image's kept tokens are moved to the front (order preserved) and the batch is padded to its
largest count; a boolean key mask keeps padding out of softmax, importance and matching (`ltmpctl.tokens`), and the
per-token layers run on the real tokens only (`LTMPBlock._forward_packed`). Each image therefore gets exactly what
batch 1 gives.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ltmpctl.compressor import Compressor, Knob, ParamGroup, Params, TokenBlock, per_block
from ltmpctl.flops import base_macs, model_macs, vit_shape
from ltmpctl.tokens import (
    AttentionOut,
    ab_starts,
    attention_core,
    attention_proj,
    best_partners,
    candidate_positions,
    compact,
    eager,
    fused_merge_prune,
    kernel_ready,
    match,
    merge_into,
    merge_prune_raw,
    merge_prune_raw_packed,
    merge_rows,
    onnx_products,
    pack,
    pack_heads,
    real_rows,
    scatter_amax,
    scatter_merge,
    serial,
    similarity,
    split_ab,
    threshold_mask,
    unpack,
    unpack_attention,
    unpack_qkv,
)

Thresholds = Union[float, list[float]]
MERGE_SPAN = 0.7  # calibration strength s = 1 -> merge_threshold 0.3
PRUNE_SPAN = 1.0  # s = 1 -> prune tokens below the first block's mean importance


def _in_unit(v: object) -> object:
    vals = v if isinstance(v, list) else [v]
    if any(not (0.0 <= float(x) <= 1.0) for x in vals):
        raise ValueError("thresholds must be in [0, 1]")
    return v


class LTMPParams(Params):
    merge_threshold: Thresholds = Field(0.9, description="cosine similarity above which tokens merge, per block")
    prune_threshold: Thresholds = Field(0.0, description="importance below which tokens are pruned, per block")
    tau: float = Field(0.1, gt=0.0, description="temperature of the straight-through threshold masks")

    _check_merge = field_validator("merge_threshold")(_in_unit)
    _check_prune = field_validator("prune_threshold")(_in_unit)


class LTMPBlock(TokenBlock):
    importance_mode = "mean"
    need_metric = True
    train_mask = True
    tau: float = 0.1

    def forward(self, x: Tensor, size: Tensor, mask: Optional[Tensor]):  # type: ignore[override]
        if self.training or not eager() or (x.dim() == 3 and x.shape[0] == 1 and mask is None):
            return super().forward(x, size, mask)  # batch 1: the kernel step where it serves, else `_reduce_single`
        return self._forward_packed(x, size, mask)

    def raw_probs(self, n: int) -> bool:
        """Batch 1 (`TokenBlock._forward_single`): importance needs the probabilities in every block. 30-31 aten
        calls a block where `_reduce_single`'s form made 57-58 (timm's block: 19-20): `latency_vs_flops.py`, torch
        batch 1, latency over the base's, deit_tiny 0.80-0.87 -> 0.75-0.81 and the demo 1.24-1.31 -> 1.08-1.11 (two
        runs each, 2-core AMD EPYC VM, when it came in, 2f4b15e)."""
        return True

    def reduce_raw(self, x: Tensor, size: Tensor, probs: Optional[Tensor], keys: Tensor) -> tuple[Tensor, Tensor]:
        return merge_prune_raw(x, size, self.num_prefix, *self._threshold_values(), probs, keys)

    def onnx_merge_macs(self, n: int, m: int) -> int:
        """`_reduce_eval` adds every A token, merged or not (x 0), with its size and prune flag (C + 2 columns) into
        the B tokens."""
        first_a, first_b = ab_starts(self.num_prefix)
        return len(range(first_b, n, 2)) * len(range(first_a, n, 2)) * (self.attn.qkv.in_features + 2)

    def _threshold_values(self) -> tuple[float, float]:
        """The two thresholds as Python floats, read again only when a threshold parameter is replaced, written to in
        place or given new data (`.data =`): `float()` of a tensor is a kernel call, twice a block otherwise."""
        m, p = self.merge_threshold, self.prune_threshold
        state = (m._version, p._version, m.data_ptr(), p.data_ptr())
        c = self.__dict__.get("_threshold_cache")
        if c is None or c[0] is not m or c[1] is not p or c[2] != state:
            c = self.__dict__["_threshold_cache"] = (m, p, state, (float(m.detach()), float(p.detach())))
        return c[3]

    def _forward_packed(self, x: Tensor, size: Tensor, mask: Optional[Tensor]):
        """Eager batched eval on packed tokens: x (T, C) and size (T, 1) hold only the batch's real tokens (each
        image's first `counts` positions of the padded mask (B, N)), so the per-token layers (norms, qkv, proj, MLP)
        and the merging cost the sum of the images' own counts. Only attention's N x N products run padded
        (B, N, *), the padding masked out; where the C kernel is built, importance and matching are reduced from the
        raw probabilities and keys image by image with the step (`merge_prune_raw_packed`), else as torch ops on the
        padded statistics. Hands on packed tokens; the model unpacks after the last block.
        """
        if x.dim() == 3 and mask is None:  # the first block, before any reduction: every token is real
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            x, size = x.flatten(0, 1), size.flatten(0, 1)  # packing all-real tokens: a view
        elif x.dim() == 3:  # a padded batch handed in
            rows = real_rows(mask)
            x, size = pack(x, mask, rows), pack(size, mask, rows)
        # No padding (e.g. the first block): attention needs no key mask, so no bias of zeros to add either.
        key_mask = None if x.shape[0] == mask.numel() else mask
        h = self.norm1(x)
        if kernel_ready(x):
            # The key bias comes out of the padded layout's C pass, from the packed sizes (`unpack_attention`), and
            # attention hands its probabilities and keys over raw for the kernel step (`merge_prune_raw_packed`).
            log_size = (size - 1.0).log1p() if self.size_bias else None  # `key_bias`'s eager form
            qkv, bias = unpack_attention(self.attn.qkv(h), mask, self.attn.num_heads, log_size)
            a = attention_core(self.attn, qkv, None, key_mask, self.num_prefix, self.importance_mode,
                               self.need_metric, self.size_bias, raw=True, bias=bias)
            x = x + self.drop_path1(self.ls1(attention_proj(self.attn, pack_heads(a.out, mask, tokens=x.shape[0]), h)))
            # A floor of prefix + 2 positions, so that the next block's A/B split has a token on each side.
            x, size, mask = merge_prune_raw_packed(x, size, self.num_prefix, *self._threshold_values(), a.probs,
                                                   a.keys, mask, self.num_prefix + 2, torch.get_num_threads())
        else:
            rows = real_rows(mask)
            qkv = unpack_qkv(self.attn.qkv(h), mask, self.attn.num_heads, rows)  # heads-major: no copies in attention
            a = attention_core(self.attn, qkv, unpack(size, mask, rows), key_mask, self.num_prefix,
                               self.importance_mode, self.need_metric, self.size_bias)
            x = x + self.drop_path1(self.ls1(attention_proj(self.attn, pack(a.out, mask, rows), h)))
            with serial(x, reduce_ops=True):
                x, size, mask = self._reduce_packed(x, size, mask, a)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, mask

    def _reduce_packed(self, x: Tensor, size: Tensor, mask: Tensor, a: AttentionOut):
        """Merge then prune on packed tokens, deciding on the padded (B, N) statistics (importance and metric, where
        the kernel's raw step is not built); same decisions, values and token order per image as batch 1
        (`_reduce_single`)."""
        P = self.num_prefix
        B, N = mask.shape
        scores = similarity(a.metric, P)  # padding rows and columns: the kernel reads each image's real ones
        fused = fused_merge_prune(x, size, P, B, scores=scores, merge_threshold=self.merge_threshold,
                                  importance=a.importance, prune_threshold=self.prune_threshold, mask=mask,
                                  min_width=P + 2)
        if fused is not None:
            return fused
        node_max, node_idx = best_partners(scores, P, mask)  # padding never matches
        merge = node_max > self.merge_threshold  # (B, NA)
        src_m, dst_m = split_ab(mask, P)
        cand_imp = _candidate_importance(a.importance, node_idx, merge, P)
        keep = torch.cat([mask[:, :P], src_m, dst_m], dim=1) & (cand_imp > self.prune_threshold)  # (B, N)
        # Padded position n of image b is packed row start[b] + n (real tokens come first in every image).
        counts = mask.sum(dim=1)
        start = counts.cumsum(0) - counts  # (B,)
        # The kept candidates, in the reference's order (prefix, unmerged A, B) per image, gathered first: the
        # size weighting, the merge sums and the division then run on the kept rows only, in place, with the
        # reference's arithmetic ((x * size + sources) / total size) on every kept token.
        cand = candidate_positions(N, P, x.device)  # prefix, then A's positions, then B's
        kept_rows = (start.unsqueeze(1) + cand)[keep]  # (T',)
        size_out = size.index_select(0, kept_rows)
        x_out = x.index_select(0, kept_rows).mul_(size_out)
        b, i = merge.nonzero(as_tuple=True)  # ascending (b, i): each destination adds its sources in order
        j = node_idx[b, i]  # each source's B token
        # Where each kept candidate landed in x_out; a source whose destination was pruned goes with it.
        landed = keep.reshape(-1).cumsum(0) - 1
        dst_cand = b * N + (P + src_m.shape[1]) + j  # the destination's candidate index, flattened over images
        live = keep.reshape(-1)[dst_cand]
        b, i, dst_out = b[live], i[live], landed[dst_cand[live]]
        src_rows = start[b] + cand[P + i]  # A token i's packed row
        src_size = size.index_select(0, src_rows)  # (M, 1)
        # scatter_add, not index_add_: the same sums in the same order, but index_add_ on a CPU with 2 threads
        # costs ~2 us per merged token (15x its single-thread time); scatter_add runs as one kernel.
        x_out.scatter_add_(0, dst_out.unsqueeze(1).expand(-1, x.shape[1]), x.index_select(0, src_rows) * src_size)
        size_out.scatter_add_(0, dst_out.unsqueeze(1), src_size)
        kept = keep.sum(dim=1)
        width = max(int(kept.max()), P + 2)
        mask = torch.arange(width, device=x.device) < kept.unsqueeze(1)
        return x_out.div_(size_out), size_out, mask

    def reduce(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        if self.training:
            return self._reduce_train(x, size, mask, a)
        return self._reduce_eval(x, size, mask, a)

    def _reduce_train(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        P = self.num_prefix
        B, N, _ = x.shape
        assert mask is not None  # train_mask: the block made one before attention
        node_max, node_idx = match(a.metric, P, mask)
        merge = threshold_mask(node_max, self.merge_threshold, self.tau)  # (B, NA), STE
        src_m, dst_m = split_ab(mask, P)
        unm = torch.where(src_m.bool(), 1.0 - merge, src_m)  # dead tokens stay dead
        # Features are merged with the detached mask: the merge threshold learns through the mask's effect
        # on later attention and on the FLOPs term, as in the reference.
        w = merge.detach()
        xs = x * size
        (src_x, dst_x), (src_s, dst_s) = split_ab(xs, P), split_ab(size, P)
        src_imp, dst_imp = split_ab(a.importance, P)
        dst_x = scatter_merge(dst_x, node_idx, src_x * w[..., None])
        dst_s = scatter_merge(dst_s, node_idx, src_s * w[..., None])
        dst_imp = scatter_amax(dst_imp, node_idx, src_imp * w)
        size = torch.cat([size[:, :P], src_s, dst_s], dim=1)
        x = torch.cat([xs[:, :P], src_x, dst_x], dim=1) / size
        mask = torch.cat([mask[:, :P], unm, dst_m], dim=1)
        imp = torch.cat([a.importance[:, :P], src_imp, dst_imp], dim=1)
        prune = threshold_mask(imp, self.prune_threshold, self.tau)
        mask = torch.where(mask.bool(), prune, mask)
        return x, size, mask

    def _reduce_single(self, x: Tensor, size: Tensor, a: AttentionOut):
        """Eager batch 1 without the C kernel (`TokenBlock._forward_single` has it): no padding, so no mask to carry;
        tokens are simply selected (index_select), never padded.

        Same decisions and values as the batched forms (`_reduce_packed`, `_reduce_eval`). ~20 small ops, none of
        which wakes the CPU thread pool at these sizes (the row accumulate and the topk compaction of
        `_reduce_eval` exist for the export runtimes).
        """
        P = self.num_prefix
        N = x.shape[1]
        scores = similarity(a.metric, P) if N - P >= 2 else None  # else nothing to match: prune only
        t = torch.cat([x * size, size], dim=-1)  # (1, N, C + 1): merged alike, gathered alike
        if scores is None:  # an image pruned to its prefix tokens and one more
            kept = (a.importance[0] > self.prune_threshold).nonzero().squeeze(1)
        else:
            node_max, node_idx = best_partners(scores, P, None)
            merge = node_max > self.merge_threshold  # (1, NA)
            src_t, dst_t = split_ab(t, P)
            # Into t's own B rows (a strided view): merged sources add to their destination, the others add 0.
            scatter_merge(dst_t, node_idx, torch.where(merge.unsqueeze(-1), src_t, 0.0), inplace=True)
            cand_imp = _candidate_importance(a.importance, node_idx, merge, P)  # reference order: prefix, A, B
            # The kept candidates, in that order, gathered from t in one go.
            kept = candidate_positions(N, P, x.device)[(cand_imp[0] > self.prune_threshold).nonzero().squeeze(1)]
        t = t.index_select(1, kept)
        size = t[..., -1:]
        return t[..., :-1] / size, size, None

    def _reduce_eval(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        """Eager batch 1 (`_reduce_single`), else the traced form that exported graphs run (ONNX, ExecuTorch): padded
        (B, N) tensors, a bool padding mask after the first block; the same decisions and token order per image.

        Built for the runtimes' per-node costs: size-weighted features, sizes and the prune test merge as one
        tensor in one row-indexed accumulate (`merge_rows`; in the ONNX export a one-hot product into the B rows,
        `onnx_products`), and one topk orders the kept candidates (`compact`).
        A destination is kept when its own importance or a merged source's is above the threshold, which is the
        reference's test on their maximum, so the flags merge as sums like the rest. onnxruntime, deit_tiny, ltmp's
        latency over the base's: 0.746 -> 0.687 at batch 1 (60 interleaved rounds) and 0.565 -> 0.503 at batch 32
        (20) against a feature-expanded scatter (ONNX ScatterElements), a dense scatter-max and a cumsum compaction.
        """
        P = self.num_prefix
        if mask is None and x.shape[0] == 1 and eager():
            return self._reduce_single(x, size, a)
        C = x.shape[-1]
        scores = similarity(a.metric, P)  # (B, NA, NB)
        node_max, node_idx = best_partners(scores, P, mask)  # padding never matches
        merge = node_max > self.merge_threshold  # (B, NA)
        flag = a.importance > self.prune_threshold  # (B, N): each token's own prune test (prefix: +inf, kept)
        if mask is not None:
            flag = flag & mask
        t = torch.cat([x * size, size, flag.unsqueeze(-1).to(x.dtype)], dim=-1)  # (B, N, C + 2)
        t_a, t_b = split_ab(t, P)
        src = t_a * merge.unsqueeze(-1).to(x.dtype)
        if onnx_products.on:  # the candidates laid out in their order: the one-hot product covers the B rows only
            t_b = merge_into(t_b, node_idx, src)
            t, positions = torch.cat([t[:, :P], t_a, t_b], dim=1), None
        else:
            t = merge_rows(t, node_idx, src, P)
            t_b, positions = split_ab(t, P)[1], candidate_positions(x.shape[1], P, x.device)
        # Candidates in the reference's order: prefix, unmerged A, B (merged into).
        keep = torch.cat([flag[:, :P], (t_a[..., -1] > 0) & ~merge, t_b[..., -1] > 0], dim=1)
        mask, (t,) = compact(keep, t, min_tokens=P + 2, positions=positions)
        size = t[..., C:C + 1]
        return t[..., :C] / size, size, mask


def _candidate_importance(imp: Tensor, node_idx: Tensor, merge: Tensor, P: int) -> Tensor:
    """Importance (B, N) of the merge's candidates in the reference's order (prefix, A, B): a merged A token gets
    -inf (never kept), a B token the max of its own and its merged sources' (eager only: scatter_reduce)."""
    src_imp, dst_imp = split_ab(imp, P)
    dst_imp = dst_imp.scatter_reduce(1, node_idx, torch.where(merge, src_imp, -math.inf), "amax")
    return torch.cat([imp[:, :P], torch.where(merge, -math.inf, src_imp), dst_imp], dim=1)


class LTMP(Compressor):
    name = "ltmp"
    Params = LTMPParams
    block_class = LTMPBlock
    learnable = True
    data_dependent = True

    @classmethod
    def identity_params(cls) -> dict:
        return {"merge_threshold": 1.0, "prune_threshold": 0.0}

    def configure_block(self, block: TokenBlock, index: int, depth: int, params: LTMPParams) -> None:
        merge = per_block(params.merge_threshold, depth, "ltmp merge_threshold")[index]
        prune = per_block(params.prune_threshold, depth, "ltmp prune_threshold")[index]
        dev = block.norm1.weight.device
        block.merge_threshold = torch.nn.Parameter(torch.tensor(float(merge), device=dev))
        block.prune_threshold = torch.nn.Parameter(torch.tensor(float(prune), device=dev))
        block.tau = params.tau

    # ---- the stage contract ----------------------------------------------------------------------------------

    def calibration_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        """A shared strength s in [0, 1] sets every block's thresholds: merge_threshold = 1 - s * MERGE_SPAN,
        prune_threshold = s * PRUNE_SPAN / N (N = tokens at the first block, so 1/N is the mean importance there).
        The split lets merging (cheaper in accuracy, as ToMe and the LTMP paper found) do most of the work at mild
        targets, with pruning joining in as s grows; fine-tuning then moves each block's pair on its own."""
        tokens = vit_shape(model).tokens

        def params_at(s: float) -> dict[str, Any]:
            return {"merge_threshold": round(1.0 - s * MERGE_SPAN, 6),
                    "prune_threshold": round(s * PRUNE_SPAN / tokens, 8)}

        return Knob(params_at, 0.0, 1.0, describe=lambda s: f"shared strength s={s:.4f}")

    def param_groups(self, model: torch.nn.Module) -> list[ParamGroup]:
        """The two thresholds of every block, at the LTMP paper's learning rates (prune 1000x smaller)."""
        return [ParamGroup("merge", [b.merge_threshold for b in model.blocks], 5e-3),
                ParamGroup("prune", [b.prune_threshold for b in model.blocks], 5e-6)]

    def loss(self, model: torch.nn.Module, task_loss: Tensor, target: float, lam: float) -> tuple[Tensor, Tensor]:
        """task loss + lam * (flops_ratio - target)^2; returns (total, ratio)."""
        ratio = self.flops_ratio(model)
        return task_loss + lam * (ratio - target) ** 2, ratio

    def after_step(self, model: torch.nn.Module) -> None:
        """Keep thresholds in [0, 1]."""
        with torch.no_grad():
            for b in model.blocks:
                b.merge_threshold.clamp_(0.0, 1.0)
                b.prune_threshold.clamp_(0.0, 1.0)

    def trained_params(self, model: torch.nn.Module) -> dict[str, Any]:
        return {
            "merge_threshold": [float(b.merge_threshold.detach()) for b in model.blocks],
            "prune_threshold": [float(b.prune_threshold.detach()) for b in model.blocks],
        }

    def refit_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        """Every block's learned thresholds moved by one shared amount (in the calibration knob's units, kept in
        [0, 1]) until eval FLOPs hit the target again.

        Fine-tuning learns how the thresholds relate across blocks, but its FLOPs term sees train-mode masks (tokens
        kept in the tensor, importance averaged over every row, as the reference trains), and a short fine-tune can
        end away from the target; the inference model is what `--target` promises, so its budget is restored.
        """
        tokens = vit_shape(model).tokens
        clamp = lambda v: min(1.0, max(0.0, v))  # noqa: E731

        def params_at(shift: float) -> dict[str, Any]:
            return {"merge_threshold": [clamp(m - shift * MERGE_SPAN) for m in params["merge_threshold"]],
                    "prune_threshold": [clamp(p + shift * PRUNE_SPAN / tokens) for p in params["prune_threshold"]]}

        return Knob(params_at, -1.0, 1.0, describe=lambda k: f"shared shift {k:+.4f} of the learned thresholds")

    @staticmethod
    def flops_ratio(model: torch.nn.Module) -> Tensor:
        """Kept fraction of the model's MACs from the last train-mode forward's batch-mean masks (differentiable)."""
        s = vit_shape(model)
        kept = [m.mean() * s.tokens for m in model.ltmpctl_masks]  # tokens after each block
        n_attn = [torch.as_tensor(float(s.tokens))] + kept[:-1]
        return model_macs(s, n_attn, kept, merging=True) / base_macs(s)
