"""What the d2norm hooks share: cfg value checks and the extra training-style data loader."""
import re

from detectron2.utils import comm

__all__ = ["is_int", "check_bool", "check_int", "check_patterns", "build_d2norm_train_loader", "per_rank_batch"]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bool(path: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{path} must be True or False, got {v!r}")


def check_int(path: str, v, lo: int, what: str = "") -> None:
    if not is_int(v) or v < lo:
        raise ValueError(f"{path} must be an integer >= {lo}{what}, got {v!r}")


def check_patterns(path: str, v) -> None:
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"{path} must be a list of regular expressions (strings), got {v!r}")
    for p in v:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{path}: {p!r} is not a valid regular expression ({e})") from None


def build_d2norm_train_loader(cfg, images_per_rank: int, build_train_loader=None):
    """A training-style loader (``cfg.DATASETS.TRAIN``, training mapper: batches carry ``instances`` for a
    detectron2 model in training mode) of ``images_per_rank`` images per rank, built on every rank (the training
    sampler draws a shared seed), without worker processes (as detectron2's PreciseBN: an idle iterator kept
    between runs then holds no processes or prefetched batches), for hooks that forward the model besides the
    training step."""
    from detectron2.data import build_detection_train_loader

    c = cfg.clone()
    c.defrost()
    c.SOLVER.IMS_PER_BATCH = images_per_rank * comm.get_world_size()
    c.DATALOADER.NUM_WORKERS = 0
    return (build_train_loader or build_detection_train_loader)(c)


def per_rank_batch(cfg, value: int) -> int:
    """``value`` if > 0, else the training batch per rank (SOLVER.IMS_PER_BATCH / world size, at least 1)."""
    return value if value > 0 else max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
