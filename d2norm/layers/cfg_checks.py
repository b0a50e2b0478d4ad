"""Setup-time checks of the norm choices in a detectron2 cfg, run before any data or model work
(``d2norm.engine.setup_cfg``, the tools' cfg loading, :func:`d2norm.layers.build_model`).

Errors (``ValueError`` naming the cfg key, the value and what to do):

* every ``NORM`` key of the cfg (any leaf named ``NORM``: ``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, the
  heads' ...), whether the model uses it or not, holds ``""`` or a valid norm name;
* each registered layer named in some ``NORM`` key runs its own setup rule
  (:meth:`~d2norm.layers.base.D2NormModule.check_cfg_use`, in the layer's file): DomainBN with several domains
  in a stock meta-architecture (an error), AnySyncBN's group size (must divide the number of processes),
  GhostBN's size against the examples per process and MABN in stock, non weight-centralized modules (warnings);
* ``D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE`` (with ``DomainBNRetinaNet``) must divide the number of processes
  (rethinking A.5: groups of consecutive ranks);
* a RetinaNet head normalizing each FPN level with its own training batch statistics whose coarsest level
  (P7) has one value per channel per normalization group (e.g. 128 px images, one image per process).

Warnings are said once per process and message (:func:`warn_once`).
"""
import logging
from typing import Iterator, List, Tuple

__all__ = ["check_norm_cfg", "norm_keys", "warn_once", "images_per_process", "check_group_size", "STOCK_META_ARCHS"]

logger = logging.getLogger(__name__)
_warned = set()

#: stock detectron2 meta-architectures (and d2norm's that call their norms like them)
STOCK_META_ARCHS = (
    "GeneralizedRCNN", "ProposalNetwork", "RetinaNet", "SemanticSegmentor", "PanopticFPN",
    "EvalNormGeneralizedRCNN", "EvalNormRetinaNet", "EvalNormMetaArch", "MABNRetinaNet", "DomainBNRetinaNet",
)


def norm_keys(cfg, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """``(key, value)`` of every leaf named ``NORM`` in ``cfg`` (e.g. ``("MODEL.RESNETS.NORM", "GhostBN")``)."""
    from detectron2.config import CfgNode

    for k, v in cfg.items():
        if isinstance(v, CfgNode):
            yield from norm_keys(v, f"{prefix}{k}.")
        elif k == "NORM":
            yield f"{prefix}{k}", v


def warn_once(msg: str) -> None:
    """Log ``msg`` as a warning once per process (a setup rule's warning)."""
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def images_per_process(cfg, world: int) -> int:
    """Images per process of a training: ``SOLVER.IMS_PER_BATCH`` over ``world`` processes (at least 1)."""
    return max(1, int(cfg.SOLVER.IMS_PER_BATCH) // max(1, world))


def _check_names(keys: List[Tuple[str, str]]) -> None:
    from .registry import valid_norm_names

    valid = valid_norm_names()
    for key, v in keys:
        if v is None or v == "":
            continue
        if not isinstance(v, str) or v not in valid:
            raise ValueError(
                f"{key}: Unknown norm {v!r} (every NORM key is checked, used by the model or not). "
                f"Valid names: {', '.join(valid)}, or \"\" for no norm."
            )


def check_group_size(key: str, g, world: int) -> None:
    """ValueError when the sync group size ``g`` (cfg key ``key``) does not divide ``world`` processes."""
    if isinstance(g, int) and not isinstance(g, bool) and g > 0 and world % g:
        raise ValueError(
            f"{key} {g} does not divide the number of processes ({world} = --num-gpus x --num-machines): "
            f"use 0 (all processes) or a divisor of {world}."
        )


def _fails_on_one_value(cfg, name: str) -> bool:
    """True when the norm ``name`` (built from ``cfg``'s options) cannot take a training batch of one value
    per channel (BN's batch variance is undefined; torch raises "Expected more than 1 value per channel")."""
    import torch

    from .registry import get_norm, norm_options

    try:
        with norm_options(cfg):
            layer = get_norm(name, 8)
        if layer is None:
            return False
        layer.train()(torch.zeros(1, 8, 1, 1))
    except ValueError as e:
        return "more than 1 value" in str(e)
    except Exception:  # a norm that needs something else to run (a process group, a domain): not this check
        return False
    return False


def _check_retinanet_coarsest_level(cfg, world: int) -> None:
    """A RetinaNet head that normalizes each FPN level with that level's own training batch statistics
    (DomainBNRetinaNet's per-level statistics, rethinking §5.2 Table 5; a BN-like MODEL.RETINANET.NORM, called
    once per level) needs more than one value per channel at the coarsest level: P7 (stride 128) of a 128 px
    image is 1x1, so one image per process fails at iteration 0 inside the head. Caught here, naming the keys."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" not in arch:
        return
    levels = [f for f in cfg.MODEL.RETINANET.IN_FEATURES if f[:1] == "p" and f[1:].isdigit()]
    if not levels:
        return
    top = max(levels, key=lambda f: int(f[1:]))
    stride = 2 ** int(top[1:])
    side = -(-int(cfg.INPUT.MAX_SIZE_TRAIN) // stride)
    images = images_per_process(cfg, world)
    if arch == "DomainBNRetinaNet":
        h = cfg.D2NORM.RETINANET_HEAD
        g = h.SYNC_GROUP_SIZE
        if h.TRAIN_STATS != "per_level" or not isinstance(g, int) or g < 0:
            return  # a bad SYNC_GROUP_SIZE is reported by the head's own option check
        sync = (g or world) if h.SYNC else 1
        what, values = "D2NORM.RETINANET_HEAD.TRAIN_STATS 'per_level'", images * side * side * sync
    else:
        name = cfg.MODEL.RETINANET.NORM
        if not name or not _fails_on_one_value(cfg, name):
            return
        what, values = f"MODEL.RETINANET.NORM {name!r}", images * side * side
    if values > 1:
        return
    raise ValueError(
        f"{what}: the RetinaNet head normalizes level {top!r} (stride {stride}) with that level's own training "
        f"batch statistics, and INPUT.MAX_SIZE_TRAIN {cfg.INPUT.MAX_SIZE_TRAIN} with {images} image(s) per process "
        f"(SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} over {world} process(es)) gives it at most {values} value "
        f"per channel (a {side}x{side} map): a batch variance needs more than one. Use SOLVER.IMS_PER_BATCH of at "
        f"least {2 * world}, larger training images, or statistics shared over the levels."
    )


def check_norm_cfg(cfg, world_size: int = None) -> None:
    """Run every check of the module docstring on ``cfg`` (``world_size``: default the current process
    group's size, 1 outside one)."""
    from detectron2.utils import comm

    from ..config import add_d2norm_config

    cfg = add_d2norm_config(cfg.clone())
    world = comm.get_world_size() if world_size is None else int(world_size)
    keys = list(norm_keys(cfg))
    _check_names(keys)
    from .registry import NORM_REGISTRY

    for name, cls in NORM_REGISTRY:  # each layer's own setup rule (D2NormModule.check_cfg_use)
        used = [k for k, v in keys if v == name]
        if used:
            cls.check_cfg_use(cfg, used, world)
    if cfg.MODEL.META_ARCHITECTURE == "DomainBNRetinaNet" and cfg.D2NORM.RETINANET_HEAD.SYNC:
        check_group_size("D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE", cfg.D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE, world)
    _check_retinanet_coarsest_level(cfg, world)
