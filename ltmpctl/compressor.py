"""The public compressor API: what a plugin subclasses and what `ltmpctl.apply` does with it.

A compressor patches a live timm `VisionTransformer` by swapping classes (as ToMe does), never copying timm's
forward bodies: the model class gets a `forward_features` that threads token sizes and masks through the blocks,
and each timm `Block` becomes a `TokenBlock` that calls the block's own `norm1`, `attn` submodules, `ls1`,
`drop_path1`, then the compressor's `reduce`, then `norm2`, `mlp`, `ls2`, `drop_path2`. A compressor may also give
its block a batch-1 inference step on attention's raw statistics (`TokenBlock.raw_probs` / `reduce_raw`, one C
kernel call), which eager single-image forwards then take instead of `reduce`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from .errors import ConfigError, ModelError
from .tokens import (AttentionOut, attention, attention_proj, attention_single, eager, kernel_ready, real_rows, serial,
                     unpack)


class Params(BaseModel):
    """Base of every compressor's parameter model: typed, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenBlock(Block):
    """A timm `Block` that reduces tokens between attention and MLP. Compressors subclass it and define `reduce`.

    Per-block settings are plain attributes (or parameters) set by the compressor's `configure_block`.
    """

    importance_mode: Optional[str] = None  # None, "mean" or "cls": which importance `reduce` needs
    need_metric: ClassVar[bool] = False
    # Train with a float token mask from the first block on (LTMP: its masked softmax then applies everywhere).
    train_mask: ClassVar[bool] = False
    num_prefix: int = 1
    prop_attn: bool = True
    # Every token entering this block stands for one patch (block 0, or a compressor that never merges): the
    # log(size) bias is then exactly zero, and an eager forward skips it.
    uniform_size: bool = False

    @property
    def size_bias(self) -> bool:
        """Whether attention adds proportional attention's log(size) key bias in this block. Traced forms (exports,
        fvcore) keep it everywhere: the exported graphs stay the ones their parity tests verify."""
        return self.prop_attn and not (self.uniform_size and eager())

    def forward(  # type: ignore[override]
        self, x: Tensor, size: Tensor, mask: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        # kernel_ready first: it rules out traced forms, where comparing the (symbolic) batch would add a guard.
        if mask is None and not self.training and kernel_ready(x) and x.dim() == 3 and x.shape[0] == 1:
            probs = self.raw_probs(x.shape[1])
            if probs is not None:
                return self._forward_single(x, size, probs)
        if mask is None and self.train_mask and self.training:
            mask = x.new_ones(x.shape[:2])
        a = attention(self.attn, self.norm1(x), size, mask, self.num_prefix,
                      self.importance_mode, self.need_metric, self.size_bias)
        x = x + self.drop_path1(self.ls1(a.out))
        with serial(x, reduce_ops=True):
            x, size, mask = self.reduce(x, size, mask, a)
        if self._mlp_gathers(x, mask):
            return _on_rows(x, mask, self._mlp_residual), size, mask
        return self._mlp_residual(x), size, mask

    def _forward_single(self, x: Tensor, size: Tensor, probs: bool) -> tuple[Tensor, Tensor, None]:
        """Eager inference of one image where the C kernel serves (`kernel_ready`) and the compressor has a raw step
        (`raw_probs`): attention hands its probabilities (where `probs`) and keys over raw, and `reduce_raw` reduces
        them, merges, prunes and compacts in one kernel call. Each small torch op costs ~10 us of fixed overhead inside
        a forward on a shared CPU, several times what it costs in a loop; the statistics, matching and selection as
        torch ops were 25-30 of them a block. Decisions are the torch forms' up to their statistics' rounding."""
        attn = self.attn
        h = self.norm1(x)
        out, p, keys = attention_single(attn, attn.qkv(h), size if self.size_bias else None, probs)
        x = x + self.drop_path1(self.ls1(attention_proj(attn, out, h)))
        x, size = self.reduce_raw(x, size, p, keys)
        return self._mlp_residual(x), size, None

    def raw_probs(self, n: int) -> Optional[bool]:
        """The eager batch-1 kernel step (`_forward_single`) for a sequence of n tokens: None where this block has
        none (`reduce` serves every forward); else whether its `reduce_raw` needs attention's probabilities (False:
        keys only, and the fused attention kernel runs)."""
        return None

    def reduce_raw(self, x: Tensor, size: Tensor, probs: Optional[Tensor], keys: Tensor) -> tuple[Tensor, Tensor]:
        """The batch-1 reduction step from attention's raw statistics (`ltmpctl.tokens.attention_single`): probs
        (h, N, N) or None, keys (h, N, head_dim); x (1, N, C), size (1, N, 1) -> the kept tokens and sizes. Only
        called where `raw_probs` is not None."""
        raise NotImplementedError

    def onnx_merge_macs(self, n: int, m: int) -> int:
        """MACs of this block's merge sums in an exported ONNX graph, per image, with n tokens into attention and m
        into the MLP: there the merge sums run as one-hot (destinations x sources) products
        (`ltmpctl.tokens.onnx_products`). 0 for a block that merges nothing."""
        return 0

    def _mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _mlp_gathers(self, x: Tensor, mask: Optional[Tensor]) -> bool:
        """Whether the MLP runs on the real tokens only, gathered out of a padded batch: in a traced eval forward (an
        export) of images that keep different counts (a bool mask, as ltmp's graphs run batches).

        The MLP is two thirds of a block's per-token MACs: at the widest image's counts onnxruntime ran 0.541 of the
        base's FLOPs at deit_tiny's batch 32 for images that keep 0.494, 0.514 with the gather (`latency_vs_flops.py`:
        ltmp's latency ratio over its FLOPs 1.14-1.19 before, 1.11-1.12 after). Gathering qkv and proj as well was
        slower there: attention needs its qkv padded again, and onnxruntime's scatter of 3 x 192 wide rows cost more
        than the padding it saved.
        Eager batched forwards pack their tokens themselves (`LTMPBlock._forward_packed`); a graph of one image (a
        static batch of 1: the mobile export) has no padding, so it skips the gather.
        """
        if mask is None or mask.dtype != torch.bool or self.training or eager():
            return False
        return not (isinstance(x.shape[0], int) and x.shape[0] == 1)

    def reduce(
        self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return x, size, mask


def _on_rows(x: Tensor, mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn applied to the real tokens (bool mask (B, N)) of a padded batch x (B, N, C) only, gathered as (T, C) and
    scattered back; padding rows keep their values (any finite value serves: every reduction masks them out)."""
    B, N, C = x.shape
    flat, rows = x.reshape(B * N, C), real_rows(mask)
    return flat.index_copy(0, rows, fn(flat.index_select(0, rows))).view(B, N, C)


def _alive_count(x: Tensor, mask: Optional[Tensor]) -> Union[int, Tensor]:
    """Tokens per image: the mask's sum (B,), or the sequence length (an int) when nothing is masked. A bool mask
    sums to integers, made float with the others once per forward (`_count_table`): one op a block, not three."""
    if mask is None:
        return x.shape[1]
    return mask.sum(dim=1) if mask.dtype == torch.bool else mask.detach().sum(dim=1)


def _count_table(alive: list[Union[int, Tensor]], batch: int, device: torch.device) -> Tensor:
    """(B, len(alive)) float token counts; all-int lists (no masks anywhere) become one tensor in one op."""
    if all(isinstance(a, int) for a in alive):
        return torch.tensor(alive, dtype=torch.float32, device=device).expand(batch, -1)
    return torch.stack([a if isinstance(a, Tensor) else torch.full((batch,), float(a), device=device)
                        for a in alive], dim=1).float()  # a bool mask's counts are integers: float whatever the mix


class CompressedViT:
    """Mixin put in front of the model's own class: threads (size, mask) through the TokenBlocks.

    Everything else (patch embedding, position embedding, norms, head, distilled head) is the model's own.
    """

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ModelError("attention masks are not supported on a token-reduced model")
        with serial(stem_values(self, x)):  # one thread where the tokens are few; see `ltmpctl.tokens.serial`
            x = self.patch_embed(x)
            x = self._pos_embed(x)
            x = self.patch_drop(x)
            x = self.norm_pre(x)
        size = x.new_ones(x.shape[0], x.shape[1], 1)  # (B, N, 1): every token is one patch
        mask: Optional[Tensor] = None
        alive = [_alive_count(x, mask)]  # tokens entering block 0, then leaving each block: an int, or (B,) under masks
        masks = []
        for blk in self.blocks:
            with serial(x):
                x, size, mask = blk(x, size, mask)
            alive.append(_alive_count(x, mask))
            masks.append(mask)
        if x.dim() == 2:  # a block handed on packed tokens (T, C) of a padded batch (`ltmpctl.tokens.pack`)
            x = unpack(x, mask)
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            # Diagnostics of the last forward: read by token_counts() and by LTMP's FLOPs loss.
            n = _count_table(alive, x.shape[0], x.device)  # (B, depth + 1)
            self.ltmpctl_counts = torch.stack([n[:, :-1], n[:, 1:]], dim=-1)  # (B, depth, 2)
            self.ltmpctl_masks = masks
        with serial(x):
            return self.norm(x)


def stem_values(model: VisionTransformer, images: Tensor) -> int:
    """How many values the tokens entering `model`'s first block hold for these images (B, C, H, W): B x N x width,
    known before the patch embedding runs (the stem's thread choice, `ltmpctl.tokens.serial`). An embedding without
    timm's grid arithmetic (a custom `embed_layer`) counts as large: its stem keeps the caller's threads."""
    feat_size = getattr(model.patch_embed, "dynamic_feat_size", None)
    if not callable(feat_size):
        return sys.maxsize
    grid = feat_size(images.shape[-2:])
    return images.shape[0] * (grid[0] * grid[1] + model.num_prefix_tokens) * model.embed_dim


@dataclass(frozen=True)
class Knob:
    """One monotone dial over a compressor's parameters, searched by the calibrate stage.

    `params_at(k)` gives the parameters at k in [lo, hi]; the FLOPs fraction must not increase with k (k = lo
    reduces least). An `integer` knob takes whole values only (e.g. a schedule index). `describe(k)` names the
    setting in the run's report.
    """

    params_at: Callable[[float], dict[str, Any]]
    lo: float = 0.0
    hi: float = 1.0
    integer: bool = False
    describe: Callable[[float], str] = lambda k: f"k={k:g}"


@dataclass
class ParamGroup:
    """Parameters the fine-tune stage trains together at one learning rate (`stages.finetune.lr_groups[name]`
    overrides `lr`)."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float


class Compressor:
    """Base class of a compressor plugin.

    Subclasses set `name`, `Params` (a `Params` subclass), `block_class` (a `TokenBlock` subclass) and implement
    `configure_block(block, index, depth, params)`. The stages know a compressor only through the hooks below
    (each has a do-nothing default):

    - calibrate: `calibration_knob` -> a `Knob` the stage bisects until measured FLOPs hit the target;
    - fine-tune: `param_groups` (what trains, at which learning rates), `loss` (its extra term), `after_step`
      (e.g. clamping), `trained_params` (the learned values, as parameters `apply` accepts);
    - after fine-tuning: `refit_knob` -> a `Knob` over the trained parameters, searched on the trained model.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    block_class: ClassVar[type[TokenBlock]] = TokenBlock
    learnable: ClassVar[bool] = False  # has trainable parameters (`param_groups`) and a training `loss`
    data_dependent: ClassVar[bool] = False  # token counts differ per image

    # ---- the stage contract ----------------------------------------------------------------------------------

    def calibration_knob(self, model: VisionTransformer, params: dict[str, Any]) -> Optional[Knob]:
        """The dial calibration searches for `model` (uncompressed); `params` are the recipe's, kept under it.
        None: the compressor can't be calibrated (the recipe gives its parameters)."""
        return None

    def param_groups(self, model: VisionTransformer) -> list[ParamGroup]:
        """Trainable parameters of the patched `model` and their default learning rates."""
        return []

    def loss(self, model: VisionTransformer, task_loss: Tensor, target: float, lam: float
             ) -> tuple[Tensor, Tensor]:
        """(training loss, FLOPs ratio it saw) after a train-mode forward; the ratio is NaN where not tracked."""
        return task_loss, torch.tensor(float("nan"))

    def after_step(self, model: VisionTransformer) -> None:
        """Called after every optimiser step (e.g. to keep thresholds in range)."""

    def trained_params(self, model: VisionTransformer) -> dict[str, Any]:
        """The learned values of a trained `model` as parameters (saved in the summary, reapplied on load)."""
        return {}

    def refit_knob(self, model: VisionTransformer, params: dict[str, Any]) -> Optional[Knob]:
        """After training: a dial over the trained `params` that restores the FLOPs target on the trained `model`
        in eval mode. None: keep the trained parameters as they are."""
        return None

    @classmethod
    def parse_params(cls, params: dict[str, Any]) -> Params:
        try:
            return cls.Params(**params)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "params"
            raise ConfigError(f"{cls.name}: {where}: {err['msg']}",
                              f"`ltmpctl plugins` lists {cls.name}'s parameters") from None

    @classmethod
    def identity_params(cls) -> dict[str, Any]:
        """Parameters that reduce nothing (the golden identity check)."""
        raise NotImplementedError

    def configure_block(self, block: TokenBlock, index: int, depth: int, params: Params) -> None:
        raise NotImplementedError

    def apply(self, model: VisionTransformer, params: Params) -> VisionTransformer:
        check_supported(model)
        done = getattr(model, "ltmpctl_compressor", None)
        if done not in (None, self.name):
            raise ModelError(f"model is already compressed with {done}", "start from the uncompressed model")
        depth = len(model.blocks)
        if not isinstance(model, CompressedViT):
            model.__class__ = type(f"Compressed{type(model).__name__}", (CompressedViT, type(model)), {})
        for i, blk in enumerate(model.blocks):
            blk.__class__ = self.block_class
            blk.num_prefix = model.num_prefix_tokens
            blk.uniform_size = i == 0  # sizes start at 1; a compressor that never merges sets it everywhere
            self.configure_block(blk, i, depth, params)
        model.ltmpctl_compressor = self.name
        model.ltmpctl_params = params.model_dump()
        return model


def check_supported(model: torch.nn.Module) -> None:
    """Refuse models the token-reducing forward can't serve, with the reason."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{type(model).__name__} is not a timm VisionTransformer",
                         "ltmpctl compresses ViT/DeiT models; `ltmpctl models` lists them")
    if not getattr(model, "has_class_token", model.cls_token is not None) or model.global_pool != "token":
        raise ModelError(f"model pools with {model.global_pool!r}, not a class token",
                         "token reduction needs a class-token ViT (e.g. deit_*, vit_*_patch16_224)")
    for blk in model.blocks:
        if not isinstance(blk, Block):
            raise ModelError(f"block type {type(blk).__name__} is not timm's Block",
                             "only standard timm ViT blocks are supported")


def per_block(value: Any, depth: int, what: str) -> list:
    """Broadcast a scalar to every block, or check a per-block list has one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ConfigError(f"{what} has {len(value)} entries but the model has {depth} blocks",
                              f"give one value or exactly {depth}")
        return list(value)
    return [value] * depth


def token_counts(model: torch.nn.Module) -> Tensor:
    """Per image and block, (tokens into attention, tokens into MLP) of the last forward: (B, depth, 2)."""
    counts = getattr(model, "ltmpctl_counts", None)
    if counts is None:
        raise ModelError("no token counts recorded", "apply a compressor and run a forward pass first")
    return counts
