"""Setup-time checks of the norm choices in a detectron2 cfg, run before any data or model work
(``d2norm.engine.setup_cfg``, the tools' cfg loading, :func:`d2norm.layers.build_model`).

Errors (``ValueError`` naming the cfg key, the value and what to do):

* every ``NORM`` key of the cfg (any leaf named ``NORM``: ``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, the
  heads' ...), whether the model uses it or not, holds ``""`` or a valid norm name;
* ``DomainBN`` with several domains in a stock meta-architecture: stock modules call ``norm(x)`` without a
  domain, so the first forward would fail (rethinking §5.2: the domain is the FPN level of a shared head);
* ``D2NORM.SYNC_BN.GROUP_SIZE`` (with ``AnySyncBN``) and ``D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE`` (with
  ``DomainBNRetinaNet``) must divide the number of processes (rethinking A.5: groups of consecutive ranks);
* a RetinaNet head normalizing each FPN level with its own training batch statistics whose coarsest level
  (P7) has one value per channel per normalization group (e.g. 128 px images, one image per process).

Warnings (once per process and message):

* ``GhostBN`` whose ``D2NORM.GHOST_BN.SIZE`` is at least the number of examples the layer normalizes (images
  per process in the backbone / RetinaNet head, sampled RoIs in the box head): one ghost batch = plain BN
  (four-things §3.2 eq 4);
* ``MABN`` in a stock (non weight-centralized) backbone, FPN, box/mask head or RetinaNet head: mabn §4.2 eq 18
  centralizes the weights of the conv before each MABN, which d2norm's MABN builders do.
"""
import logging
from typing import Iterator, List, Tuple

__all__ = ["check_norm_cfg", "norm_keys"]

logger = logging.getLogger(__name__)
_warned = set()

#: stock detectron2 meta-architectures (and d2norm's that call their norms like them)
_STOCK_META_ARCHS = (
    "GeneralizedRCNN", "ProposalNetwork", "RetinaNet", "SemanticSegmentor", "PanopticFPN",
    "EvalNormGeneralizedRCNN", "EvalNormRetinaNet", "EvalNormMetaArch", "MABNRetinaNet", "DomainBNRetinaNet",
)
#: stock backbone builder -> d2norm's weight-centralized MABN twin (mabn §4.2 eq 18)
_MABN_BACKBONES = {
    "build_resnet_backbone": "build_mabn_resnet_backbone",
    "build_resnet_fpn_backbone": "build_mabn_resnet_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_mabn_retinanet_resnet_fpn_backbone",
}


def norm_keys(cfg, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """``(key, value)`` of every leaf named ``NORM`` in ``cfg`` (e.g. ``("MODEL.RESNETS.NORM", "GhostBN")``)."""
    from detectron2.config import CfgNode

    for k, v in cfg.items():
        if isinstance(v, CfgNode):
            yield from norm_keys(v, f"{prefix}{k}.")
        elif k == "NORM":
            yield f"{prefix}{k}", v


def _warn(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _images_per_process(cfg, world: int) -> int:
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


def _domain_layer(cfg):
    """A ``DomainBN`` layer built from ``cfg`` (its channel count does not matter to the domain rules)."""
    from .registry import get_norm, norm_options

    with norm_options(cfg):
        return get_norm("DomainBN", 8)


def _check_ghost_bn(cfg, keys, world: int) -> None:
    size = cfg.D2NORM.GHOST_BN.SIZE
    images = _images_per_process(cfg, world)
    per = f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} over {world} process(es)"
    for key, v in keys:
        if v != "GhostBN":
            continue
        if key in ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"):
            n = int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE) * images
            what = (f"at most {n} RoIs per process (MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE "
                    f"{cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} x {images} images, {per})")
        else:
            n = images
            what = f"{n} images per process ({per})"
        if size >= n:
            _warn(
                f"{key} 'GhostBN' with D2NORM.GHOST_BN.SIZE {size}: the layer normalizes {what}, so every batch is "
                f"a single ghost batch and GhostBN is plain BN (four-things §3.2). Set D2NORM.GHOST_BN.SIZE below "
                f"{n} (e.g. {max(1, n // 2)}) for ghost batches, or use NORM 'BN'."
            )


