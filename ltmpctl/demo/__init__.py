"""The offline demo model: a small timm ViT self-trained on Fashion-MNIST (not an ImageNet model).

`python -m ltmpctl.demo.train` reproduces the committed checkpoint `demo_vit.safetensors`.
"""
from __future__ import annotations

from pathlib import Path

from ..data.fashion_mnist import MEAN, STD

CHECKPOINT = Path(__file__).with_name("demo_vit.safetensors")
RECIPE = Path(__file__).with_name("recipe.yaml")  # what `ltmpctl compress demo` runs (recipes/demo.yaml links here)
# 28x28 grayscale, patch 4 -> 7x7 = 49 patch tokens + class token.
MODEL_KWARGS: dict = dict(
    img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=10,
)
DATA_CONFIG: dict = dict(input_size=(1, 28, 28), mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
DESCRIPTION = "ViT 28x28/4, width 128, depth 6, self-trained on Fashion-MNIST"
