"""Dataset preparation for training/eval: the synthetic set, and clear errors for missing real datasets.

Real COCO uses detectron2's builtin names (``coco_2017_train``, ``coco_2017_val``, ...), registered by
``detectron2.data`` under ``$DETECTRON2_DATASETS`` (default ``./datasets``), i.e.
``$DETECTRON2_DATASETS/coco/{train2017,val2017,annotations/instances_*.json}``.
"""
import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog

from .synthetic import TRAIN_NAME, VAL_NAME, register_synthetic_dataset, spec_from_cfg, synthetic_root

__all__ = ["prepare_datasets", "check_datasets_exist"]


def check_datasets_exist(names: Iterable[str]) -> None:
    """Raise a clear error for an unregistered dataset or one whose files are not on disk."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            raise KeyError(
                f"Dataset {name!r} is not registered. Registered datasets include: "
                f"{', '.join(sorted(n for n in registered if n.startswith(('coco_', 'd2norm_'))))} ..."
            )
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = meta.get(attr, None)
            if path is not None and not os.path.exists(path):
                root = os.environ.get("DETECTRON2_DATASETS", "datasets")
                raise FileNotFoundError(
                    f"Dataset {name!r}: its {attr} {path!r} does not exist. detectron2's builtin datasets live "
                    f"under $DETECTRON2_DATASETS (now {root!r}); e.g. COCO 2017 needs "
                    f"$DETECTRON2_DATASETS/coco/train2017, val2017 and annotations/instances_*2017.json. "
                    f"Download it there or point DETECTRON2_DATASETS at it."
                )


def prepare_datasets(cfg) -> None:
    """Generate/register the synthetic set if the cfg uses it, then check every dataset in the cfg exists."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n in (TRAIN_NAME, VAL_NAME) for n in names):
        register_synthetic_dataset(synthetic_root(cfg), spec_from_cfg(cfg))
    check_datasets_exist(names)
