"""Image transforms built from a model's timm data config, so compressed models see exactly the preprocessing their
weights were trained with.
"""
from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from PIL import Image

from ..errors import ConfigError

# DeiT's recipe (timm's `--aa rand-m9-mstd0.5-inc1`): the augmentation timm's ViT/DeiT weights were trained with.
# create_transform's own default is no RandAugment, so it is asked for explicitly.
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# PIL modes for the channel counts a model can take; anything else has no image file format to come from.
_MODES = {1: "L", 3: "RGB"}


class ToMode:
    """Convert a PIL image to the mode the model's channel count needs (grayscale models get "L", RGB ones "RGB").

    A class rather than a lambda so the transform pickles into DataLoader worker processes.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def image_mode(data_config: dict) -> str:
    """PIL mode for the config's channel count: "L" for 1 channel, "RGB" for 3."""
    channels = int(data_config["input_size"][0])
    if channels not in _MODES:
        raise ConfigError(f"models with {channels} input channels can't read image files",
                          "use input_size (1, H, W) or (3, H, W)")
    return _MODES[channels]


def _safe_posterize(img: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize, but 0 bits gives the black image timm expects instead of Pillow's ValueError.

    RandAugment's `inc1` posterize asks for 0 bits whenever the sampled magnitude clips to 10 (~2% of draws at
    m9 mstd0.5); Pillow 13 rejects bits outside 1..8 and the whole training run would crash on it.
    """
    from timm.data.auto_augment import posterize

    if bits <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits)


def _guard_rand_augment(transform: Any) -> None:
    """Swap _safe_posterize into any RandAugment posterize op inside a Compose."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", ()):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _safe_posterize


def make_transform(data_config: dict, train: bool, augment: bool = True,
                   auto_augment: str | None = RAND_AUGMENT) -> Any:
    """PIL image -> normalised tensor (C, H, W) following timm's data config.

    train and augment: timm's training pipeline (random-resized crop, flip, colour jitter, `auto_augment`).
    Otherwise the eval pipeline (resize by crop_pct + centre crop), so `augment=False` on training data is
    deterministic and matches what the model sees at evaluation.
    """
    from timm.data import create_transform
    from torchvision import transforms

    cfg = override_config(data_config)  # validates shapes before timm sees them
    kwargs: dict[str, Any] = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"],
                                  interpolation=cfg.get("interpolation", "bilinear"))
    if train and augment:
        tf = create_transform(is_training=True, auto_augment=auto_augment, **kwargs)
        _guard_rand_augment(tf)
    else:
        tf = create_transform(is_training=False, crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"),
                              **kwargs)
    return transforms.Compose([ToMode(image_mode(cfg)), *tf.transforms])


def _check_floats(name: str, values: Sequence[Any], channels: int, positive: bool) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != channels:
        raise ConfigError(f"{name} {values!r} needs {channels} value(s), one per input channel",
                          f"give {name} as a list of {channels} number(s)")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {values!r} holds a non-number", f"give {name} as numbers") from None
    if positive and min(out) <= 0:
        raise ConfigError(f"{name} {values!r} must be > 0", f"give positive {name} values")
    return out


def _check_input_size(input_size: Any) -> tuple[int, int, int]:
    if isinstance(input_size, (str, bytes)) or not isinstance(input_size, Sequence) or len(input_size) != 3:
        raise ConfigError(f"input_size {input_size!r} is not (C, H, W)", "e.g. input_size: [3, 224, 224]")
    if not all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in input_size):
        raise ConfigError(f"input_size {input_size!r} must be positive integers", "e.g. input_size: [3, 224, 224]")
    c, h, w = (int(v) for v in input_size)
    return c, h, w


def override_config(data_config: dict, input_size: Sequence[int] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict:
    """A copy of `data_config` with the given fields replaced, checked as a whole (mean/std length C, std > 0)."""
    cfg = dict(data_config)
    for key, value in (("input_size", input_size), ("mean", mean), ("std", std)):
        if value is not None:
            cfg[key] = value
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        raise ConfigError(f"data config lacks {', '.join(missing)}", "set them in the recipe's data section")
    cfg["input_size"] = _check_input_size(cfg["input_size"])
    channels = cfg["input_size"][0]
    cfg["mean"] = _check_floats("mean", cfg["mean"], channels, positive=False)
    cfg["std"] = _check_floats("std", cfg["std"], channels, positive=True)
    return cfg
