"""Datasets: the bundled synthetic COCO-format set and checks for real (builtin) datasets."""
from .synthetic import (
    CLASSES,
    TRAIN_NAME,
    VAL_NAME,
    SyntheticSpec,
    ensure_synthetic_dataset,
    register_synthetic_dataset,
    spec_from_cfg,
    synthetic_root,
)
from .datasets import check_datasets_exist, prepare_datasets

__all__ = [
    "CLASSES", "TRAIN_NAME", "VAL_NAME", "SyntheticSpec", "ensure_synthetic_dataset", "register_synthetic_dataset",
    "spec_from_cfg", "synthetic_root", "check_datasets_exist", "prepare_datasets",
]
