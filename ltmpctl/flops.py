"""The one analytic FLOPs model: used by LTMP's FLOPs loss, by calibration and by every report.

Counts multiply-adds (MACs, one per multiply-add, as fvcore and the ViT papers' "GFLOPs" do) of what fvcore
counts on the reduced model: linear layers, matmuls, convolutions and LayerNorm (5 per element with affine, as
fvcore estimates). Elementwise ops, softmax, GELU, gathers and scatters are not counted (fvcore skips them).

Per block with n tokens entering attention and m entering the MLP (d width, h MLP hidden, a attention dim):
    attention  = 5nd (norm1) + 3nda (qkv) + 2n²a (q·kᵀ, attn·v) + nad (proj)  [+ 10na with qk_norm]
    merge      = |A|·|B|·a/H (cosine similarity of head-mean keys; merging compressors only)
    mlp        = 5md (norm2) + 2mdh (fc1, fc2)
Plus the patch embedding, the final norm on the tokens left, and the head(s) on the class (and dist) token.
Works on floats and on tensors (differentiable), so the loss and the report are the same formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

Number = Union[float, Tensor]
LN = 5  # fvcore's MACs per element of an affine LayerNorm


@dataclass(frozen=True)
class ViTShape:
    tokens: int  # tokens entering block 0, prefix included
    prefix: int  # class + distillation + register tokens
    dim: int  # width d
    attn_dim: int  # heads x head_dim
    heads: int
    mlp_hidden: int
    depth: int
    qk_norm: bool
    scale_norm: bool
    embed_macs: int  # patch embedding convolution (+ pre-norm)
    head_macs: int  # classifier head(s) on the prefix tokens


def _is_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.LayerNorm,)) or type(m).__name__ in {"LayerNorm", "RmsNorm"}


def vit_shape(model: torch.nn.Module) -> ViTShape:
    """Read the sizes the formula needs off a timm VisionTransformer (patched or not)."""
    pe = model.patch_embed
    n_patches = pe.num_patches
    conv = pe.proj
    embed = n_patches * conv.weight.numel()  # (out * in * kh * kw) per output position
    d = model.embed_dim
    tokens = n_patches + model.num_prefix_tokens
    if _is_norm(model.norm_pre):
        embed += LN * tokens * d
    if _is_norm(getattr(pe, "norm", None) or torch.nn.Identity()):
        embed += LN * n_patches * d
    head = model.head.weight.numel() if isinstance(model.head, torch.nn.Linear) else 0
    head_dist = getattr(model, "head_dist", None)
    if isinstance(head_dist, torch.nn.Linear):
        head += head_dist.weight.numel()
    blk = model.blocks[0]
    return ViTShape(
        tokens=tokens, prefix=model.num_prefix_tokens, dim=d, attn_dim=blk.attn.attn_dim,
        heads=blk.attn.num_heads, mlp_hidden=blk.mlp.fc1.out_features, depth=len(model.blocks),
        qk_norm=_is_norm(blk.attn.q_norm), scale_norm=_is_norm(blk.attn.norm),
        embed_macs=embed, head_macs=head,
    )


def attention_macs(s: ViTShape, n: Number) -> Number:
    macs = LN * n * s.dim + 3 * n * s.dim * s.attn_dim + 2 * n * n * s.attn_dim + n * s.attn_dim * s.dim
    if s.qk_norm:
        macs = macs + 2 * LN * n * s.attn_dim
    if s.scale_norm:
        macs = macs + LN * n * s.attn_dim
    return macs


def merge_macs(s: ViTShape, n: Number) -> Number:
    """Similarity matmul of the bipartite matching between the two halves of the non-prefix tokens."""
    half = (n - s.prefix) / 2
    return half * half * (s.attn_dim // s.heads)


def mlp_macs(s: ViTShape, m: Number) -> Number:
    return LN * m * s.dim + 2 * m * s.dim * s.mlp_hidden


def model_macs(s: ViTShape, n_attn: Sequence[Number], n_mlp: Sequence[Number], merging: bool = False) -> Number:
    """Total MACs for one image given the tokens entering each block's attention and MLP."""
    total: Number = s.embed_macs + s.head_macs + LN * n_mlp[-1] * s.dim  # final norm on what is left
    for n, m in zip(n_attn, n_mlp):
        total = total + attention_macs(s, n) + mlp_macs(s, m)
        if merging:
            total = total + merge_macs(s, n)
    return total


def base_macs(s: ViTShape) -> float:
    """MACs of the unreduced model."""
    return float(model_macs(s, [s.tokens] * s.depth, [s.tokens] * s.depth))


def block_table(s: ViTShape, n_attn: Sequence[float], n_mlp: Sequence[float], merging: bool) -> list[dict]:
    """Per-block rows for reports: tokens and MACs of attention (with merge overhead) and MLP, cumulative."""
    rows, cum = [], float(s.embed_macs)
    for i, (n, m) in enumerate(zip(n_attn, n_mlp)):
        a = float(attention_macs(s, n) + (merge_macs(s, n) if merging else 0.0))
        f = float(mlp_macs(s, m))
        cum += a + f
        rows.append({"block": i, "tokens_attn": float(n), "tokens_mlp": float(m),
                     "attn_macs": a, "mlp_macs": f, "cumulative_macs": cum})
    return rows


