"""DataLoaders for the pipeline: the offline Fashion-MNIST demo or an ImageFolder tree, seeded and skip-tolerant."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from ..errors import ConfigError, DataError
from .folder import ImageFolder, Skipped, collate_skipping
from .transforms import make_transform, override_config

DEMO = "demo"
# Accepted folder names per split: many published sets (and Kaggle dumps) call their held-out split test/.
SPLIT_DIRS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val", "test")}
DEMO_SPLITS = {"train": "train", "val": "test"}


@dataclass
class DataSpec:
    """Where the images come from and how they are batched (the recipe's `data` section)."""

    path: str = DEMO  # "demo" (Fashion-MNIST, offline) or an ImageFolder root holding train/ and val/ (or test/)
    input_size: tuple[int, int, int] | None = None  # (C, H, W) for a custom model; None keeps the model's own
    mean: tuple[float, ...] | None = None  # per-channel normalisation mean; None keeps the model's own
    std: tuple[float, ...] | None = None  # per-channel normalisation std; None keeps the model's own
    batch_size: int = 64  # images per batch unless build_loader is given another
    workers: int = 2  # DataLoader worker processes; 0 decodes in the calling process


@dataclass
class DataInfo:
    """What a loader reads, for reports."""

    name: str  # "fashion-mnist" or the ImageFolder root's folder name
    split: str  # the split actually read: "train", "val" or "test"
    num_images: int  # images the loader visits (after `limit`), unreadable ones included
    num_classes: int  # class folders (or Fashion-MNIST's 10), the label range
    classes: tuple[str, ...] = ()  # class names in label order
    # The dataset's own list of unreadable (path, reason), so it fills in as the loader is iterated.
    skipped: list[tuple[str, str]] = field(default_factory=list)


class SkippingLoader(DataLoader):
    """A DataLoader yielding (images, labels) from datasets that may return `Skipped`.

    Unreadable items are reported through `on_skip` in this process (a worker's copy of the dataset is not the
    caller's) and dropped; a batch whose items were all unreadable is not yielded, so `len()` is an upper bound.
    """

    def __init__(self, dataset: Dataset, *, on_skip: Callable[[Skipped], None], **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=collate_skipping, **kwargs)
        self.on_skip = on_skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        readable, unreadable, first = 0, 0, None
        for images, labels, skipped in super().__iter__():
            for item in skipped:
                unreadable += 1
                first = first or item
                self.on_skip(item)
            if images is not None:
                readable += 1
                yield images, labels
        if readable == 0 and first is not None:
            # Nothing to compute on: say which files, instead of an empty torch.cat or a mean over 0 images.
            raise DataError(f"none of the {unreadable} images read could be decoded (e.g. {first.path}: "
                            f"{first.reason})", "replace the broken files or point --data at the right folder")


class RefitDemo(Dataset):
    """Fashion-MNIST refitted to another model's input: back to [0, 1], resize, repeat channels, renormalise.

    Lets any custom-sized model run offline on the demo data.
    """

    def __init__(self, base: Dataset, data_config: dict) -> None:
        from .fashion_mnist import MEAN, STD

        c, h, w = data_config["input_size"]
        self.base, self.channels, self.size = base, c, (h, w)
        self.src_mean, self.src_std = MEAN[0], STD[0]
        self.mean = torch.tensor(data_config["mean"]).view(-1, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        x = x * self.src_std + self.src_mean  # (1, 28, 28) in [0, 1]
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x[None], size=self.size, mode="bilinear", antialias=True)[0]
        x = x.expand(self.channels, -1, -1)  # (C, H, W)
        return (x - self.mean) / self.std, y


def _open_demo(split: str, cfg: dict, augment: bool) -> tuple[Dataset, str, tuple[str, ...]]:
    from .fashion_mnist import CLASSES, MEAN, STD, FashionMNIST

    name = DEMO_SPLITS[split]
    ds: Dataset = FashionMNIST(name, augment=augment)
    if cfg["input_size"] != (1, 28, 28) or cfg["mean"] != MEAN or cfg["std"] != STD:
        ds = RefitDemo(ds, cfg)
    return ds, name, CLASSES


def split_dir(root: Path, split: str) -> Path:
    """root/train, or root/val falling back to root/test; DataError naming what is missing."""
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} not found",
                        "pass a folder holding train/ and val/ (or test/), or `demo` for the offline demo")
    names = SPLIT_DIRS[split]
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{n}/" for n in names)
    raise DataError(f"data folder {str(root)!r} has no {wanted} subfolder",
                    f"put the {split} images in {root / names[0]}/<class>/<image>")


