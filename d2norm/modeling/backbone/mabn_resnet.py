"""MABN ResNet backbones (mabn §4.2 eq 18, §5.2, Appendix B.3) and the MABN model helpers its heads share.

MABN normalizes without mean centering (mabn eq 15); Weight Centralization of the preceding convolution
(eq 18, :class:`~d2norm.layers.mabn.CenteredConv2d`) compensates (§4.2, "Centralizing weights of convolution
kernel"). These builders use detectron2's own ResNet / FPN / RoI heads with ``NORM: "MABN"`` and then turn every
detectron2 ``Conv2d`` whose ``norm`` is an MABN layer into a ``CenteredConv2d`` — in the stem, in every block
(conv1-conv3 and the projection shortcut), in the FPN when ``MODEL.FPN.NORM`` is "MABN", and in the conv layers
of the MABN box/mask heads (``roi_heads/mabn_heads.py``). The conversion
(:func:`~d2norm.layers.mabn.centralize_mabn_convs`) changes the module's class in place (``CenteredConv2d`` adds
no state, it only centers the weight in ``forward``), so module names, parameters and state dicts stay
detectron2's and every reference to the conv (e.g. the heads' ``conv_norm_relus`` lists) sees the centered one.
After the build every MABN layer is checked to be the norm of a centered conv (ValueError otherwise).

Warm-up (mabn Appendix B.3: the heads use batch statistics during the first 10 000 iterations): each part gets
its MABN layers' ``warmup_iters`` from ``D2NORM.MABN_MODEL.{BACKBONE,HEAD}_WARMUP_ITERS`` (-1 = the layer
default ``D2NORM.MABN.WARMUP_ITERS``). An MABN layer counts its own training forwards (``num_batches_tracked``);
every layer here runs once per training iteration, so the count is the iteration number.

Registered: backbones ``build_mabn_resnet_backbone``, ``build_mabn_resnet_fpn_backbone``,
``build_mabn_retinanet_resnet_fpn_backbone`` (box head ``MABNConvFCHead`` and mask head
``MABNMaskRCNNConvUpsampleHead``: ``d2norm/modeling/roi_heads/mabn_heads.py``). detectron2 v0.6's
``RetinaNetHead`` uses plain ``nn.Conv2d`` without a norm attribute; its centered MABN version is the
meta-architecture ``MABNRetinaNet`` (``d2norm/modeling/meta_arch/mabn_retinanet.py``).

Freezing (``MODEL.BACKBONE.FREEZE_AT``) stops γ/β of frozen MABN layers, not their statistics (detectron2's
``freeze`` only converts BatchNorm); the paper's COCO runs train from scratch with nothing frozen.
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn

from .fpn import fpn_from_cfg, rcnn_top_block, retinanet_top_block
from ...layers.mabn import centralize_mabn_convs, check_mabn_wiring, set_mabn_warmup
from ...layers.registry import norm_options
from ...options import Option, check_values, declare_node
from ...utils.validation import check_int

__all__ = [
    "mabn_warmup_from_cfg",
    "prepare_mabn_part",
    "require_norm",
    "build_mabn_resnet_backbone",
    "build_mabn_resnet_fpn_backbone",
    "build_mabn_retinanet_resnet_fpn_backbone",
]


def _warmup(label, v):
    if isinstance(v, bool) or v != -1:
        check_int(label, v, minimum=0, note=", or -1 for D2NORM.MABN.WARMUP_ITERS")
    return v


NODE = "MABN_MODEL"
OPTIONS = declare_node(NODE, (
    Option("BACKBONE_WARMUP_ITERS", -1, "Warm-up iterations (batch statistics; D2NORM.MABN.WARMUP_ITERS semantics) of "
           "the MABN layers in the backbone (ResNet and FPN) of build_mabn_*_backbone; -1 = D2NORM.MABN.WARMUP_ITERS.",
           check=_warmup),
    Option("HEAD_WARMUP_ITERS", 10000, "The same for the MABN box/mask heads (MABNConvFCHead, "
           "MABNMaskRCNNConvUpsampleHead) and MABNRetinaNet's head; Appendix B.3: 'batch statistics in normalization "
           "layers on head during first 10,000 iterations'. -1 = D2NORM.MABN.WARMUP_ITERS.", check=_warmup),
), doc="MABN backbones and heads (weight-centralized convs before every MABN): mabn §4.2 eq 18, §5.2, Appendix B.3")


def mabn_warmup_from_cfg(cfg, part: str) -> int:
    """``D2NORM.MABN_MODEL.<part>_WARMUP_ITERS`` for part "BACKBONE" or "HEAD"; -1 = ``D2NORM.MABN.WARMUP_ITERS``."""
    key = f"{part}_WARMUP_ITERS"
    value = cfg.D2NORM.MABN_MODEL[key]
    check_values(NODE, **{key: value})
    if value != -1:
        return int(value)
    return int(cfg.D2NORM.MABN.WARMUP_ITERS)


def require_norm(value, allowed, key: str) -> None:
    """ValueError unless the cfg norm ``key`` is one of ``allowed`` (every norm of an MABN model is MABN)."""
    if value not in allowed:
        raise ValueError(f"{key} must be {' or '.join(repr(a) for a in allowed)} for this MABN model "
                         f"(every norm is MABN, mabn §4.2), got {value!r}")


def prepare_mabn_part(module: nn.Module, warmup_iters: int, where: str, hint: str = "") -> nn.Module:
    """Centralize the convs feeding MABN layers, check that every MABN layer has one, set the warm-up."""
    centralize_mabn_convs(module)
    check_mabn_wiring(module, where, hint)
    set_mabn_warmup(module, warmup_iters)
    return module


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet with ``MODEL.RESNETS.NORM: "MABN"`` and a centered conv before every MABN (eq 18)."""
    require_norm(cfg.MODEL.RESNETS.NORM, ("MABN",), "MODEL.RESNETS.NORM")
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convs cannot be weight-centralized here; "
                         f"got {cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE!r}")
    with norm_options(cfg):
        resnet = build_resnet_backbone(cfg, input_shape)
    return prepare_mabn_part(resnet, mabn_warmup_from_cfg(cfg, "BACKBONE"), "MABN ResNet")


def _fpn(cfg, bottom_up, top_block):
    require_norm(cfg.MODEL.FPN.NORM, ("", "MABN"), "MODEL.FPN.NORM")
    return prepare_mabn_part(fpn_from_cfg(cfg, bottom_up, top_block), mabn_warmup_from_cfg(cfg, "BACKBONE"), "MABN FPN")


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