def is_merging(model: torch.nn.Module) -> bool:
    """Whether the model's blocks run bipartite matching (and so pay its similarity matmul)."""
    return any(getattr(b, "need_metric", False) for b in model.blocks)


def image_macs(model: torch.nn.Module, counts: Tensor) -> list[float]:
    """MACs of each image from its token counts (B, depth, 2), as `token_counts` reports them."""
    s, merging = vit_shape(model), is_merging(model)
    return [float(model_macs(s, c[:, 0].tolist(), c[:, 1].tolist(), merging)) for c in counts.cpu()]


def measured_ratio(model: torch.nn.Module, images: Tensor, batch_size: int = 64) -> float:
    """Mean over images of (MACs / unreduced MACs), from the tokens each image really keeps in an eval forward.

    1.0 for a model no compressor patched.
    """
    if not hasattr(model, "ltmpctl_compressor"):
        return 1.0
    from .compressor import token_counts

    macs: list[float] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(next(model.parameters()).device))
            macs += image_macs(model, token_counts(model))
    return sum(macs) / len(macs) / base_macs(vit_shape(model))


def padded_macs(s: ViTShape, n: Number, merging: bool, exported: bool = False) -> Number:
    """The part of a block's MACs that a padded batch computes at its widest image's count n: attention's two
    n x n products and the matching similarity. Every other layer is per token and runs on the real tokens
    only (`ltmpctl.tokens.pack`). `exported`: a traced graph of a padded batch (ONNX), which runs the whole
    attention half (norm1, qkv, proj too) padded and gathers the real tokens for the MLP only
    (`TokenBlock._mlp_gathers`)."""
    if exported:
        return attention_macs(s, n) + (merge_macs(s, n) if merging else 0.0)
    return 2 * n * n * s.attn_dim + (merge_macs(s, n) if merging else 0.0)


def executed_macs(model: torch.nn.Module, counts: Tensor, exported: bool = False) -> float:
    """Mean MACs per image that one batched eval forward with token counts `counts` (B, depth, 2) computes:
    each image's own MACs, with the padded part (`padded_macs`) of every block at the batch's widest count."""
    s, merging = vit_shape(model), is_merging(model)
    widest = counts[:, :, 0].amax(dim=0).tolist()  # tokens into each block's attention, widest image
    pad = sum(float(padded_macs(s, n, merging, exported)) for n in widest)
    if exported:  # the graph's merge sums, one-hot products at the widest image's counts
        mlp = counts[:, :, 1].amax(dim=0).tolist()
        pad += sum(float(b.onnx_merge_macs(int(n), int(m))) for b, n, m in zip(model.blocks, widest, mlp))
    own = [m - sum(float(padded_macs(s, n, merging, exported)) for n in c[:, 0].tolist()) + pad
           for m, c in zip(image_macs(model, counts), counts.cpu())]
    return sum(own) / len(own)


def batch_ratios(model: torch.nn.Module, images: Tensor, exported: bool = False) -> tuple[float, float]:
    """(mean per image, executed) FLOPs fractions of one batched eval forward over `images`; (1.0, 1.0) unpatched.

    The mean is `measured_ratio`'s (batching doesn't change what an image keeps). Executed is what the forward
    really computed per image (`executed_macs`): where images of a batch keep different counts (ltmp), attention's
    n x n products run padded to the widest image, so it is >= the mean, and equal at batch 1 and for
    static-count compressors. `exported`: what the exported graph (ONNX) computes on that batch instead of eager.
    """
    if not hasattr(model, "ltmpctl_compressor"):
        return 1.0, 1.0
    from .compressor import token_counts

    model.eval()
    with torch.no_grad():
        model(images.to(next(model.parameters()).device))
    counts = token_counts(model)  # (B, depth, 2)
    base = base_macs(vit_shape(model))
    return sum(image_macs(model, counts)) / len(counts) / base, executed_macs(model, counts, exported) / base


def fvcore_macs(model: torch.nn.Module, images: Tensor) -> float:
    """MACs per image counted by fvcore on a traced forward of `model` (in eval mode) over `images`.

    fvcore skips fused `scaled_dot_product_attention`, so attention must run unfused; the token-reducing
    forward computes its softmax explicitly whenever it needs importance, and `unfused_attention` covers the rest.
    """
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), unfused_attention(model):
        fca = FlopCountAnalysis(model.eval(), (images,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return fca.total() / images.shape[0]


class unfused_attention:
    """Context manager: turn timm's fused attention off on every Attention module, restore on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
        self.saved = [m.fused_attn for m in self.mods]

    def __enter__(self) -> None:
        for m in self.mods:
            m.fused_attn = False

    def __exit__(self, *exc: object) -> None:
        for m, v in zip(self.mods, self.saved):
            m.fused_attn = v
