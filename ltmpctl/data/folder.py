"""ImageFolder trees (`root/<class>/<image>`) that skip unreadable images instead of crashing.

Lazy check, not a pre-scan: each image is decoded in __getitem__ (which has to decode it anyway) and a decode
failure returns a `Skipped` sentinel that `collate_skipping` drops from its batch. A pre-scan with
`Image.open().verify()` would open all 50k ImageNet val files before the first batch and still miss damage that
only full decoding finds (verify() does not decode JPEG data, so truncated JPEGs pass it). Batches stay
predictable: batch i holds the readable images among the sampler's indices for batch i, never items pulled in from
elsewhere, so the order of the good images doesn't depend on which ones failed.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError

LAYOUT_HINT = "arrange images as ROOT/<class>/<image>, e.g. val/n01440764/x.JPEG"


class Skipped(NamedTuple):
    """Stand-in for an image that could not be decoded (a module-level NamedTuple so it pickles across workers)."""

    path: str
    reason: str


def _visible(name: str) -> bool:
    # Dot entries are metadata (.ipynb_checkpoints, macOS ._x.jpg), not classes or images; counting a dot-folder
    # as a class would shift every later label by one.
    return not name.startswith(".")


def find_classes(root: Path) -> list[str]:
    """Sorted class-folder names under `root`; DataError if root is missing or has no class folders."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DataError(f"data folder {str(root)!r} {what}", LAYOUT_HINT)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise DataError(f"data folder {str(root)!r} has no class subfolders", LAYOUT_HINT)
    return classes


def _is_image_name(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMG_EXTENSIONS)


def list_samples(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image file, classes in order, files sorted within each class (subfolders too)."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))  # in place: steers os.walk's descent
            samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_image_name(f))
    if not samples:
        exts = " ".join(IMG_EXTENSIONS)
        raise DataError(f"no images under {str(root)!r} (looked for {exts})", LAYOUT_HINT)
    return samples


def _reason(path: str, error: Exception) -> str:
    """A short human reason for a decode failure (the exception's own text often repeats the path)."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "file vanished"
    if isinstance(error, UnidentifiedImageError):
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file" if empty else "not an image"
    first_line = (str(error).splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def decode(path: str) -> Image.Image | Skipped:
    """Fully decoded image, or Skipped with the reason."""
    try:
        with Image.open(path) as img:
            img.load()  # Image.open only reads the header; truncation shows up while decoding pixels
    # Any error from a third-party parser on untrusted bytes means "unreadable file" (broken TIFFs raise
    # struct.error or IndexError, broken PNGs SyntaxError, huge ones DecompressionBombError).
    except Exception as e:
        return Skipped(path, _reason(path, e))
    return img  # leaving `with` closed only the file; the decoded pixels stay


class ImageFolder(Dataset):
    """`root/<class>/<image>`: labels are class indices in sorted class-name order.

    Unreadable images come back as `Skipped`; batch with `collate_skipping`. `skipped` lists each bad
    (path, reason) once, in the process that decoded it: with worker processes the loader reports them back.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.classes = find_classes(self.root)
        self.samples = list_samples(self.root, self.classes)
        self.transform = transform
        self.skipped: list[tuple[str, str]] = []
        self._skipped_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def note_skipped(self, item: Skipped) -> None:
        """Record a skipped image once, however many epochs or workers meet it."""
        if item.path not in self._skipped_paths:
            self._skipped_paths.add(item.path)
            self.skipped.append((item.path, item.reason))

    def __getitem__(self, i: int) -> tuple[Any, int] | Skipped:
        path, label = self.samples[i]
        img = decode(path)
        if isinstance(img, Skipped):
            self.note_skipped(img)
            return img
        return (self.transform(img) if self.transform else img), label


Batch = tuple[torch.Tensor | None, torch.Tensor | None, list[Skipped]]


def collate_skipping(items: list[Any]) -> Batch:
    """(images, labels, skipped): readable items stacked; (None, None, skipped) when every item was unreadable."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        return None, None, skipped
    images, labels = default_collate(good)
    return images, labels, skipped