def _check_mabn(cfg, keys) -> None:
    values = dict(keys)
    backbone = cfg.MODEL.BACKBONE.NAME
    arch = cfg.MODEL.META_ARCHITECTURE
    eq18 = "its convs are not weight-centralized, which MABN needs (mabn §4.2 eq 18)"
    if values.get("MODEL.RESNETS.NORM") == "MABN" and backbone in _MABN_BACKBONES:
        _warn(f"MODEL.RESNETS.NORM 'MABN' with the stock backbone MODEL.BACKBONE.NAME {backbone!r}: {eq18}. "
              f"Use MODEL.BACKBONE.NAME {_MABN_BACKBONES[backbone]!r}.")
    if values.get("MODEL.FPN.NORM") == "MABN" and backbone in _MABN_BACKBONES and "fpn" in backbone:
        _warn(f"MODEL.FPN.NORM 'MABN' with the stock backbone MODEL.BACKBONE.NAME {backbone!r}: {eq18}. "
              f"Use MODEL.BACKBONE.NAME {_MABN_BACKBONES[backbone]!r}.")
    rcnn = "RCNN" in arch or arch == "PanopticFPN"
    head = cfg.MODEL.ROI_BOX_HEAD
    if rcnn and values.get("MODEL.ROI_BOX_HEAD.NORM") == "MABN" and head.NAME != "MABNConvFCHead" and head.NUM_CONV:
        _warn(f"MODEL.ROI_BOX_HEAD.NORM 'MABN' with MODEL.ROI_BOX_HEAD.NAME {head.NAME!r}: {eq18}. "
              f"Use MODEL.ROI_BOX_HEAD.NAME 'MABNConvFCHead'.")
    mask = cfg.MODEL.ROI_MASK_HEAD
    if (rcnn and cfg.MODEL.MASK_ON and values.get("MODEL.ROI_MASK_HEAD.NORM") == "MABN"
            and mask.NAME != "MABNMaskRCNNConvUpsampleHead"):
        _warn(f"MODEL.ROI_MASK_HEAD.NORM 'MABN' with MODEL.ROI_MASK_HEAD.NAME {mask.NAME!r}: {eq18}. "
              f"Use MODEL.ROI_MASK_HEAD.NAME 'MABNMaskRCNNConvUpsampleHead'.")
    if "RetinaNet" in arch and arch != "MABNRetinaNet" and values.get("MODEL.RETINANET.NORM") == "MABN":
        _warn(f"MODEL.RETINANET.NORM 'MABN' with MODEL.META_ARCHITECTURE {arch!r}: {eq18}. "
              f"Use MODEL.META_ARCHITECTURE 'MABNRetinaNet'.")


def _check_domain_bn(cfg, keys) -> None:
    arch = cfg.MODEL.META_ARCHITECTURE
    used = [k for k, v in keys if v == "DomainBN"]
    if not used or arch not in _STOCK_META_ARCHS or not _domain_layer(cfg).needs_domain:
        return
    d = cfg.D2NORM.DOMAIN_BN
    raise ValueError(
        f"{', '.join(used)} 'DomainBN' with D2NORM.DOMAIN_BN.NUM_DOMAINS {d.NUM_DOMAINS} (TRAIN_STATS "
        f"{d.TRAIN_STATS!r}, POP_STATS {d.POP_STATS!r}, AFFINE_PER_DOMAIN {d.AFFINE_PER_DOMAIN}) in "
        f"MODEL.META_ARCHITECTURE {arch!r}: stock detectron2 modules call their norm without a domain, so the first "
        f"forward would fail. DomainBN needs a model that passes the domain (rethinking §5.2): for RetinaNet's "
        f"per-level head use MODEL.META_ARCHITECTURE 'DomainBNRetinaNet' (options D2NORM.RETINANET_HEAD.*, "
        f"MODEL.RETINANET.NORM \"\"), or call the layer with domain=k / domain_scope(k) in your own module; "
        f"otherwise use another norm."
    )


def _check_group(key: str, g, world: int) -> None:
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
    images = _images_per_process(cfg, world)
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
    _check_domain_bn(cfg, keys)
    if any(v == "AnySyncBN" for _, v in keys):
        _check_group("D2NORM.SYNC_BN.GROUP_SIZE", cfg.D2NORM.SYNC_BN.GROUP_SIZE, world)
    if cfg.MODEL.META_ARCHITECTURE == "DomainBNRetinaNet" and cfg.D2NORM.RETINANET_HEAD.SYNC:
        _check_group("D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE", cfg.D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE, world)
    _check_ghost_bn(cfg, keys, world)
    _check_mabn(cfg, keys)
    _check_retinanet_coarsest_level(cfg, world)
