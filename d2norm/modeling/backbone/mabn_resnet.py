"""MABN ResNet backbones and heads (mabn §4.2 eq 18, §5.2, Appendix B.3).

MABN normalizes without mean centering (mabn eq 15); Weight Centralization of the preceding convolution
(eq 18, :class:`~d2norm.layers.mabn.CenteredConv2d`) compensates (§4.2, "Centralizing weights of convolution
kernel"). These builders use detectron2's own ResNet / FPN / RoI heads with ``NORM: "MABN"`` and then turn every
detectron2 ``Conv2d`` whose ``norm`` is an MABN layer into a ``CenteredConv2d`` — in the stem, in every block
(conv1-conv3 and the projection shortcut), in the FPN when ``MODEL.FPN.NORM`` is "MABN", and in the conv layers
of the MABN box/mask heads. The conversion changes the module's class in place (``CenteredConv2d`` adds no
state, it only centers the weight in ``forward``), so module names, parameters and state dicts stay
detectron2's and every reference to the conv (e.g. the heads' ``conv_norm_relus`` lists) sees the centered one.
After the build every MABN layer is checked to be the norm of a centered conv (ValueError otherwise).

Warm-up (mabn Appendix B.3: the heads use batch statistics during the first 10 000 iterations): each part gets
its MABN layers' ``warmup_iters`` from ``D2NORM.MABN_MODEL.{BACKBONE,HEAD}_WARMUP_ITERS`` (-1 = the layer
default ``D2NORM.MABN.WARMUP_ITERS``). An MABN layer counts its own training forwards (``num_batches_tracked``);
every layer here runs once per training iteration, so the count is the iteration number.

Registered: backbones ``build_mabn_resnet_backbone``, ``build_mabn_resnet_fpn_backbone``,
``build_mabn_retinanet_resnet_fpn_backbone``; box head ``MABNConvFCHead``; mask head
``MABNMaskRCNNConvUpsampleHead``. detectron2 v0.6's ``RetinaNetHead`` uses plain ``nn.Conv2d`` without a norm
attribute; its centered MABN version is the meta-architecture ``MABNRetinaNet``
(``d2norm/modeling/meta_arch/mabn_retinanet.py``).

Freezing (``MODEL.BACKBONE.FREEZE_AT``) stops γ/β of frozen MABN layers, not their statistics (detectron2's
``freeze`` only converts BatchNorm); the paper's COCO runs train from scratch with nothing frozen.
"""
import numbers
from typing import List

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from .fpn import fpn_from_cfg, rcnn_top_block, retinanet_top_block
from ...layers.mabn import CenteredConv2d, MABN2d
from ...layers.registry import norm_options

__all__ = [
    "centralize_mabn_convs",
    "check_mabn_wiring",
    "set_mabn_warmup",
    "mabn_warmup_from_cfg",
    "build_mabn_resnet_backbone",
    "build_mabn_resnet_fpn_backbone",
    "build_mabn_retinanet_resnet_fpn_backbone",
    "MABNConvFCHead",
    "MABNMaskRCNNConvUpsampleHead",
]


def centralize_mabn_convs(module: nn.Module) -> List[str]:
    """Make every detectron2 ``Conv2d`` in ``module`` whose norm is :class:`MABN2d` a ``CenteredConv2d`` (eq 18).

    In place (class swap, see the module docstring); returns the names of the converted convs.
    """
    converted = []
    for name, m in module.named_modules():
        if isinstance(m, Conv2d) and not isinstance(m, CenteredConv2d) and isinstance(m.norm, MABN2d):
            m.__class__ = CenteredConv2d
            converted.append(name)
    return converted


def check_mabn_wiring(module: nn.Module, where: str) -> None:
    """ValueError unless every :class:`MABN2d` in ``module`` is the norm of a ``CenteredConv2d`` (mabn §4.2)."""
    centered = {id(m.norm) for m in module.modules() if isinstance(m, CenteredConv2d)}
    loose = [name for name, m in module.named_modules() if isinstance(m, MABN2d) and id(m) not in centered]
    if loose:
        raise ValueError(f"{where}: MABN layers not preceded by a weight-centralized conv (mabn eq 18): "
                         f"{', '.join(loose)} (deformable convs are not supported)")


def set_mabn_warmup(module: nn.Module, warmup_iters: int) -> int:
    """Set ``warmup_iters`` of every MABN layer in ``module``; returns how many layers were set."""
    if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, numbers.Integral) or warmup_iters < 0:
        raise ValueError(f"MABN warm-up iterations must be an integer >= 0, got {warmup_iters!r}")
    layers = [m for m in module.modules() if isinstance(m, MABN2d)]
    for m in layers:
        m.warmup_iters = int(warmup_iters)
    return len(layers)


