"""Data sets: the offline Fashion-MNIST demo and ImageFolder trees."""
from .folder import ImageFolder, Skipped, collate_skipping
from .loaders import DataInfo, DataSpec, SkippingLoader, build_loader, calibration_batch
from .transforms import make_transform, override_config

__all__ = [
    "DataInfo", "DataSpec", "ImageFolder", "Skipped", "SkippingLoader", "build_loader", "calibration_batch",
    "collate_skipping", "make_transform", "override_config",
]
