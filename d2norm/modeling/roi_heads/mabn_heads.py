"""R-CNN box and mask heads with MABN after weight-centralized convs (mabn §4.2 eq 18, Appendix B.3).

detectron2's own heads built with ``NORM: "MABN"``; every conv feeding an MABN layer is then made a
:class:`~d2norm.layers.mabn.CenteredConv2d` (:func:`~d2norm.layers.mabn.centralize_mabn_convs`), checked, and
the heads' MABN layers get ``warmup_iters`` from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS`` (Appendix B.3: the
heads use batch statistics during the first 10 000 iterations; -1 = ``D2NORM.MABN.WARMUP_ITERS``).
"""
from detectron2.config import configurable
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

from ..backbone.mabn_resnet import mabn_warmup_from_cfg, prepare_mabn_part, require_norm

__all__ = ["MABNConvFCHead", "MABNMaskRCNNConvUpsampleHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class MABNConvFCHead(FastRCNNConvFCHead):
    """detectron2's conv+fc box head (e.g. 4conv1fc, mabn Appendix B.3) with MABN after centered convs.

    Needs ``MODEL.ROI_BOX_HEAD.NORM: "MABN"``; warm-up from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS``.
    """

    @configurable
    def __init__(self, input_shape, *, warmup_iters: int, **kwargs):
        super().__init__(input_shape, **kwargs)
        prepare_mabn_part(self, warmup_iters, "MABN box head")

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_norm(cfg.MODEL.ROI_BOX_HEAD.NORM, ("MABN",), "MODEL.ROI_BOX_HEAD.NORM")
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
        prepare_mabn_part(self, warmup_iters, "MABN mask head")

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_norm(cfg.MODEL.ROI_MASK_HEAD.NORM, ("MABN",), "MODEL.ROI_MASK_HEAD.NORM")
        ret = super().from_config(cfg, input_shape)
        ret["warmup_iters"] = mabn_warmup_from_cfg(cfg, "HEAD")
        return ret
