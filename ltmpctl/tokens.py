"""Shared token operations: attention with token sizes and masks, importance, bipartite matching, merging, compaction.

Pure functions on tensors; every compressor builds on these. Notation: x (B, N, C) tokens with P prefix tokens
(class, distillation, register) in front, size (B, N, 1) = how many original patches each token stands for.

Masks come in two kinds:
- float (B, N) in train mode (LTMP): tokens stay in the tensor, mask 0 means "gone"; the mask carries gradients.
- bool (B, N) in eval mode: True = a real token, False = padding. Used when images of one batch keep different
  numbers of tokens: each image's tokens are compacted to the front and the rest padded, and padding is excluded
  from every reduction (softmax keys, importance rows, matching), so a batch gives the same answer per image as
  batch 1.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from . import _kernels  # C, built at install where a compiler is found (setup.py)
except ImportError:  # none: the torch forms serve, with the same values
    _kernels = None

# Reference LTMP adds this to the masked softmax in training, for numerical stability.
TRAIN_SOFTMAX_EPS = 1e-5


class AttentionOut(NamedTuple):
    out: Tensor  # (B, N, C) attention branch output (before LayerScale / drop path)
    importance: Optional[Tensor]  # (B, N) mean attention received; +inf on prefix tokens
    metric: Optional[Tensor]  # (B, N, head_dim) keys averaged over heads (ToMe's similarity metric)
    # `attention_core(raw=True)`: the statistics unreduced, for the C kernel (`merge_prune_raw_packed`) in place of the
    # two above: probabilities (B, h, N, N) and keys (B, h, N, head_dim).
    probs: Optional[Tensor] = None
    keys: Optional[Tensor] = None


def kernel_ready(x: Tensor) -> bool:
    """Whether the C kernel (`fused_merge_prune`) serves a reduction step on x: built, and an eager inference forward
    on float32 CPU tensors (a forward that records gradients keeps the torch forms). Under a Python dispatch mode (a
    FLOP counter such as torch's `FlopCounterMode`, an op tracer) the torch forms run too, same values: the kernel's
    products (LTMP's similarities at batch 1) would be invisible to it."""
    return (_kernels is not None and eager() and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad) and torch._C._len_torch_dispatch_stack() == 0)


def eager() -> bool:
    """True in a plain eager forward: not under torch.export (ONNX, ExecuTorch), jit tracing (fvcore, TorchScript)
    or torch.compile. Only then may token code branch on tensor values in Python and use kernels that the export
    runtimes lack (scatter_reduce); the traced forms keep the portable ops, which the exported files are verified on.
    """
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


# Blocks whose token tensors hold up to this many values (B x N x C) run on one thread, whole; see `serial`.
SERIAL_ELEMENTS = 1 << 14
# ... and the reduction step (matching, merging, pruning, compaction) up to this many: it has no product worth a
# second thread.
SERIAL_REDUCE_ELEMENTS = 1 << 20


class serial:  # noqa: N801 (used as a function: `with serial(x):`)
    """Run what follows on one thread when the tokens `x` are few (eager only; a no-op elsewhere).

    `x`: the token tensor, or its number of values. A compressed model (`ltmpctl.compressor.CompressedViT`) runs each
    block in this scope on the tokens entering it, and its patch embedding and final norm on the token count they
    make: with OpenMP's passive waiting (ltmpctl's default, shared/SETUP.md) every kernel that goes parallel pays for
    waking the second thread, and at a few thousand token values that wake-up is most of the kernel. On a 2-core
    machine (AMD EPYC VM, 2026-12-08), one timm block at batch 1, one thread against two: deit_tiny's width (192) over
    197 / 150 / 120 / 100 / 85 / 60 / 40 / 20 tokens 1.16 / 1.11 / 0.97 / 0.94 / 0.89 / 0.72 / 0.63 / 0.53 the time
    (one thread wins from ~110 tokens down, 21k values); the demo's (128 wide, 4 heads) over 50 / 25 tokens 0.52 /
    0.40; single kernels (`benchmarks/serial_scope.py --kernels`): the (98 x 64) @ (64 x 98) matching product 27 us
    on one thread against 116 on two, a softmax over (3, 100, 100) 31 against 74. The bound, 16k values (deit_tiny's
    blocks of up to 85 tokens at batch 1, the demo's batches of up to 2), keeps clear of the break-even; before, only
    the compressors' own attention core and steps took it and timm's layers kept the caller's count (the demo's
    batch-1 forward then ran at the base's speed: its blocks' wake-ups do not shrink with the tokens).
    Switching costs well under a microsecond (a class, not a generator context manager). The values are the
    threaded run's to rounding, and the tokens kept the same (`tests/test_compressors.py`): norms, softmax, attention
    and the kernels give bitwise the same values on one thread, but MKL multiplies matrices of a dozen rows or fewer
    in another order there (1e-5 to 4e-5 apart on unit-scale operands, as on timm's model run on one thread). The
    count is process-wide: another Python thread running torch ops meanwhile would run them on one thread too.

    `reduce_ops`: the scope of a reduction step (`SERIAL_REDUCE_ELEMENTS`). Its ops are elementwise, indexing and
    (B, N/2, N/2) products, which a second thread speeds up only on much larger tensors than a block's layers: on a
    2-core Xeon VM a 40k-element multiply takes 5 us on one thread and 73 us on two, break-even is at 0.3-1M
    elements, and deit_tiny's matching at batch 32 took 1139 us threaded vs 747 on one (the demo at batch 64: 861
    vs 288), so batched forwards reduce on one thread up to about a million token values.
    """

    __slots__ = ("_restore",)

    def __init__(self, x: Union[Tensor, int], reduce_ops: bool = False) -> None:
        # eager() first: under export the sizes are symbolic, and comparing them would add a guard on the batch.
        n = torch.get_num_threads() if eager() else 1
        bound = SERIAL_REDUCE_ELEMENTS if reduce_ops else SERIAL_ELEMENTS
        # The caller's count, or 0: nothing to switch (the size is only compared once n says eager).
        self._restore = n if n > 1 and (x if isinstance(x, int) else x.numel()) <= bound else 0

    def __enter__(self) -> None:
        if self._restore:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self._restore:
            torch.set_num_threads(self._restore)


def attention(
    attn: torch.nn.Module,
    x: Tensor,
    size: Tensor,
    mask: Optional[Tensor],
    num_prefix: int,
    importance: Optional[str],
    need_metric: bool,
    prop_attn: bool = True,
) -> AttentionOut:
    """timm `Attention` with proportional attention, token masks and the statistics token reduction needs.

    Reuses the module's own qkv / q_norm / k_norm / attn_drop / norm / gate / proj / proj_drop; only the
    softmax changes (a `log(size)` bias on keys and the mask), so with size 1 and no mask it is timm's attention.
    `importance`: None (not needed), "mean" (attention received from all queries) or "cls" (from the class token).
    """
    core = attention_core(attn, attn.qkv(x), size, mask, num_prefix, importance, need_metric, prop_attn)
    return core._replace(out=attention_proj(attn, core.out, x))


def attention_proj(attn: torch.nn.Module, o: Tensor, x: Tensor) -> Tensor:
    """The output side of timm's `Attention` on the heads' concatenated output o (..., attn_dim); x its input
    (for the gate of gated variants). Works on padded (B, N, *) and on packed (T, *) tokens alike."""
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(x).sigmoid()
    o = attn.proj(o)
    return attn.proj_drop(o) if attn.training else o  # dropout: the identity in eval (one op less a block)


def attention_core(
    attn: torch.nn.Module,
    qkv: Tensor,
    size: Tensor,
    mask: Optional[Tensor],
    num_prefix: int,
    importance: Optional[str],
    need_metric: bool,
    prop_attn: bool = True,
    raw: bool = False,
    bias: Optional[Tensor] = None,
) -> AttentionOut:
    """`attention` from the qkv projection (B, N, 3 * attn_dim), or `unpack_qkv`'s (B, N, 3, h, head_dim), on:
    `out` is the heads' output (B, N, attn_dim) before `attention_proj`. `raw` (eval, importance "mean"): the
    probabilities and keys are handed over as they are (`AttentionOut.probs` / `.keys`) instead of the importance and
    metric, for the C kernel to reduce, and `out` as the heads left it, (B, h, N, head_dim), for `pack_heads`.
    size None: `bias` is the key bias, made already (`unpack_attention`; None: there is none)."""
    B, N = qkv.shape[:2]
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = qkv.reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    fast = not attn.training and eager()
    if size is not None:
        bias = key_bias(size, mask, prop_attn, fast)  # (B, 1, 1, N) or None

    imp = None
    if (importance is None and not raw and mask is None and attn.fused_attn
            and not (fast and explicit_wins(B, h, N, hd))):
        # Fast path (tome, identity): the fused kernel, nothing but the output needed.
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        probs = attention_probs(q, k, attn.scale, bias, mask, attn.training, fast)  # (B, h, N, N)
        if raw:
            pass  # reduced by the kernel
        elif importance == "cls":
            imp = prefix_inf(probs[:, :, 0, :].mean(1), num_prefix, fast)
        elif importance is not None:
            imp = received_attention(probs, mask, num_prefix, fast)
        o = heads_matmul(attn.attn_drop(probs) if attn.training else probs, v)  # dropout: the identity in eval
    if raw:
        return AttentionOut(o, None, None, probs, k)
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    # ToMe's metric is the head-mean of the keys; it only enters through cosine similarity, which is scale-free, so
    # the head sum serves (the mean's extra division makes it twice as slow on this strided view of qkv).
    metric = k.sum(1) if need_metric else None
    return AttentionOut(o, imp, metric)


def attention_single(attn: torch.nn.Module, qkv: Tensor, size: Optional[Tensor], probs: bool = True
                     ) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Eager inference attention of one unpadded image that keeps its statistics raw, for the C kernel to reduce
    (`merge_prune_raw`, `merge_top_raw`, `keep_top_raw`): qkv (1, N, 3 * attn_dim), size (1, N, 1) for the log(size)
    key bias or None for none. Returns the heads' output (1, N, attn_dim) before `attention_proj`, the probabilities
    (h, N, N) (None when `probs` is False: the fused kernel runs where timm's would) and the keys (h, N, head_dim).

    `attention_core`'s batch-1 products with none of its general layout handling: the same kernels on the same
    operands, so the same values.
    """
    N, h, hd = qkv.shape[1], attn.num_heads, attn.head_dim
    if not probs and attn.fused_attn:
        q, k, v = qkv.view(1, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (1, h, N, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None if size is None else (size - 1.0).log1p().view(1, 1, 1, N)  # key_bias's eager form
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(1, N, attn.attn_dim), None, k[0]
    q, k, v = qkv.view(N, 3, h, hd).permute(1, 2, 0, 3).unbind(0)  # (h, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if size is None:
        logits = torch.baddbmm(_zero(q), q, k.transpose(1, 2), alpha=attn.scale, beta=0.0)
    else:  # key_bias's eager form
        logits = torch.baddbmm((size - 1.0).log1p().view(1, 1, N), q, k.transpose(1, 2), alpha=attn.scale)
    p = logits.softmax(dim=-1)  # inference: attn_drop is the identity
    return torch.bmm(p, v).transpose(0, 1).reshape(1, N, attn.attn_dim), p, k


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    """A (1, 1, 1) zero of `like`'s dtype and device, made once (eager only): baddbmm's ignored input (beta 0)."""
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        with torch.inference_mode(False):  # a normal tensor: later forwards may run with autograd on
            z = _ZEROS[key] = torch.zeros(1, 1, 1, dtype=like.dtype, device=like.device)
    return z


# Where explicit products beat torch's fused CPU attention kernel: batches of at least this many (image, head)
# matrices of narrow heads, over a middle range of token counts (`explicit_wins`).
EXPLICIT_MIN_MATRICES = 256
EXPLICIT_MAX_HEAD_DIM = 32
EXPLICIT_TOKENS = (32, 128)


def explicit_wins(batch: int, heads: int, tokens: int, head_dim: int) -> bool:
    """Whether explicit attention (one batched GEMM with the key bias, softmax, one batched GEMM) beats
    `scaled_dot_product_attention` on CPU for `batch` images of `heads` heads over `tokens` tokens.

    Measured per shape (`benchmarks/attention_kernels.py --threads 2`, 2-core AMD EPYC VM, two quiet runs on
    2026-12-08): explicit wins only for the demo's narrow heads (32 wide) at batch 64 over 34-50 tokens (0.78-0.90 of
    the fused time; at batch 32, 50 tokens: 0.95 / 1.04, a tie). Everywhere else the fused kernel wins: deit_tiny's
    64-wide heads at batch 32 and 64 (explicit 1.01-1.45x at 23-101 tokens, 1.1-2.3x from 149), 18-23 tokens
    (1.02-1.56x), and batch 1 at every length (1.35-2.4x). An earlier day on this VM had explicit ahead up to ~100
    tokens at every batch (0.54-0.96x); the script's last column says which form this rule picks and whether it is
    the faster on the machine at hand. Values differ by rounding only (~1e-6).
    """
    return (batch * heads >= EXPLICIT_MIN_MATRICES and head_dim <= EXPLICIT_MAX_HEAD_DIM
            and EXPLICIT_TOKENS[0] <= tokens <= EXPLICIT_TOKENS[1])


# Batched attention logits over more tokens than this get their key bias added after the product, not in it.
BIAS_AFTER_TOKENS = 128


def attention_probs(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor], mask: Optional[Tensor],
                    training: bool, fast: bool) -> Tensor:
    """Softmax attention probabilities (B, h, N, N) over keys, with the key bias and (float) mask applied.

    Scaled after the product as the LTMP/ToMe references do (timm scales q first): thresholds on importance are
    compared with values this rounding decides. The eval fast form does product, scale and bias in one batched
    GEMM (baddbmm: one kernel instead of three, each of which wakes the thread pool on a CPU). Batches of more than
    `BIAS_AFTER_TOKENS` tokens add the bias in place after a product without it: baddbmm with a (B * h, 1, N) input
    broadcast over the rows took 1.6-1.8x the time of the product and the add (deit_tiny's (32 x 3, 197, 64) logits,
    2 threads: 8.1-9.1 vs 4.6-5.1 ms; 170 tokens 5.7-5.8 vs 3.4-3.5; 140 tokens 2.6-3.1 vs 2.3-2.4), while up to 120
    tokens the one call stays faster (1.5 vs 1.7-1.8 ms at 120, 0.5 vs 0.5-0.8 at the demo's 50-64). Bitwise the same
    logits at every shape timed (the GEMM's alpha * product, then + bias, rounds alike either way).
    """
    B, h, N, hd = q.shape
    if fast and (mask is None or mask.dtype == torch.bool):
        major = heads_major(q) and heads_major(k)
        bias_after = bias is not None and B > 1 and N > BIAS_AFTER_TOKENS
        if bias is None or bias_after:
            inp = _zero(q)
        elif B == 1:  # broadcast over the heads as it is (expanding it per head first costs a copy kernel)
            inp = bias.view(1, 1, N)
        else:
            inp = flat_heads(bias.expand(B, h, 1, N), major)
        logits = torch.baddbmm(inp, flat_heads(q, major), flat_heads(k, major).transpose(1, 2), alpha=scale,
                               beta=1.0 if bias is not None and not bias_after else 0.0)
        if bias_after:
            unflat_heads(logits, B, major).add_(bias)
        return unflat_heads(logits.softmax(dim=-1), B, major)  # softmax on the contiguous batch, then the view
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    if mask is None or mask.dtype == torch.bool:
        return logits.softmax(dim=-1)
    return masked_softmax(logits, mask, training)


def heads_major(t: Tensor) -> bool:
    """Whether a (B, h, ...) tensor of several images lies heads-major in memory (h outermost), as `unpack_qkv` lays
    out q, k and v."""
    return t.shape[0] > 1 and t.stride(1) > t.stride(0)


def flat_heads(t: Tensor, major: bool) -> Tensor:
    """(B, h, ...) as one batch of matrices: (B * h, ...), or (h * B, ...) for a heads-major tensor, where either
    is a view of its layout (a batch-major view of heads-major memory would copy)."""
    return (t.transpose(0, 1) if major else t).flatten(0, 1)


def unflat_heads(t: Tensor, batch: int, major: bool) -> Tensor:
    """`flat_heads` undone: the (B, h, ...) view of a batch of matrices in that order."""
    return t.unflatten(0, (-1, batch)).transpose(0, 1) if major else t.unflatten(0, (batch, -1))


def heads_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b over (B, h, ., .) tensors; one bmm on their own layout when both are heads-major (matmul would copy
    both into batch-major order first), or when there is one image: its heads are then a batch of matrices as they
    lie (v a strided view of qkv), where matmul's expand-reshape-bmm-view took 30-60 us on the demo's batch-1
    blocks for an 8 us product."""
    if heads_major(a) and heads_major(b):
        return unflat_heads(torch.bmm(flat_heads(a, True), flat_heads(b, True)), a.shape[0], True)
    if a.shape[0] == 1 and b.shape[0] == 1 and eager():
        return torch.bmm(a[0], b[0]).unsqueeze(0)
    return a @ b


def key_bias(size: Tensor, mask: Optional[Tensor], prop_attn: bool, fast: bool = False) -> Optional[Tensor]:
    """The additive bias on attention logits, (B, 1, 1, N): log(size) of each key (proportional attention) and
    -inf on padding keys (bool mask). One tensor, so each block pays a single add; None when neither applies.

    `fast` (eager eval): log1p(size - 1), the same value to an ulp (sizes are whole numbers, so size - 1 is exact),
    because torch's CPU `log` wakes the thread pool even for a few hundred values (~70 us on a shared 2-core
    machine, every block) while log1p runs inline.
    """
    padding = mask is not None and mask.dtype == torch.bool
    if not prop_attn and not padding:
        return None
    if prop_attn:
        bias = (size - 1.0).log1p() if fast else size.log()  # (B, N, 1)
    else:
        bias = torch.zeros_like(size)
    if padding:
        bias = bias.masked_fill(~mask[..., None], -math.inf)
    return bias.transpose(1, 2)[:, None]


def masked_softmax(logits: Tensor, mask: Tensor, training: bool) -> Tensor:
    """Softmax over alive keys with a float (differentiable) mask, as LTMP trains: exp(a - max) * m / sum."""
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask[:, None, None, :]
    if training:
        n = logits.shape[-1]
        return (e + TRAIN_SOFTMAX_EPS / n) / (e.sum(dim=-1, keepdim=True) + TRAIN_SOFTMAX_EPS)
    return e / e.sum(dim=-1, keepdim=True)


def received_attention(probs: Tensor, mask: Optional[Tensor], num_prefix: int, fast: bool = False) -> Tensor:
    """Importance of each token: attention it receives, averaged over heads and query rows; prefix tokens +inf.

    Padding rows (bool mask) are left out of the average, so each image gets what batch 1 would give. A float
    (train) mask keeps every row, as the reference LTMP does in training.
    """
    B, h, N, _ = probs.shape
    padded = mask is not None and mask.dtype == torch.bool
    if fast and (mask is None or padded):
        # Weighted row sums as products: (1 x N) rows-weights times each (N x N) head matrix, in the matrices'
        # own order, then the heads added. One pass over the probabilities; the reductions below take two or
        # three, and a heads-major layout made the (B, h * N, N) view a copy (deit_tiny at batch 32, 2 threads:
        # 1.15 ms -> 0.40 ms in the first block).
        if B == 1 and not padded:  # every head's rows in one (1 x h * N) product
            imp = torch.bmm(probs.new_ones(1, 1, h * N), probs.reshape(1, h * N, N)).view(1, N) / (h * N)
            return prefix_inf(imp, num_prefix, fast)
        rows = mask.to(probs.dtype) if padded else probs.new_ones(B, N)  # (B, N)
        major = heads_major(probs)
        weights = flat_heads(rows[:, None, None, :].expand(B, h, 1, N), major)  # (B * h, 1, N), P's order
        per_head = unflat_heads(torch.bmm(weights, flat_heads(probs, major)), B, major)  # (B, h, 1, N)
        denom = rows.sum(1, keepdim=True) * h if padded else float(h * N)
        return prefix_inf(per_head.sum(1)[:, 0] / denom, num_prefix, fast)
    if onnx_products.on and (mask is None or padded):  # the ONNX graph: one product, not two or three ReduceSums
        rows = mask.to(probs.dtype) if padded else probs.new_ones(B, N)  # (B, N)
        weights = rows.unsqueeze(1).expand(B, h, N).reshape(B, 1, h * N)  # every head's query rows, P's order
        imp = torch.matmul(weights, probs.reshape(B, h * N, N)).squeeze(1)
        denom = rows.sum(1, keepdim=True) * h if padded else float(h * N)
        return prefix_inf(imp / denom, num_prefix)
    if padded:
        rows = mask.to(probs.dtype)  # (B, N)
        imp = (probs.sum(1) * rows.unsqueeze(-1)).sum(1) / (rows.sum(1, keepdim=True) * h)
    else:
        # One reduction over the (heads x queries) rows of the contiguous probabilities: the mean over dims (1, 2)
        # takes a slower strided path.
        imp = probs.reshape(B, h * N, -1).sum(1) / (h * N)
    return prefix_inf(imp, num_prefix, fast)


def prefix_inf(imp: Tensor, num_prefix: int, fast: bool = False) -> Tensor:
    """Give prefix tokens infinite importance: they are never pruned. `fast` (eager eval): in place, one small op
    instead of three; the traced forms keep the out-of-place masked_fill that every exporter handles."""
    if fast:
        imp[:, :num_prefix].fill_(math.inf)
        return imp
    is_prefix = torch.arange(imp.shape[1], device=imp.device) < num_prefix  # (N,)
    return imp.masked_fill(is_prefix, math.inf)


def split_ab(t: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Set A (even absolute positions) and B (odd) of the non-prefix tokens along dim 1, as ToMe splits.

    With one class token this is exactly ToMe's `x[::2]` / `x[1::2]` split with the class row excluded.
    Strided views, not index tensors: no copy at all (advanced indexing copied on every block), and their sizes
    follow from the sequence length, so torch.export sees static or symbolic sizes, not data-dependent ones.
    """
    first_a, first_b = ab_starts(num_prefix)
    return t[:, first_a::2], t[:, first_b::2]


def ab_starts(num_prefix: int) -> tuple[int, int]:
    """The positions of the first A and the first B token (`split_ab`): even and odd absolute positions."""
    return num_prefix + num_prefix % 2, num_prefix + 1 - num_prefix % 2


_CANDIDATE_POSITIONS: dict[tuple[int, int, torch.device], Tensor] = {}


def candidate_positions(n: int, num_prefix: int, device: torch.device) -> Tensor:
    """Where the merge's candidates (prefix, A, B: the order the references concatenate them in) sit in a sequence
    of n tokens, (n,) int64. Fixed per length, so made once in eager: gathering the kept candidates straight from the
    sequence through it saves concatenating them in that order first. Traced forms get a few index ops instead of
    the cache (n may be symbolic there, and a tensor made while tracing belongs to that trace)."""
    if not eager():
        return _candidate_positions(n, num_prefix, device)
    key = (n, num_prefix, device)
    pos = _CANDIDATE_POSITIONS.get(key)
    if pos is None:
        with torch.inference_mode(False):  # a normal tensor: later forwards may run with autograd on
            pos = _CANDIDATE_POSITIONS[key] = _candidate_positions(n, num_prefix, device)
    return pos


def _candidate_positions(n: int, num_prefix: int, device: torch.device) -> Tensor:
    p = torch.arange(n, device=device)
    src, dst = split_ab(p.unsqueeze(0), num_prefix)
    return torch.cat([p[:num_prefix], src[0], dst[0]])


def _check_nonempty(na: int, nb: int) -> None:
    """Tell torch.export what compaction guarantees (>= 1 token in A and in B), so that it and ExecuTorch can
    order the strides of (B, NA, NB) tensors whose sizes are data-dependent. Called for symbolic sizes only: plain
    ints pass trivially, and in eager the four checks cost ~0.2 ms a deit_tiny forward at batch 1 (measured
    interleaved, `torch._check` is a Python function with an import inside)."""
    torch._check(na >= 1)
    torch._check(nb >= 1)
    torch._check(na * nb >= nb)
    torch._check(na * nb >= na)


def similarity(metric: Tensor, num_prefix: int, mask: Optional[Tensor] = None) -> Tensor:
    """Cosine similarity (B, NA, NB) of every A token to every B token by `metric`. A float train mask zeroes dead
    tokens' metric, as the reference does, so their similarity is 0; padding (bool mask) is left to the caller."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if mask is not None and mask.dtype != torch.bool:
        metric = metric * mask.detach().unsqueeze(-1)
    a, b = split_ab(metric, num_prefix)
    if isinstance(a.shape[1], torch.SymInt) or isinstance(b.shape[1], torch.SymInt):
        _check_nonempty(a.shape[1], b.shape[1])
    return torch.bmm(a, b.transpose(1, 2))  # bmm itself: matmul costs twice as much here


def match(metric: Tensor, num_prefix: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Each A token's most similar B token by cosine similarity of `metric`: (node_max, node_idx), (B, NA) each.

    Padding (bool mask) can neither match nor be matched (-inf). A float train mask zeroes dead tokens' metric,
    as the reference does, so their similarity is 0.
    """
    return best_partners(similarity(metric, num_prefix, mask), num_prefix, mask)


def best_partners(scores: Tensor, num_prefix: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """`match` from `similarity`'s scores (B, NA, NB): each row's maximum and its index, padding (bool mask) at
    -inf (in eager, the scores' padding columns are masked in place)."""
    # Every caller leaves at least one token on each side (compact's min_tokens), so the max is defined.
    if mask is None or mask.dtype != torch.bool:
        return _row_max(scores) if eager() else scores.max(dim=-1)
    # Padding columns masked, padding rows' results afterwards (a (B, NA) fill instead of building and applying a
    # (B, NA, NB) mask: deit_tiny at batch 32, ~0.25 ms a block); in place in eager, out of place in traced forms.
    mask_a, mask_b = split_ab(mask, num_prefix)
    if eager():
        scores.masked_fill_(~mask_b.unsqueeze(1), -math.inf)
        node_max, node_idx = _row_max(scores)
        return node_max.masked_fill_(~mask_a, -math.inf), node_idx
    node_max, node_idx = scores.masked_fill(~mask_b.unsqueeze(1), -math.inf).max(dim=-1)
    return node_max.masked_fill(~mask_a, -math.inf), node_idx


def _row_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Eager max over the last dim: max(dim) on one thread (twice as fast as argmax there), else argmax and a
    gather (max(dim) wakes the CPU thread pool, argmax doesn't). Same values and first-maximum ties either way."""
    if torch.get_num_threads() == 1:
        return scores.max(dim=-1)
    node_idx = scores.argmax(dim=-1)
    return scores.gather(-1, node_idx.unsqueeze(-1)).squeeze(-1), node_idx


def scatter_merge(dst: Tensor, node_idx: Tensor, src: Tensor, inplace: bool = False) -> Tensor:
    """dst[b, node_idx[b, i]] += src[b, i]; dst (B, NB, *), node_idx (B, NA), src (B, NA, *). `inplace`: into dst
    itself (e.g. a strided view of the sequence), else into a copy."""
    # scatter_add, not scatter_reduce: ExecuTorch's portable kernels (the mobile export) have only the former.
    idx = node_idx.reshape(node_idx.shape + (1,) * (src.dim() - 2)).expand(src.shape)
    return dst.scatter_add_(1, idx, src) if inplace else dst.scatter_add(1, idx, src)


def scatter_amax(dst: Tensor, node_idx: Tensor, src: Tensor) -> Tensor:
    """dst[b, j] = max(dst[b, j], src[b, i] for every i with node_idx[b, i] == j); dst (B, NB), src (B, NA).

    Dense over (B, NA, NB), like the similarity scores it follows (LTMP's masked train step; the eval forms test
    the prune threshold on merged flags instead). dst itself is one of the candidates, so NA = 0 is fine.
    """
    hit = node_idx.unsqueeze(2) == torch.arange(dst.shape[1], device=dst.device)  # (B, NA, NB)
    cand = torch.where(hit, src.unsqueeze(2), -math.inf)
    return torch.cat([dst.unsqueeze(1), cand], dim=1).amax(dim=1)


def ascending(t: Tensor) -> Tensor:
    """`t` sorted along its last dimension. topk, because ExecuTorch's portable kernels have topk but no sort."""
    return t.topk(t.shape[-1], dim=-1, largest=False).values


def threshold_mask(values: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """LTMP's learned-threshold mask: forward is hard (values > threshold), gradient is the sigmoid's (STE)."""
    soft = torch.sigmoid((values - threshold) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    # This order makes the forward value exactly 0 or 1: hard = 1 only when soft > 0.5, where 1 - soft is exact
    # (Sterbenz). `hard + soft - soft.detach()` can give 1 - ulp, and then "merged" tokens (1 - mask != 0) revive.
    return soft + (hard - soft).detach()


def compact(keep: Tensor, *tensors: Tensor, min_tokens: int = 1, positions: Optional[Tensor] = None
            ) -> tuple[Tensor, list[Tensor]]:
    """Move each image's kept tokens to the front (order preserved) and cut the padding all images share.

    keep (B, N) bool, over the candidates in their order; `positions` (N,): each candidate's row in the tensors
    (B, M, *) (default: the candidates are the tensors' rows), so that candidates in another order than the tensors
    (ltmp's prefix, A, B) are gathered straight from them. Returns the new padding mask (B, N') and the gathered
    tensors (B, N', *). N' is the largest count in the batch, but at least `min_tokens` (padding then fills up to it;
    callers pass the prefix length + 2 so the A/B split of the next block always has a token on each side, which
    torch.export must know to slice with a data-dependent length). At batch 1 nothing else is padded.

    The traced form (an exported graph) is what this serves: one topk over sort keys that put kept candidates
    first, each group in candidate order, then one gather of whole rows out of the flattened batch. Under
    torch.export N' is a data-dependent size with known bounds, which ONNX and ExecuTorch keep per input; a
    torch.jit.trace (fvcore's counting) freezes it to the traced images' count, which is all that trace serves.
    (It replaced a cumsum-and-scatter permutation and a nonzero-sized column index: more nodes, and onnxruntime's
    ScatterElements is slow.)
    """
    B, N = keep.shape
    if isinstance(N, int):  # (a symbolic N is a compacted count, which is at least min_tokens already)
        min_tokens = min(min_tokens, N)
    counts = keep.sum(dim=1)  # (B,)
    width = counts.max().clamp_min(min_tokens)
    if torch.jit.is_tracing():  # a jit trace freezes the count (its .item() would stay a tensor)
        width = int(width)
    else:
        width = width.item()  # under torch.export: a data-dependent size, bounded below
        torch._check(width >= min_tokens)  # what torch.export can't infer from .item() by itself
        torch._check(width <= N)
    # Unique float keys (exact below 2^24): a candidate's index, plus 2^20 when it is dropped. topk, not sort:
    # ExecuTorch's portable kernels have no sort.
    key = torch.arange(N, device=keep.device, dtype=torch.float32) + (~keep).to(torch.float32) * float(1 << 20)
    order = key.topk(width, dim=1, largest=False).indices  # (B, N'): kept candidates first, in order
    if positions is not None:
        order = positions[order]
    # Whole rows out of the flattened batch (index_select), not gather with the index expanded over the features:
    # the same copies, without materialising a (B, N', C) index (ExecuTorch's portable kernels spent ~2.5 ms a
    # deit_tiny forward in that gather and more in expanding its index).
    M = tensors[0].shape[1]
    rows = (order + torch.arange(B, device=keep.device).unsqueeze(1) * M).reshape(-1)  # (B * N',)
    out = [t.reshape((B * M,) + t.shape[2:]).index_select(0, rows).reshape((B, width) + t.shape[2:]) for t in tensors]
    alive = torch.arange(width, device=keep.device) < counts.unsqueeze(1)
    return alive, out


def merge_rows(t: Tensor, node_idx: Tensor, src: Tensor, num_prefix: int) -> Tensor:
    """t (B, N, D) with src (B, R, D) added to its B tokens by node_idx (B, R): row i of image b into B token
    node_idx[b, i], in ascending i (`scatter_merge` into the B view, whole rows at once).

    For traced graphs: one row-indexed accumulate (ONNX ScatterND with reduction add) over the flattened batch,
    instead of a scatter whose index is expanded over the D features (ONNX ScatterElements: in onnxruntime's
    profile ~0.19 ms a deit_tiny block at batch 1 and ~5 ms at batch 32). Under `onnx_products` (the ONNX export):
    a one-hot (B, N, R) product instead (`merge_into`), the same sums up to their order.
    """
    B, N, D = t.shape
    first_b = ab_starts(num_prefix)[1]
    if onnx_products.on:
        return merge_into(t, first_b + 2 * node_idx, src)
    rows = torch.arange(B, device=t.device).unsqueeze(1) * N + first_b + 2 * node_idx  # (B, R)
    return t.reshape(B * N, D).index_put((rows.reshape(-1),), src.reshape(-1, D), accumulate=True).view(B, N, D)


def merge_into(dst: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """dst (B, M, D) with each source row src[b, i] (B, R, D) added to row idx[b, i] (B, R), as one one-hot
    (B, M, R) product (`onnx_products`: the ONNX graphs' race-free merge sum). Every src row must be finite."""
    hits = idx.unsqueeze(1) == torch.arange(dst.shape[1], device=dst.device).view(1, -1, 1)  # (B, M, R)
    return dst + hits.to(dst.dtype) @ src


class onnx_products:  # noqa: N801 (used as a function: `with onnx_products():`)
    """Within this scope (the ONNX export) the traced merge sums run as one-hot matrix products (`merge_into`: in
    `merge_rows`, and in ltmp's step straight into the B rows), and the importance's sums over heads and queries as
    one row-weights product (`received_attention`). The merge products' MACs count in the exported graph's executed
    FLOPs (`TokenBlock.onnx_merge_macs`); the importance's is a matrix-vector product, a reduction like the eager
    forms' (1 x h * N) @ (h * N x N) bmm, which no FLOPs count includes.

    onnxruntime's CPU ScatterND with reduction add splits its updates over the intra-op threads with no atomics
    (`TryParallelFor`): two sources of one destination added at once lose one of them, and the order of the others
    changes from run to run. deit_tiny's ltmp graph at batch 32 on 2 threads gave different logits in every one of
    40 runs and lost a merged token (|diff| to eager up to 9.7e-3) in several; with the product, 0 of 40 differed
    and the largest |diff| was 1.2e-6. Over all N rows the product cost onnxruntime ~3% of ltmp's batch-1 time
    there, into the B rows only ~1%, and nothing measurable at batch 32.
    onnxruntime sums the importance over the (heads x queries) rows faster as a MatMul (one batched (1 x h * N) @
    (h * N x N) product, MLAS) than as ReduceSums over the middle axes: deit_tiny's ltmp file, two scratch A/Bs of
    the two files interleaved (2 threads), 0.752 -> 0.721 and 0.724 -> 0.706 of the base's time at batch 1, 0.580 ->
    0.558 and 0.549 -> 0.544 at batch 8.
    ExecuTorch's portable index_put and torch's CPU accumulate run serially: the mobile and TorchScript exports keep
    the accumulate.
    """

    on = False

    def __enter__(self) -> None:
        self._was, onnx_products.on = onnx_products.on, True

    def __exit__(self, *exc: object) -> None:
        onnx_products.on = self._was


def fused_merge_prune(
    x: Tensor,
    size: Tensor,
    num_prefix: int,
    batch: int = 1,
    *,
    node_idx: Optional[Tensor] = None,
    node_max: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    merge_threshold: Optional[Tensor] = None,
    src_order: Optional[Tensor] = None,
    importance: Optional[Tensor] = None,
    prune_threshold: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    min_width: int = 0,
) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """An eval reduction step (merge, then prune, then compaction) in one C call (`ltmpctl/_kernels.c`), or None
    where the kernel can't serve: not built, or not an eager inference forward on float32 CPU tensors.

    Bitwise the values of the torch forms it replaces in the plugins (the same operations in the same order), in a
    fraction of their time at small batches: at deit_tiny's batch 1 LTMP's step was ~20 torch ops, ~0.3 ms a block
    on a shared 2-core CPU, mostly their fixed costs.

    x (T, C), size (T, 1): the tokens of `batch` images, packed image after image (or one image's (1, T, C) and
    (1, T, 1): the kept tokens then come back in that shape too); mask: the bool padding mask
    (batch, N) of a padded batch (real tokens first), None when every image has N = T / batch tokens. Merging:
    `node_idx` (batch, NA), each A token's B partner (`match`), and either `src_order` (batch, R), the A tokens that
    merge in the order they are added (ToMe), or `node_max` and `merge_threshold` (those above it merge, ascending:
    LTMP); or, for LTMP, `scores` (batch, NA, NB) (`similarity`, padding rows and columns as they come) and
    `merge_threshold`: the kernel takes `match`'s row maxima itself (one torch reduction and the padding fills fewer
    a block). Pruning: `importance` (batch, N) and `prune_threshold` (a candidate is kept above it; a destination's
    importance is the max of its own and its sources'). Returns the kept tokens, packed, in the references' order
    (prefix, unmerged A, B) (T', C), their sizes (T', 1) and, with a mask, the new padding mask
    (batch, max(kept, min_width)).
    """
    if not kernel_ready(x):
        return None
    C = x.shape[-1]
    T = x.numel() // C
    N = T // batch if mask is None else mask.shape[1]
    # In the C function's order: x, size, importance, mask, node_max, node_idx, scores, src_order.
    keep = [t if t is None else t.contiguous()
            for t in (x, size, importance, mask, node_max, node_idx, scores, src_order)]
    out_x, out_size = torch.empty_like(keep[0]), torch.empty_like(keep[1])
    out_mask = torch.empty(batch * N, dtype=torch.bool) if mask is not None else None
    ptr = [0 if t is None else t.data_ptr() for t in keep + [out_x, out_size, out_mask]]
    na = scores.shape[1] if scores is not None else 0 if node_idx is None else node_idx.shape[1]
    r = 0 if src_order is None else src_order.shape[1]
    thresholds = (0.0 if t is None else float(t) for t in (merge_threshold, prune_threshold))
    kept, width, _ = _kernels.merge_prune(*ptr[:8], batch, N, na, r, C, num_prefix, *thresholds, *ptr[8:], min_width)
    new_mask = None if out_mask is None else out_mask[:batch * width].view(batch, width)
    return out_x.narrow(-2, 0, kept), out_size.narrow(-2, 0, kept), new_mask


def merge_prune_raw(x: Tensor, size: Tensor, num_prefix: int, merge_threshold: float, prune_threshold: float,
                    probs: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """LTMP's eval reduction step of one unpadded image in one C call from attention's raw statistics
    (`attention_single`): `probs` (h, N, N) and `keys` (h, N, head_dim), which the kernel reduces to importance and
    cosine similarity itself; x (1, N, C), size (1, N, 1). Returns the kept tokens (1, T', C) and sizes (1, T', 1).

    The caller checks `kernel_ready`. Decisions are those of the torch statistics up to their rounding (the kernel
    sums in its own order, MKL in its), the kept tokens' values bitwise `fused_merge_prune`'s for those decisions.
    `fused_merge_prune` without its general argument handling: at the demo's batch 1 that wrapper took ~80 us of a
    ~90 us step inside a forward, the C work ~14 us.
    """
    return _merge_raw(x, size, num_prefix, merge_threshold, prune_threshold, 0, probs, keys)


def merge_top_raw(x: Tensor, size: Tensor, num_prefix: int, r: int, keys: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's eval reduction step of one unpadded image in one C call from attention's raw keys (h, N, head_dim):
    the kernel takes the cosine similarities of their head sum, each A token's best B partner, and merges the r A
    tokens with the most similar partners, most similar first (1 <= r <= (N - num_prefix) // 2). x (1, N, C),
    size (1, N, 1); returns the tokens (1, N - r, C) and sizes (1, N - r, 1). The caller checks `kernel_ready`.
    Decisions are the torch statistics' up to their rounding; values bitwise `fused_merge_prune`'s for them."""
    return _merge_raw(x, size, num_prefix, 0.0, 0.0, r, None, keys)


def merge_prune_raw_packed(x: Tensor, size: Tensor, num_prefix: int, merge_threshold: float,
                           prune_threshold: float, probs: Tensor, keys: Tensor, mask: Tensor, min_width: int,
                           threads: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """`merge_prune_raw` for a padded batch whose tokens are packed (`LTMPBlock._forward_packed`): x (T, C) and size
    (T, 1) the real tokens, probs (B, h, N, N) and keys (B, h, N, head_dim) padded as the bool mask (B, N) says
    (`attention_core(raw=True)`, any order of the batch and head dims in memory). Returns the kept tokens (T', C),
    sizes (T', 1) and the new mask (B, max(kept, min_width)), each image's as `merge_prune_raw` gives it alone.

    Replaces `received_attention`, the metric's head sum and `similarity` (~12 torch ops a block, which on 2 threads
    each wake the pool) with the kernel's per-image loops, split over up to `threads` threads (the kernel takes fewer
    where the images are too few or too small to pay for a thread). The caller checks `kernel_ready`."""
    return _merge_raw(x, size, num_prefix, merge_threshold, prune_threshold, 0, probs, keys, mask, min_width, threads)


def _merge_raw(x: Tensor, size: Tensor, num_prefix: int, merge_threshold: float, prune_threshold: float, r: int,
               probs: Optional[Tensor], keys: Tensor, mask: Optional[Tensor] = None, min_width: int = 0,
               threads: int = 1) -> tuple:
    x, size = x.contiguous(), size.contiguous()  # no-ops as the blocks hand them over
    # Each (N, N) matrix and each key row contiguous; held here: the kernel reads them after this line.
    if probs is not None and (probs.stride(-1) != 1 or probs.stride(-2) != probs.shape[-1]):
        probs = probs.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    # One image's (h, N, *) or a batch's (B, h, N, *): strides of the batch, head and row dims (no views made: at
    # batch 1 each would be one more op a block).
    one = keys.dim() == 3
    B, (h, N, hd) = (1 if one else keys.shape[0]), keys.shape[-3:]
    # The kernel reads raw buffers by these sizes: a mismatch would read out of bounds, so it is refused here.
    if (probs is not None and probs.shape != keys.shape[:-1] + (N,)) or (mask is not None and mask.shape != (B, N)):
        shapes = [None if t is None else tuple(t.shape) for t in (keys, probs, mask)]
        raise ValueError("raw statistics of mismatched shapes (keys, probs, mask): {}, {}, {}".format(*shapes))
    key_b, key_h, key_n = (0,) * one + keys.stride()[:-1]
    prob_b, prob_h = (0, 0) if probs is None else (0,) * one + probs.stride()[:-2]
    out_x, out_size = torch.empty_like(x), torch.empty_like(size)
    out_mask = None if mask is None else torch.empty(B * N, dtype=torch.bool)
    mask = None if mask is None else mask.contiguous()
    kept, width, _ = _kernels.merge_prune(
        x.data_ptr(), size.data_ptr(), 0, 0 if mask is None else mask.data_ptr(), 0, 0, 0, 0, B, N, 0, r,
        x.shape[-1], num_prefix, merge_threshold, prune_threshold, out_x.data_ptr(), out_size.data_ptr(),
        0 if out_mask is None else out_mask.data_ptr(), min_width, 0 if probs is None else probs.data_ptr(),
        keys.data_ptr(), h, hd, key_h, key_n, key_b, prob_h, prob_b, threads)
    x, size = out_x.narrow(-2, 0, kept), out_size.narrow(-2, 0, kept)
    return (x, size) if out_mask is None else (x, size, out_mask[:B * width].view(B, width))


def keep_top_raw(x: Tensor, size: Tensor, num_prefix: int, keep: int, probs: Tensor, cls: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """topk's eval reduction step of one unpadded image in one C call from attention's raw probabilities (h, N, N):
    the prefix tokens and the `keep` other tokens of highest importance (mean attention received, or with `cls` the
    class token's attention averaged over heads), in their order. x (1, N, C), size (1, N, 1); returns (1, P + keep,
    C) and (1, P + keep, 1), rows copied as they are. The caller checks `kernel_ready`. Decisions are the torch
    importance's up to its rounding (ties, which torch's topk breaks in no defined order, by position)."""
    x, size, probs = x.contiguous(), size.contiguous(), probs.contiguous()
    N, C = x.shape[1], x.shape[2]
    out_x, out_size = torch.empty_like(x), torch.empty_like(size)
    kept = _kernels.keep_top(x.data_ptr(), size.data_ptr(), probs.data_ptr(), probs.shape[0], N, C, num_prefix,
                             keep, cls, out_x.data_ptr(), out_size.data_ptr())
    return out_x.narrow(-2, 0, kept), out_size.narrow(-2, 0, kept)


def real_rows(mask: Tensor) -> Tensor:
    """Flat indices (T,) of the real tokens of a padded batch (bool mask (B, N))."""
    return mask.reshape(-1).nonzero().squeeze(1)


def pack(t: Tensor, mask: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """(B, N, *) -> (T, *): the real tokens of a padded batch (bool mask (B, N)), in batch order.

    Blocks of a data-dependent compressor may hand tokens on packed (x (T, C), size (T, 1)) together with the
    padded mask: the per-token layers (norms, qkv, proj, MLP) then cost the sum of the images' own token counts.
    `rows`: `real_rows(mask)`, when the caller has it already.
    """
    flat = t.reshape((-1,) + t.shape[2:])
    rows = real_rows(mask) if rows is None else rows
    return flat if rows.shape[0] == flat.shape[0] else flat.index_select(0, rows)  # nothing padded: the view


def unpack_qkv(qkv: Tensor, mask: Tensor, num_heads: int, rows: Optional[Tensor] = None) -> Tensor:
    """Packed qkv projections (T, 3 * attn_dim) -> padded (B, N, 3, h, head_dim) for `attention_core`, zeros in the
    padding, heads-major in memory ((3, h, B, N, head_dim)): each of q, k and v is then one contiguous batch of
    (N, head_dim) matrices, which the attention products take as they are. From the batch-major layout of `unpack`,
    q, k and v each cost a copy into that order (deit_tiny at batch 32, 2 threads: the copies fell from 12.2 to
    4.1 ms a forward and P @ V from 16.3 to 12.5 ms)."""
    B, N = mask.shape
    T, width = qkv.shape
    hd = width // (3 * num_heads)
    if T == B * N:  # nothing padded (e.g. the first block): the heads-major copy alone
        out = qkv.view(T, 3 * num_heads, hd).transpose(0, 1).contiguous()
    elif kernel_ready(qkv) and qkv.is_contiguous():
        out = _unpack_heads(qkv, mask, num_heads, None, None)
    else:
        # Real rows copied in, then only the padding rows zeroed (they must be finite: a padding key's logit gets
        # -inf added, and a padding query's row weighs 0 in the importance); zeroing all of it first wrote the
        # whole buffer twice (deit_tiny at batch 32: 0.8 ms a block).
        out = qkv.new_empty(3 * num_heads, B * N, hd)
        out.index_copy_(1, real_rows(mask) if rows is None else rows, qkv.view(T, 3 * num_heads, hd).transpose(0, 1))
        out.index_fill_(1, real_rows(~mask), 0.0)
    return _heads_view(out, B, N, num_heads)


def unpack_attention(qkv: Tensor, mask: Tensor, num_heads: int, log_size: Optional[Tensor]
                     ) -> tuple[Tensor, Optional[Tensor]]:
    """`unpack_qkv` and attention's key bias (`key_bias`) in one C pass (the caller checks `kernel_ready`): the
    padded qkv (B, N, 3, h, head_dim) and the bias (B, h, 1, N), each head's copy the same (one head's where B is 1)
    and laid out heads-major as q and k are, so that the logits' batched product takes it as its input without a
    copy. log_size: the packed tokens' log sizes (T, 1) (`key_bias`'s eager form, log1p(size - 1)), or None for no
    proportional attention; the bias is None where there is neither it nor padding.

    key_bias's ~12 ops a block on the padded sizes (unpacking them, the log, the padding's -inf, the expansion over
    the heads, which copied) become the packed log alone: the same values (the log's, then placed)."""
    B, N = mask.shape
    padded = qkv.shape[0] != B * N
    if not padded and log_size is None:
        return unpack_qkv(qkv, mask, num_heads), None
    h = num_heads if B > 1 else 1
    bias = qkv.new_empty(h, B, 1, N)
    out = _unpack_heads(qkv, mask, num_heads, bias, log_size)
    return _heads_view(out, B, N, num_heads), bias.transpose(0, 1)


def _unpack_heads(qkv: Tensor, mask: Tensor, num_heads: int, bias: Optional[Tensor], log_size: Optional[Tensor]
                  ) -> Tensor:
    """The C kernel's heads-major copy (3 * h, B * N, head_dim) of contiguous packed qkv, and the key bias into
    `bias` (bias_heads, B, 1, N) where given. One pass of head-wide copies and zero fills, images split over torch's
    thread count (2 threads, alone: the demo's (64, 40) blocks 0.62 -> 0.17 ms, deit_tiny's (32, 150) 1.08 -> 0.47
    ms, on one kernel thread)."""
    B, N = mask.shape
    G = 3 * num_heads
    out, mask = qkv.new_empty(G, B * N, qkv.shape[1] // G), mask.contiguous()  # held: the kernel reads it
    if log_size is not None:
        log_size = log_size.contiguous()
    _kernels.unpack_heads(qkv.data_ptr(), mask.data_ptr(), B, N, G, out.shape[2], out.data_ptr(),
                          torch.get_num_threads(), 0 if bias is None else bias.data_ptr(),
                          0 if log_size is None else log_size.data_ptr(), 0 if bias is None else bias.shape[0])
    return out


def _heads_view(out: Tensor, B: int, N: int, num_heads: int) -> Tensor:
    """(3 * h, B * N, head_dim) heads-major memory as the (B, N, 3, h, head_dim) that `attention_core` takes."""
    return out.view(3, num_heads, B, N, out.shape[-1]).permute(2, 3, 0, 1, 4)


def pack_heads(o: Tensor, mask: Tensor, rows: Optional[Tensor] = None, tokens: Optional[int] = None) -> Tensor:
    """Attention's output per head (B, h, N, head_dim) -> the real tokens' rows (T, h * head_dim), heads
    concatenated as timm's attention does (`pack` of the (B, N, attn_dim) transpose). From `unpack_qkv`'s heads-major
    layout the C kernel copies each real token's head slices straight into its row, images split over torch's
    thread count, where the transpose's copy and pack's index_select took two passes. `tokens`: T where the caller
    knows it (the kernel needs no `rows`)."""
    B, h, N, hd = o.shape
    if kernel_ready(o) and heads_major(o) and o.transpose(0, 1).is_contiguous():
        if tokens is None:
            tokens = (real_rows(mask) if rows is None else rows).shape[0]
        out, mask = o.new_empty(tokens, h * hd), mask.contiguous()  # held: the kernel reads it
        _kernels.pack_heads(out.data_ptr(), mask.data_ptr(), B, N, h, hd, o.data_ptr(), torch.get_num_threads())
        return out
    return pack(o.transpose(1, 2).reshape(B, N, h * hd), mask, rows)


def unpack(t: Tensor, mask: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """(T, *) -> (B, N, *): packed tokens back in the padded layout of `mask`, zeros in the padding."""
    B, N = mask.shape
    if t.shape[0] == B * N:  # nothing padded
        return t.view((B, N) + t.shape[1:])
    out = t.new_zeros((B * N,) + t.shape[1:])
    return out.index_copy_(0, real_rows(mask) if rows is None else rows, t).view((B, N) + t.shape[1:])
