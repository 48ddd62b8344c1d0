"""Model loading: short aliases, timm names, the offline demo model, checkpoints, and the ViT check."""
from __future__ import annotations

import fnmatch
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compressor import check_supported
from .errors import ConfigError, ModelError

ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
DEMO = "demo"
# timm modules whose models are VisionTransformer subclasses built from standard Blocks.
_VIT_MODULES = ("vision_transformer", "deit")
OFFLINE_HINT = "pass --checkpoint FILE, or try the offline demo: `ltmpctl compress demo --target 0.5`"


@dataclass
class ModelSpec:
    """What to build: a name (alias, timm name or `demo`) and how to get its weights."""

    name: str
    pretrained: bool = True
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def resolve_name(name: str) -> str:
    """Alias -> timm name; `demo` stays `demo`; unknown names get an error with close matches."""
    if name == DEMO:
        return DEMO
    full = ALIASES.get(name, name)
    import timm

    if not timm.is_model(full):
        close = [m for m in list_vits() if name in m][:5]
        hint = f"did you mean {', '.join(close)}?" if close else "`ltmpctl models` lists the supported ViTs"
        raise ModelError(f"unknown model {name!r}", hint)
    return full


def list_vits(pattern: str | None = None) -> list[str]:
    """timm ViT/DeiT model names (optionally filtered by a glob or substring)."""
    import timm

    names = sorted(set(timm.list_models(module=list(_VIT_MODULES))))
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, glob)]
    return names


def parse_kwargs(items: list[str], what: str = "--model-kwargs") -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as YAML scalars/lists (never eval'd), like timm's train.py."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad {what} item {item!r}", "write key=value, e.g. img_size=32 or r=13")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"bad value in {what} item {item!r}", "use a number, string, bool or [list]") from None
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {str(p)!r} not found", "check the --checkpoint path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"can't read checkpoint {str(p)!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         "give a .safetensors file or a torch state dict") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers (timm train.py, DeiT releases)
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelError(f"checkpoint {str(p)!r} holds no state dict (names -> tensors)",
                         "give a .safetensors file or a torch state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _check_shapes(sd: dict[str, torch.Tensor], model: torch.nn.Module, checkpoint: str | Path, name: str) -> None:
    """Refuse tensors whose shape differs from the model's (load_state_dict raises a many-line RuntimeError)."""
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(f"checkpoint {str(checkpoint)!r} does not fit {name}: {len(wrong)} tensors have other "
                         f"shapes (e.g. {k}: {list(sd[k].shape)} vs {list(own[k].shape)})",
                         "pass the --model-kwargs the checkpoint was trained with (img_size, embed_dim, ...)")


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """`model.load_state_dict(sd)` (strict) with a mismatch as one ModelError naming `source`."""
    _check_shapes(sd, model, source, type(model).__name__)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelError(f"{source} does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                         "the file was replaced or edited; rerun the step that wrote it")


def create(spec: ModelSpec) -> torch.nn.Module:
    """Build the model in eval mode, load weights, and check it is a class-token timm ViT."""
    name = resolve_name(spec.name)
    kwargs = dict(spec.kwargs)
    checkpoint = spec.checkpoint
    pretrained = spec.pretrained and checkpoint is None
    if name == DEMO:
        from . import demo

        name, pretrained = "vit_tiny_patch16_224", False
        kwargs = {**demo.MODEL_KWARGS, **kwargs}
        checkpoint = checkpoint or str(demo.CHECKPOINT)
    if pretrained:
        # Refuse a non-ViT (resnet50, an avg-pooled ViT) before fetching weights it could never use.
        check_supported(_build(name, False, kwargs, meta=True))
        with _offline_hub_if_unreachable():
            model = _build(name, True, kwargs)
    else:
        model = _build(name, False, kwargs)
    check_supported(model)
    if checkpoint is not None:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(checkpoint).items()}
        _check_shapes(sd, model, checkpoint, name)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelError(f"checkpoint {str(checkpoint)!r} does not fit {name}: {len(missing)} missing keys (e.g. "
                             f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                             "pass the --model-kwargs the checkpoint was trained with")
    return model.eval()


def patch_input_size(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) read off the patch embedding (where an img_size / in_chans given at creation lives), if any."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if img is None or not isinstance(proj, torch.nn.Conv2d):
        return None
    return int(proj.in_channels), int(img[0]), int(img[1])


def data_config(model: torch.nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """timm's data config of the model (resolution, mean/std, interpolation, crop); the demo's own for `demo`."""
    if spec.name == DEMO:
        from . import demo

        return dict(demo.DATA_CONFIG)
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    # timm reports the pretrained config's resolution; an img_size / in_chans given at creation lives on the model.
    cfg["input_size"] = patch_input_size(model) or cfg["input_size"]
    return cfg


def _build(name: str, pretrained: bool, kwargs: dict[str, Any], meta: bool = False) -> torch.nn.Module:
    """timm.create_model with its failures as one-line errors; `meta` builds shapes only (no memory, no init)."""
    import timm

    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad --model-kwargs for {name}: {e}", "use timm.create_model keyword names") from None
    except Exception as e:  # offline hub download, missing weights, ...
        if pretrained:
            raise ModelError(f"pretrained weights for {name} could not be downloaded ({type(e).__name__})",
                             OFFLINE_HINT) from None
        raise ModelError(f"timm could not build {name}: {type(e).__name__}: {e}", "check --model-kwargs") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint (HF_ENDPOINT) accepts a TCP connection within `timeout` seconds."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_hub_if_unreachable() -> Iterator[None]:
    """Hub offline mode while the Hub can't be reached: cached weights still load, and missing ones fail at once
    instead of after ~60 s of retries that print a warning per attempt."""
    from huggingface_hub import constants

    # Behind a proxy a direct connection fails though downloads work: leave those to huggingface_hub.
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or proxied or hub_reachable():
        yield
        return
    # huggingface_hub reads this module attribute on every request (constants.is_offline_mode()).
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
