"""What the d2norm hooks share: the regular-expression cfg check and the extra training-style data loader
(number / flag checks: :mod:`d2norm.utils.validation`)."""
import re

from detectron2.utils import comm

__all__ = ["Patterns", "build_d2norm_train_loader", "per_rank_batch"]


def Patterns(path: str, v) -> list:
    """Option check: a list of valid regular expressions (layer-name filters of the hooks)."""
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"{path} must be a list of regular expressions (strings), got {v!r}")
    for p in v:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{path}: {p!r} is not a valid regular expression ({e})") from None
    return list(v)


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
