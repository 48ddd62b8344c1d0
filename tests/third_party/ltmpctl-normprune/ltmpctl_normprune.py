"""normprune: drops tokens whose feature norm is small next to the image's mean, one learned threshold per block.

A deliberately plain compressor written only against ltmpctl's public API (`Compressor`, `TokenBlock`, `Knob`,
`ParamGroup`, `ltmpctl.tokens`, `ltmpctl.flops`): the stages must calibrate, fine-tune, re-fit, evaluate, count,
export and time it without knowing its name.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ltmpctl import Compressor, Knob, ParamGroup, Params, TokenBlock
from ltmpctl.compressor import per_block
from ltmpctl.flops import base_macs, model_macs, vit_shape
from ltmpctl.tokens import AttentionOut, compact, threshold_mask

SPAN = 2.0  # relative norms sit around 1; a threshold of 2 drops nearly everything


class NormPruneParams(Params):
    threshold: Union[float, list[float]] = Field(0.0, description="relative norm below which tokens go, >= 0")
    tau: float = Field(0.05, gt=0.0, description="temperature of the training mask")

    @field_validator("threshold")
    @classmethod
    def _nonneg(cls, v: Any) -> Any:
        if any(float(t) < 0 for t in (v if isinstance(v, list) else [v])):
            raise ValueError("thresholds must be >= 0")
        return v


class NormPruneBlock(TokenBlock):
    train_mask = True  # train with a float mask: dropped tokens stay in the tensor, out of attention
    tau: float = 0.05

    def reduce(self, x: Tensor, size: Tensor, mask: Optional[Tensor], a: AttentionOut):
        P = self.num_prefix
        alive = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(x.dtype)  # (B, N)
        norm = x.norm(dim=-1)  # (B, N)
        score = norm / ((norm * alive).sum(1, keepdim=True) / alive.sum(1, keepdim=True))  # 1 = the mean
        if self.training:
            m = threshold_mask(score, self.threshold, self.tau)
            m = torch.cat([torch.ones_like(m[:, :P]), m[:, P:]], dim=1)  # prefix tokens always stay
            return x, size, alive * m
        keep = torch.cat([torch.ones_like(score[:, :P], dtype=torch.bool), score[:, P:] > self.threshold], dim=1)
        keep = keep & alive.bool()
        new_mask, (x, size) = compact(keep, x, size, min_tokens=P + 1)
        return x, size, new_mask


class NormPrune(Compressor):
    """normprune: prune tokens of small relative norm (one learned threshold per block)."""

    name = "normprune"
    Params = NormPruneParams
    block_class = NormPruneBlock
    learnable = True
    data_dependent = True

    @classmethod
    def identity_params(cls) -> dict:
        return {"threshold": 0.0}

    def configure_block(self, block: TokenBlock, index: int, depth: int, params: NormPruneParams) -> None:
        value = per_block(params.threshold, depth, "normprune threshold")[index]
        block.threshold = torch.nn.Parameter(torch.tensor(float(value), device=block.norm1.weight.device))
        block.tau = params.tau

    def calibration_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        return Knob(lambda k: {"threshold": round(k, 6)}, 0.0, SPAN, describe=lambda k: f"threshold {k:.4f}")

    def param_groups(self, model: torch.nn.Module) -> list[ParamGroup]:
        return [ParamGroup("threshold", [b.threshold for b in model.blocks], 1e-2)]

    def loss(self, model: torch.nn.Module, task_loss: Tensor, target: float, lam: float) -> tuple[Tensor, Tensor]:
        s = vit_shape(model)
        kept = [m.mean() * s.tokens for m in model.ltmpctl_masks]
        ratio = model_macs(s, [torch.as_tensor(float(s.tokens))] + kept[:-1], kept) / base_macs(s)
        return task_loss + lam * (ratio - target) ** 2, ratio

    def after_step(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for b in model.blocks:
                b.threshold.clamp_(min=0.0)

    def trained_params(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"threshold": [float(b.threshold.detach()) for b in model.blocks]}

    def refit_knob(self, model: torch.nn.Module, params: dict[str, Any]) -> Knob:
        learned = params["threshold"]
        return Knob(lambda k: {"threshold": [max(0.0, t + k) for t in learned]}, -SPAN, SPAN,
                    describe=lambda k: f"shift {k:+.4f}")
