"""Checks of a data set against the model, run before any work: a mismatch found after an hour of fine-tuning
is an hour lost, and a head reading labels in another order reports a meaningless accuracy."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .folder import find_classes
from .loaders import DEMO, split_dir

SYNSET = re.compile(r"n\d{8}")
DEMO_CLASSES = 10


def folder_classes(path: str) -> Optional[list[str]]:
    """Class names of a data set in label order (ImageFolder's sorted folders, train split else val); None for the
    demo, or when neither split is there (the loader that needs one names what is missing)."""
    if path == DEMO:
        return None
    for split in ("train", "val"):
        try:
            return find_classes(split_dir(Path(path), split))
        except DataError:
            continue
    return None


def check_classes(path: str, num_classes: int, model_name: str) -> Optional[str]:
    """Refuse a data set whose class count differs from the model head's; return a warning (or None) when the
    folder names show that labels can't line up with an ImageNet head's order."""
    classes = folder_classes(path)
    if classes is None and path != DEMO:
        return None
    count = DEMO_CLASSES if classes is None else len(classes)
    if count != num_classes:
        raise DataError(f"{path!r} has {count} classes but {model_name}'s head has {num_classes}",
                        f"give --model-kwargs num_classes={count} (a new head, then fine-tune it with "
                        "stages.finetune.full) or a data set with the model's classes")
    if classes is None or num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    if all(SYNSET.fullmatch(c) for c in classes):
        if classes != sorted(synsets):
            return (f"{path!r}: its 1000 class folders are WordNet ids but not ImageNet-1k's; accuracy is measured "
                    "against a head trained on ImageNet-1k's labels")
        return None
    return (f"{path!r}: class folders are not ImageNet synset ids (e.g. {classes[0]!r}); labels follow the folders' "
            "sorted order, which must be ImageNet-1k's for the model's head (name them n01440764, ...)")
