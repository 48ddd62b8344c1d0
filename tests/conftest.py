import os

# OpenMP spin-waiting on 2 shared cores makes torch crawl (../shared/SETUP.md).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(**kw) -> torch.nn.Module:
    """A seeded tiny timm ViT: 32x32 input, patch 4 -> 64 patches + prefix tokens, width 64, depth 3."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    args.update(kw)
    name = "deit_tiny_distilled_patch16_224" if args.pop("distilled", False) else "vit_tiny_patch16_224"
    return timm.create_model(name, **args).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
