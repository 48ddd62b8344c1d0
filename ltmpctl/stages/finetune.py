"""finetune: LTMP's threshold training (1 epoch, paper settings), resumable, optionally label-free or distributed.

Loss = the compressor's `loss` of the task loss (LTMP: + lam * (flops_ratio - target)^2), task loss =
label-smoothed cross-entropy, or with `distill` the KL divergence to the uncompressed model's logits (so unlabeled
images suffice). Only the compressor's `param_groups` learn (SGD, cosine schedule; `lr_groups` overrides their
learning rates) unless `full`, which also trains the weights at `lr`.

Resumable: every `checkpoint_every` steps (and on Ctrl-C) the trainable state, optimiser, step and the RNG states
(torch, Python, NumPy: augmentation draws from all three) as they were when that step began go to
`<run>/finetune.ckpt`. The data order is a seeded permutation per epoch, so a resumed run skips the batches
already seen without loading them and reaches the same thresholds as an uninterrupted run (with `workers: 0`;
worker processes seed their own augmentation per epoch, so their draws after a mid-epoch resume differ).
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

import ltmpctl.registry

from ..compressor import Compressor
from ..config import FinetuneStage
from ..data.folder import collate_skipping
from ..data.loaders import DataSpec, build_loader
from ..errors import ConfigError
from ..rundir import atomic_write

CKPT = "finetune.ckpt"


class EpochSampler(Sampler[int]):
    """The seeded permutation of one epoch, from position `start`, sharded across ranks (rank::world)."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        g = torch.Generator().manual_seed(seed * 1009 + epoch)
        perm = torch.randperm(n, generator=g)
        # Padded to a multiple of `world` (as DistributedSampler does), so every rank has as many batches:
        # a rank that ran out first would leave the others waiting in DDP's all-reduce for ever.
        perm = torch.cat([perm, perm[:(-n) % world]])
        self.indices = perm[rank::world][start:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _LossModel(torch.nn.Module):
    """The model and its whole training loss in one forward.

    DDP must see every use of a parameter inside forward: the FLOPs term reads the blocks' masks after the
    model's own forward, which DDP (find_unused_parameters) would otherwise count as a second use.
    """

    def __init__(self, model: torch.nn.Module, comp: Compressor, cfg: FinetuneStage, target: float) -> None:
        super().__init__()
        self.model, self.comp, self.cfg, self.target = model, comp, cfg, target

    def forward(self, images: Tensor, labels: Tensor, t_logits: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.model(images)  # (B, classes)
        if t_logits is not None:
            task = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                            reduction="batchmean")
        else:
            task = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return self.comp.loss(self.model, task, self.target, self.cfg.lam)


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when `flag` is true on any (a rank can't skip a step the others take)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


@dataclass
class FinetuneResult:
    steps: int
    final_ratio: float
    final_loss: float
    resumed_from: Optional[int]
    history: list[dict[str, float]]


def _trainable(comp: Compressor, model: torch.nn.Module, cfg: FinetuneStage) -> list[dict[str, Any]]:
    """Optimiser groups: the compressor's own, at its learning rates unless `lr_groups` names them, and with
    `full` every other weight at `lr`. Only these require grad."""
    own = comp.param_groups(model)
    unknown = set(cfg.lr_groups) - {g.name for g in own}
    if unknown:
        raise ConfigError(f"stages.finetune.lr_groups: {comp.name} has no parameter group {sorted(unknown)[0]!r}",
                          f"its groups: {', '.join(g.name for g in own) or 'none'}")
    groups = [{"params": g.params, "lr": cfg.lr_groups.get(g.name, g.lr), "name": g.name} for g in own]
    chosen = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(cfg.full or id(p) in chosen)
    if cfg.full:
        weights = [p for p in model.parameters() if id(p) not in chosen]
        groups.append({"params": weights, "lr": cfg.lr, "name": "weights"})
    return groups


def _rng_state() -> dict[str, Any]:
    """Every RNG augmentation draws from: torch's, and Python's and NumPy's (timm's crops and RandAugment)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finetune(model: torch.nn.Module, teacher: Optional[torch.nn.Module], cfg: FinetuneStage, data: DataSpec,
             data_config: dict, target: float, seed: int, device: torch.device, run_path: Optional[Path],
             progress: Optional[Callable[[int, int, dict[str, float]], None]] = None) -> FinetuneResult:
    """Train `model` (already compressed) in place; returns what happened. `teacher` is needed for `distill`."""
    comp = ltmpctl.registry.create(model.ltmpctl_compressor)
    if cfg.distill and teacher is None:
        raise ConfigError("distillation needs the uncompressed model", "pass the base model as teacher")
    rank, world = _rank_world()
    loader0, info = build_loader(data, "train", data_config, train=True, batch_size=cfg.batch_size, seed=seed,
                                 augment=cfg.augment)
    dataset, on_skip = loader0.dataset, getattr(loader0, "on_skip")
    per_epoch = math.ceil(len(dataset) / world / cfg.batch_size)  # type: ignore[arg-type]
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)

    groups = _trainable(comp, model, cfg)
    if not groups:
        raise ConfigError(f"{comp.name} has nothing to train", "enable stages.finetune.full or disable the stage")
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum)
    base_lrs = [g["lr"] for g in groups]
    train_model: torch.nn.Module = _LossModel(model, comp, cfg, target)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, find_unused_parameters=True)

    ckpt = run_path / CKPT if run_path is not None else None
    step, resumed = 0, None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        _set_rng_state(state["rng"])
        step = resumed = int(state["step"])

    # The RNG state as it was when `step` began: a Ctrl-C mid-step lands after that step's batch was loaded and
    # augmented, and the resumed run loads that batch again.
    rng_at_step = _rng_state()

    def save() -> None:
        if ckpt is None or rank != 0:
            return
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        buf = io.BytesIO()
        torch.save({"model": trainable, "opt": opt.state_dict(), "rng": rng_at_step, "step": step}, buf)
        atomic_write(ckpt, buf.getvalue())  # tmp + fsync + rename: a kill keeps the last one; disk full: one line

    history: list[dict[str, float]] = []
    loss_v = ratio_v = float("nan")
    train_model.train()
    if teacher is not None:
        teacher.eval()
    try:
        while step < total:
            epoch, start = divmod(step, per_epoch)
            sampler = EpochSampler(len(dataset), seed, epoch, start * cfg.batch_size, rank, world)  # type: ignore
            # Batches of only unreadable images still come out (images None), so step == batch position: a
            # resumed run starts at the right batch, and an epoch ending in unreadable images still ends.
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=data.workers,
                                collate_fn=collate_skipping,
                                # its own generator: creating an iterator must not draw from the global
                                # RNG that augmentation uses, or a resumed run would diverge
                                generator=torch.Generator().manual_seed(seed * 1009 + epoch))
            for images, labels, skipped in loader:
                if step >= total:
                    break
                for item in skipped:
                    on_skip(item)
                if not _any_rank(images is None, device, world):
                    scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule, no warm-up (paper)
                    for g, lr in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr * scale
                    images, labels = images.to(device), labels.to(device)
                    t_logits = None
                    if cfg.distill:
                        with torch.no_grad():
                            t_logits = teacher(images)  # type: ignore[misc]
                    loss, ratio = train_model(images, labels, t_logits)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    comp.after_step(model)
                    loss_v, ratio_v = float(loss.detach()), float(ratio.detach())
                    history.append({"step": step + 1, "loss": loss_v, "flops_ratio": ratio_v})
                step += 1
                rng_at_step = _rng_state()
                if progress is not None:
                    progress(step, total, {"loss": loss_v, "flops_ratio": ratio_v})
                if step % cfg.checkpoint_every == 0:
                    save()
    except KeyboardInterrupt:
        save()  # resumable with --resume RUN_DIR
        raise
    save()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # The last train forward's diagnostics hold its autograd graph (masks with grad): drop them, or the trained
    # model keeps that memory and can't be deep-copied (re-fitting copies it).
    for attr in ("ltmpctl_masks", "ltmpctl_counts"):
        model.__dict__.pop(attr, None)
    return FinetuneResult(step, ratio_v, loss_v, resumed, history)
