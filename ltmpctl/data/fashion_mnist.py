"""Fashion-MNIST (Xiao et al. 2017, MIT licence): the offline demo data set.

Looked up in this order: Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), the ltmpctl
cache dir, then torchvision's downloader into the cache dir. Images are kept as uint8 tensors in memory (47 MB for
all 70k), so loading is instant after the first gzip decode.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN = (0.2860,)
STD = (0.3530,)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or `pip install torchvision` with network access"


def cache_dir() -> Path:
    return Path(os.environ.get("LTMPCTL_CACHE", Path.home() / ".cache" / "ltmpctl"))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def local_dir() -> Path | None:
    """The folder already holding all four Fashion-MNIST files, or None (never downloads)."""
    candidates = [DEBIAN_DIR, cache_dir() / "fashion-mnist", cache_dir() / "FashionMNIST" / "raw"]
    for d in candidates:
        if all((d / f).exists() for pair in _FILES.values() for f in pair):
            return d
    return None


def _find_dir() -> Path:
    found = local_dir()
    if found is not None:
        return found
    try:  # fall back to torchvision's downloader (needs network)
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(cache_dir()), train=train, download=True)
        return cache_dir() / "FashionMNIST" / "raw"
    except Exception as e:  # network down, torchvision missing, ...
        raise DataError(f"Fashion-MNIST not found in {DEBIAN_DIR} or {cache_dir()} ({type(e).__name__})", INSTALL_HINT)


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the published `train` or `test` split."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}", "use 'train' or 'test'")
    if split not in _CACHE:
        d = _find_dir()
        img_file, lbl_file = _FILES[split]
        images = torch.from_numpy(_read_idx(d / img_file).copy())
        labels = torch.from_numpy(_read_idx(d / lbl_file).astype(np.int64))
        _CACHE[split] = (images, labels)
    return _CACHE[split]


class FashionMNIST(Dataset):
    """Normalised float images (1, 28, 28); `augment` adds a 2-pixel random-shift crop and horizontal flip."""

    def __init__(self, split: str, augment: bool = False, limit: int | None = None) -> None:
        images, labels = load_split(split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255).unsqueeze(0)  # (1, 28, 28)
        if self.augment:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2))
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            x = x[:, dy:dy + 28, dx:dx + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - MEAN[0]) / STD[0], int(self.labels[i])