def _open_folder(root: Path, split: str, cfg: dict, train: bool,
                 augment: bool) -> tuple[ImageFolder, str, tuple[str, ...]]:
    directory = split_dir(root, split)
    ds = ImageFolder(directory, transform=make_transform(cfg, train=train, augment=augment))
    return ds, directory.name, tuple(ds.classes)


def subset_indices(n: int, limit: int | None, train: bool, seed: int) -> list[int] | None:
    """Indices of a deterministic `limit`-image subset, or None for all n.

    Train: a seeded random draw. Val: evenly spaced, independent of the seed. Not simply the first N: an
    ImageFolder is ordered by class, so the first 1000 ImageNet val images would all be one class.
    """
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ConfigError(f"limit {limit} must be a positive number of images", "drop it to use every image")
    if train:
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[:limit].tolist())
    return [i * n // limit for i in range(limit)]


def _sampler(dataset: Dataset, shuffle: bool, seed: int, distributed: bool) -> Sampler:
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed loading needs torch.distributed to be initialised",
                              "call torch.distributed.init_process_group first (torchrun does)")
        # The caller calls sampler.set_epoch(epoch) to reshuffle per epoch, as with any DistributedSampler.
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return SequentialSampler(dataset)


def _check_spec(spec: DataSpec, batch_size: int) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch size {batch_size} must be positive", "e.g. batch_size: 64")
    if spec.workers < 0:
        raise ConfigError(f"workers {spec.workers} must be >= 0", "use 0 to load in the main process")


def _ignore(_: Skipped) -> None:
    """on_skip for datasets that never skip (the demo)."""


def build_loader(spec: DataSpec, split: str, data_config: dict, *, train: bool, batch_size: int | None = None,
                 limit: int | None = None, seed: int = 0, augment: bool = True, distributed: bool = False,
                 shuffle: bool | None = None) -> tuple[DataLoader, DataInfo]:
    """A loader of (images (B, C, H, W), labels (B,)) for `split` ("train" or "val") and what it reads.

    train: augment (when `augment`), shuffle (unless `shuffle` says otherwise) and draw `limit` at random.
    The order is seeded: two runs with one seed see the same images in the same order. Augmentation randomness
    is seeded per worker when workers > 0; with workers=0 it comes from the process's global RNGs.
    """
    if split not in SPLIT_DIRS:
        raise ConfigError(f"unknown split {split!r}", "use 'train' or 'val'")
    batch_size = spec.batch_size if batch_size is None else batch_size
    _check_spec(spec, batch_size)
    cfg = override_config(data_config, spec.input_size, spec.mean, spec.std)
    if spec.path == DEMO:
        dataset, split_name, classes = _open_demo(split, cfg, augment=train and augment)
        name, skipped, on_skip = "fashion-mnist", [], _ignore
    else:
        root = Path(spec.path).expanduser()
        folder, split_name, classes = _open_folder(root, split, cfg, train, augment)
        dataset, name, skipped, on_skip = folder, root.resolve().name, folder.skipped, folder.note_skipped
    indices = subset_indices(len(dataset), limit, train, seed)  # type: ignore[arg-type]
    if indices is not None:
        dataset = Subset(dataset, indices)
    sampler = _sampler(dataset, train if shuffle is None else shuffle, seed, distributed)
    loader = SkippingLoader(dataset, on_skip=on_skip, batch_size=batch_size, sampler=sampler,
                            num_workers=spec.workers, generator=torch.Generator().manual_seed(seed + 1))
    num_images = len(dataset)  # type: ignore[arg-type]
    info = DataInfo(name=name, split=split_name, num_images=num_images, num_classes=len(classes), classes=classes,
                    skipped=skipped)
    return loader, info


def calibration_batch(spec: DataSpec, data_config: dict, n: int, seed: int) -> torch.Tensor:
    """n val images drawn at random (seeded), eval-transformed and stacked: (n, C, H, W).

    Fewer than n when the split has fewer readable images; DataError when it has none.
    """
    if n <= 0:
        raise ConfigError(f"calibration size {n} must be positive", "e.g. 256")
    loader, info = build_loader(spec, "val", data_config, train=False, batch_size=n, seed=seed, shuffle=True)
    parts: list[torch.Tensor] = []
    got = 0
    for images, _ in loader:
        parts.append(images[: n - got])
        got += len(parts[-1])
        if got >= n:
            break
    if not parts:
        raise DataError(f"no readable images in {info.name}/{info.split} ({len(info.skipped)} unreadable)",
                        "check the files listed as skipped")
    return torch.cat(parts)
