"""Check an exported file against the eager model it came from: same logits (within TOLERANCE), same top-1.

An export of a token-reduced model can be silently wrong in a way no single input shows: a token count baked in
as the example's. So the check runs many images that keep *different* numbers of tokens, each alone (batch 1) and,
for files with a dynamic batch, together in one padded batch, and reports the spread of kept tokens it covered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..compressor import token_counts
from ..errors import ConfigError

TOLERANCE = 1e-4  # largest |exported - eager| logit difference accepted
MIN_IMAGES = 32  # fewer images would rarely cover enough different token counts
MAX_BATCH = 32  # images per run in the batched check (and per eager reference forward)

Runner = Callable[[Tensor], Tensor]  # runs the exported file: images (B, 3, H, W) -> logits (B, K)


@dataclass(frozen=True)
class Reference:
    """What the eager model gives on the verification images."""

    single: Tensor  # (N, K) logits, each image alone at batch 1
    batched: Tensor  # (N, K) logits, images in batches of up to MAX_BATCH
    tokens: Optional[Tensor]  # (N,) tokens each image keeps after the last block; None if unknown


@dataclass(frozen=True)
class Verification:
    """The outcome of comparing an exported file with eager."""

    images: int
    batch_sizes: list[int]  # the batch sizes the file was run at
    max_abs_diff: float
    top1_agree: int  # images whose top-1 class matched eager in every run
    worst: str  # where the largest difference (or the first mismatch) is, e.g. "logits of image 7 at batch 1"
    passed: bool

    @property
    def top1_fraction(self) -> float:
        return self.top1_agree / self.images if self.images else 0.0


def is_data_dependent(model: torch.nn.Module) -> bool:
    """Whether the model's compressor keeps a different number of tokens per image."""
    name = getattr(model, "ltmpctl_compressor", None)
    if name is None:
        return False
    from ..registry import get

    return get(name).data_dependent


def _kept_tokens(model: torch.nn.Module, batch: Tensor) -> Optional[Tensor]:
    """Tokens each image of the last forward kept after the last block; the full sequence when not compressed."""
    if getattr(model, "ltmpctl_compressor", None) is not None:
        return token_counts(model)[:, -1, 1].round().long()
    patch_embed = getattr(model, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if num_patches is None:
        return None
    return torch.full((batch.shape[0],), num_patches + getattr(model, "num_prefix_tokens", 0), dtype=torch.long)


@torch.no_grad()
def reference(model: torch.nn.Module, images: Tensor) -> Reference:
    """Eager logits at batch 1 and in batches, and the tokens each image keeps (from the batched forwards)."""
    single = torch.cat([model(x) for x in images.split(1)])
    batched, tokens = [], []
    for chunk in images.split(MAX_BATCH):
        batched.append(model(chunk))
        tokens.append(_kept_tokens(model, chunk))
    kept = None if any(t is None for t in tokens) else torch.cat(tokens)
    return Reference(single=single, batched=torch.cat(batched), tokens=kept)


def _run(runner: Runner, images: Tensor, batch: int) -> list[Tensor]:
    return [runner(chunk).detach().float() for chunk in images.split(batch)]


def _first_error(got: Tensor, want: Tensor, first_image: int, batch: int) -> Optional[str]:
    """A shape or finiteness problem of one run's output, named; None if there is none."""
    if got.shape != want.shape:
        return (f"logits at batch {batch} (images {first_image}..) have shape {tuple(got.shape)}, "
                f"eager gives {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return f"logits at batch {batch} (images {first_image}..) are not finite"
    return None


def compare(runner: Runner, images: Tensor, ref: Reference, batch_sizes: list[int]) -> Verification:
    """Run the exported file at each batch size and compare with the matching eager reference."""
    n = images.shape[0]
    agree = torch.ones(n, dtype=torch.bool)
    worst_diff, worst = 0.0, "none"
    for batch in batch_sizes:
        want = ref.single if batch == 1 else ref.batched
        start = 0
        for got in _run(runner, images, batch):
            expected = want[start:start + len(got)]
            problem = _first_error(got, expected, start, batch)
            if problem is not None:
                return Verification(n, batch_sizes, math.inf, 0, problem, False)
            diff = (got - expected).abs().amax(dim=1)  # (b,)
            i = int(diff.argmax())
            if float(diff[i]) > worst_diff or worst == "none":
                worst_diff, worst = float(diff[i]), f"logits of image {start + i} at batch {batch}"
            agree[start:start + got.shape[0]] &= got.argmax(dim=1) == expected.argmax(dim=1)
            start += got.shape[0]
    top1 = int(agree.sum())
    if top1 < n:
        first = int((~agree).nonzero()[0])
        worst = f"{worst}; top-1 differs first on image {first}"
    return Verification(n, batch_sizes, worst_diff, top1, worst, worst_diff <= TOLERANCE and top1 == n)


def check_images(images: Tensor, example: Tensor) -> None:
    """Refuse verification inputs that could not show a baked-in token count."""
    if images.dim() != 4 or example.dim() != 4:
        raise ConfigError(f"images must be (B, C, H, W), got {tuple(images.shape)} and {tuple(example.shape)}",
                           "pass image batches")
    if images.shape[0] < MIN_IMAGES:
        raise ConfigError(f"verification needs at least {MIN_IMAGES} images, got {images.shape[0]}",
                           "token counts differ per image; a few images rarely cover enough of them")
    if images.shape[1:] != example.shape[1:]:
        raise ConfigError(f"verification images are {tuple(images.shape[1:])} but the example is "
                           f"{tuple(example.shape[1:])}", "use the model's input size for both")