def mabn_warmup_from_cfg(cfg, part: str) -> int:
    """``D2NORM.MABN_MODEL.<part>_WARMUP_ITERS`` for part "BACKBONE" or "HEAD"; -1 = ``D2NORM.MABN.WARMUP_ITERS``."""
    key = f"{part}_WARMUP_ITERS"
    value = cfg.D2NORM.MABN_MODEL[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < -1:
        raise ValueError(f"D2NORM.MABN_MODEL.{key} must be an integer >= 0, or -1 for D2NORM.MABN.WARMUP_ITERS; "
                         f"got {value!r}")
    return int(cfg.D2NORM.MABN.WARMUP_ITERS) if value == -1 else int(value)


def _require(value, allowed, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be {' or '.join(repr(a) for a in allowed)} for this MABN model "
                         f"(every norm is MABN, mabn §4.2), got {value!r}")


def _prepare(module: nn.Module, warmup_iters: int, where: str) -> nn.Module:
    centralize_mabn_convs(module)
    check_mabn_wiring(module, where)
    set_mabn_warmup(module, warmup_iters)
    return module


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet with ``MODEL.RESNETS.NORM: "MABN"`` and a centered conv before every MABN (eq 18)."""
    _require(cfg.MODEL.RESNETS.NORM, ("MABN",), "MODEL.RESNETS.NORM")
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convs cannot be weight-centralized here; "
                         f"got {cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE!r}")
    with norm_options(cfg):
        resnet = build_resnet_backbone(cfg, input_shape)
    return _prepare(resnet, mabn_warmup_from_cfg(cfg, "BACKBONE"), "MABN ResNet")


def _fpn(cfg, bottom_up, top_block):
    _require(cfg.MODEL.FPN.NORM, ("", "MABN"), "MODEL.FPN.NORM")
    return _prepare(fpn_from_cfg(cfg, bottom_up, top_block), mabn_warmup_from_cfg(cfg, "BACKBONE"), "MABN FPN")


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_fpn_backbone(cfg, input_shape):
    """MABN ResNet + FPN (P6 by max-pooling), mabn §5.2 / Appendix B.3 Mask R-CNN."""
    bottom_up = build_mabn_resnet_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, rcnn_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_mabn_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """MABN ResNet + FPN with P6/P7 from res5 (RetinaNet backbone, mabn Appendix B.3 Table 7)."""
    bottom_up = build_mabn_resnet_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, retinanet_top_block(cfg, bottom_up))


@ROI_BOX_HEAD_REGISTRY.register()
class MABNConvFCHead(FastRCNNConvFCHead):
    """detectron2's conv+fc box head (e.g. 4conv1fc, mabn Appendix B.3) with MABN after centered convs.

    Needs ``MODEL.ROI_BOX_HEAD.NORM: "MABN"``; warm-up from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS``.
    """

    @configurable
    def __init__(self, input_shape, *, warmup_iters: int, **kwargs):
        super().__init__(input_shape, **kwargs)
        _prepare(self, warmup_iters, "MABN box head")

    @classmethod
    def from_config(cls, cfg, input_shape):
        _require(cfg.MODEL.ROI_BOX_HEAD.NORM, ("MABN",), "MODEL.ROI_BOX_HEAD.NORM")
        ret = super().from_config(cfg, input_shape)
        ret["warmup_iters"] = mabn_warmup_from_cfg(cfg, "HEAD")
        return ret


@ROI_MASK_HEAD_REGISTRY.register()
class MABNMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """detectron2's mask head with MABN after centered convs (mabn Appendix B.3).

    Needs ``MODEL.ROI_MASK_HEAD.NORM: "MABN"``; warm-up from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS``.
    """

    @configurable
    def __init__(self, input_shape, *, warmup_iters: int, **kwargs):
        super().__init__(input_shape, **kwargs)
        _prepare(self, warmup_iters, "MABN mask head")

    @classmethod
    def from_config(cls, cfg, input_shape):
        _require(cfg.MODEL.ROI_MASK_HEAD.NORM, ("MABN",), "MODEL.ROI_MASK_HEAD.NORM")
        ret = super().from_config(cfg, input_shape)
        ret["warmup_iters"] = mabn_warmup_from_cfg(cfg, "HEAD")
        return ret
