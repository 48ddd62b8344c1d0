"""Data loading: skip-tolerant ImageFolder, timm transforms, seeded loaders, the Fashion-MNIST demo."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltmpctl.data import (DataSpec, ImageFolder, Skipped, build_loader, calibration_batch, collate_skipping,
                          make_transform, override_config)
from ltmpctl.data.loaders import subset_indices
from ltmpctl.data.transforms import _safe_posterize
from ltmpctl.errors import ConfigError, DataError

CFG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear",
           crop_pct=0.875)
GRAY_CFG = dict(CFG, input_size=(1, 16, 16), mean=(0.5,), std=(0.25,))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")


def _image_bytes(fmt: str, seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # noise: doesn't compress, so cuts bite
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_split(split: Path) -> dict[str, list[str]]:
    """2 classes, 5 good images, 4 bad ones; returns {"good": [...], "bad": [...]} file names."""
    files = {
        "cat/a.png": _image_bytes("PNG", 0),
        "cat/b.jpg": _image_bytes("JPEG", 1),
        "cat/c.png": _image_bytes("PNG", 2),
        "dog/d.jpeg": _image_bytes("JPEG", 3),
        "dog/sub/e.PNG": _image_bytes("PNG", 4),  # nested folder and upper-case extension
        "cat/zero.jpg": b"",
        "dog/trunc.png": _image_bytes("PNG", 5)[:400],
        "dog/trunc2.jpg": _image_bytes("JPEG", 6)[:300],  # verify() would pass this one
        "dog/text.jpg": b"this is not an image\n",
        "dog/notes.txt": b"ignored: not an image extension\n",
        ".hidden/x.png": _image_bytes("PNG", 7),  # not a class
    }
    for name, data in files.items():
        path = split / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"good": ["a.png", "b.jpg", "c.png", "d.jpeg", "e.PNG"],
            "bad": ["zero.jpg", "trunc.png", "trunc2.jpg", "text.jpg"]}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _write_split(tmp_path / "train")
    _write_split(tmp_path / "val")
    return tmp_path


def _collect(loader) -> tuple[list[torch.Tensor], list[int]]:
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.extend(y.tolist())
    return images, labels


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_loader_skips_unreadable_images(tree: Path, workers: int) -> None:
    spec = DataSpec(path=str(tree), batch_size=3, workers=workers)
    loader, info = build_loader(spec, "val", CFG, train=False)
    assert (info.split, info.num_images, info.num_classes, info.classes) == ("val", 9, 2, ("cat", "dog"))
    assert info.skipped == []  # lazy: nothing decoded yet
    images, labels = _collect(loader)
    assert all(x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 for x in images)
    assert labels == [0, 0, 0, 1, 1]  # a, b, c | d, sub/e
    reasons = {Path(p).name: r for p, r in info.skipped}
    assert set(reasons) == {"zero.jpg", "trunc.png", "trunc2.jpg", "text.jpg"}
    assert reasons["zero.jpg"] == "empty file" and reasons["text.jpg"] == "not an image"
    _collect(loader)  # a second epoch reports nothing twice
    assert len(info.skipped) == 4


def test_all_skipped_batch_is_dropped(tree: Path) -> None:
    loader, info = build_loader(DataSpec(path=str(tree), batch_size=1, workers=0), "val", CFG, train=False)
    batches = list(loader)
    assert len(batches) == 5 and len(loader) == 9
    assert collate_skipping([Skipped("a", "x"), Skipped("b", "y")]) == (None, None, [Skipped("a", "x"),
                                                                                    Skipped("b", "y")])


def test_training_augmentation_runs(tree: Path) -> None:
    loader, info = build_loader(DataSpec(path=str(tree), batch_size=4, workers=0), "train", CFG, train=True)
    for _ in range(3):
        images, labels = _collect(loader)
        assert sorted(labels) == [0, 0, 0, 1, 1] and all(x.shape[1:] == (3, 16, 16) for x in images)
    assert len(info.skipped) == 4


def test_permission_denied_is_skipped(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tree / "val" / "cat" / "a.png"
    if os.geteuid() == 0:  # root reads files whatever their mode: make the open fail the way it would
        real_open = Image.open

        def refuse(path, *args, **kwargs):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refuse)
    else:
        locked.chmod(0)
    try:
        loader, info = build_loader(DataSpec(path=str(tree), workers=0), "val", CFG, train=False)
        assert len(_collect(loader)[1]) == 4
        assert (str(locked), "permission denied") in info.skipped
    finally:
        locked.chmod(0o644)


def test_rand_augment_posterize_zero_bits_gives_black() -> None:
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(_safe_posterize(img, 0)).max() == 0
    assert np.asarray(_safe_posterize(img, 8)).tolist() == np.asarray(img).tolist()
    from timm.data.auto_augment import RandAugment

    tf = make_transform(CFG, train=True)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name.startswith("Posterize"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that asks Pillow for 0 bits
    assert np.asarray(op(img)).max() == 0


def test_dataset_direct_use_records_skips(tree: Path) -> None:
    ds = ImageFolder(tree / "train")
    items = [ds[i] for i in range(len(ds))]
    assert sum(isinstance(it, Skipped) for it in items) == 4 == len(ds.skipped)
    assert all(isinstance(it[0], Image.Image) for it in items if not isinstance(it, Skipped))


def _one_line_data_error(spec_path: Path, split: str = "val") -> str:
    with pytest.raises(DataError) as e:
        build_loader(DataSpec(path=str(spec_path), workers=0), split, CFG, train=False)
    text = str(e.value)
    assert "\n" not in text and e.value.hint
    return text


def test_missing_root(tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in _one_line_data_error(tmp_path / "nope")


def test_missing_val_and_test(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    text = _one_line_data_error(tmp_path)
    assert "val/ or test/" in text and str(tmp_path) in text


def test_split_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "loose.png").write_bytes(_image_bytes("PNG", 0))
    assert "no class subfolders" in _one_line_data_error(tmp_path)


def test_empty_class_folders(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
    assert "no images" in _one_line_data_error(tmp_path)


def test_one_empty_class_keeps_labels_aligned(tmp_path: Path) -> None:
    (tmp_path / "val" / "ant").mkdir(parents=True)  # empty, still label 0
    (tmp_path / "val" / "bee").mkdir()
    (tmp_path / "val" / "bee" / "x.png").write_bytes(_image_bytes("PNG", 0))
    loader, info = build_loader(DataSpec(path=str(tmp_path), workers=0), "val", CFG, train=False)
    assert info.num_classes == 2 and _collect(loader)[1] == [1]


def test_test_folder_serves_as_val(tmp_path: Path) -> None:
    _write_split(tmp_path / "test")
    loader, info = build_loader(DataSpec(path=str(tmp_path), workers=0), "val", CFG, train=False)
    assert info.split == "test" and len(_collect(loader)[1]) == 5


def test_unknown_split_and_bad_sizes(tree: Path) -> None:
    with pytest.raises(ConfigError):
        build_loader(DataSpec(path=str(tree)), "test", CFG, train=False)
    with pytest.raises(ConfigError):
        build_loader(DataSpec(path=str(tree)), "val", CFG, train=False, batch_size=0)
    with pytest.raises(ConfigError):
        build_loader(DataSpec(path=str(tree), workers=0), "val", CFG, train=False, limit=0)
    with pytest.raises(ConfigError, match="initialised"):
        build_loader(DataSpec(path=str(tree), workers=0), "val", CFG, train=False, distributed=True)


def test_override_config() -> None:
    cfg = override_config(CFG, input_size=[1, 8, 12], mean=[0.1], std=[0.2])
    assert cfg["input_size"] == (1, 8, 12) and cfg["mean"] == (0.1,) and cfg["std"] == (0.2,)
    assert cfg["crop_pct"] == 0.875 and CFG["input_size"] == (3, 16, 16)  # a copy
    assert override_config(CFG) == CFG
    bad = [dict(input_size=(16, 16)), dict(input_size=(3, 16, 0)), dict(input_size=(3, 16.0, 16)),
           dict(input_size=(1, 16, 16)),  # mean/std still have 3 entries
           dict(mean=(0.5, 0.5)), dict(std=(0.2, 0.0, 0.2)), dict(mean=("a", "b", "c")), dict(std=0.5)]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            override_config(CFG, **kwargs)
    with pytest.raises(ConfigError, match="lacks"):
        override_config({"input_size": (3, 4, 4)})


def test_spec_overrides_reach_the_loader(tree: Path) -> None:
    spec = DataSpec(path=str(tree), input_size=(3, 12, 8), batch_size=8, workers=0)
    loader, _ = build_loader(spec, "val", CFG, train=False)
    assert next(iter(loader))[0].shape[1:] == (3, 12, 8)


def test_grayscale_config(tree: Path) -> None:
    loader, _ = build_loader(DataSpec(path=str(tree), workers=0), "val", GRAY_CFG, train=False)
    images, labels = _collect(loader)
    assert images[0].shape[1:] == (1, 16, 16) and len(labels) == 5
    train_tf = make_transform(GRAY_CFG, train=True)
    assert train_tf(Image.new("RGB", (20, 30), (10, 20, 30))).shape == (1, 16, 16)
    assert make_transform(CFG, train=False)(Image.new("L", (20, 30))).shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="channels"):
        make_transform(dict(CFG, input_size=(2, 16, 16), mean=(0, 0), std=(1, 1)), train=False)


def test_seeded_order_is_reproducible(tree: Path) -> None:
    def order(seed: int) -> list[int]:
        spec = DataSpec(path=str(tree), batch_size=2, workers=0)
        loader, _ = build_loader(spec, "val", CFG, train=True, augment=False, seed=seed)
        return [x.sum().item() for batch, _ in loader for x in batch]  # image sums identify the images

    assert order(3) == order(3)
    assert len({tuple(order(s)) for s in range(4)}) > 1


def test_subset_indices() -> None:
    assert subset_indices(10, None, True, 0) is None and subset_indices(10, 10, False, 0) is None
    assert subset_indices(10, 4, True, 1) == subset_indices(10, 4, True, 1)
    assert subset_indices(10, 5, False, 0) == [0, 2, 4, 6, 8] == subset_indices(10, 5, False, 9)
    assert len(set(subset_indices(1000, 999, True, 0))) == 999


def test_distributed_sampler(tree: Path, tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader, _ = build_loader(DataSpec(path=str(tree), workers=0), "val", CFG, train=True, augment=False,
                                 distributed=True, seed=5)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 5
        assert sorted(_collect(loader)[1]) == [0, 0, 0, 1, 1]
    finally:
        dist.destroy_process_group()


def test_calibration_batch_from_folder(tree: Path) -> None:
    spec = DataSpec(path=str(tree), workers=0)
    a, b = calibration_batch(spec, CFG, 3, seed=1), calibration_batch(spec, CFG, 3, seed=1)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
    assert calibration_batch(spec, CFG, 50, seed=0).shape[0] == 5  # only 5 readable images


@needs_fmnist
def test_demo_loader() -> None:
    from ltmpctl.demo import DATA_CONFIG

    loader, info = build_loader(DataSpec(batch_size=8, workers=0), "val", DATA_CONFIG, train=False, limit=20)
    assert (info.name, info.split, info.num_images, info.num_classes) == ("fashion-mnist", "test", 20, 10)
    images, labels = _collect(loader)
    assert images[0].shape == (8, 1, 28, 28) and len(labels) == 20 and info.skipped == []
    loader, info = build_loader(DataSpec(workers=0), "train", DATA_CONFIG, train=True, limit=16, batch_size=16)
    assert info.split == "train" and next(iter(loader))[0].shape == (16, 1, 28, 28)


@needs_fmnist
def test_demo_seeded_order_and_refit() -> None:
    from ltmpctl.demo import DATA_CONFIG

    def first_batch(seed: int) -> torch.Tensor:
        loader, _ = build_loader(DataSpec(workers=0), "train", DATA_CONFIG, train=True, augment=False,
                                 limit=50, batch_size=10, seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(7), first_batch(7)) and not torch.equal(first_batch(7), first_batch(8))
    spec = DataSpec(workers=0, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    x = calibration_batch(spec, DATA_CONFIG, 4, seed=0)
    assert x.shape == (4, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5  # [0, 1] pixels renormalised with 0.5/0.5
