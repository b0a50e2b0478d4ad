"""FPN on top of any bottom-up network, built from cfg exactly like detectron2's ``build_resnet_fpn_backbone`` /
``build_retinanet_resnet_fpn_backbone`` (shared by the XBNBlock and MABN backbones)."""
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from ...layers.registry import norm_options

__all__ = ["fpn_from_cfg", "rcnn_top_block", "retinanet_top_block"]


def fpn_from_cfg(cfg, bottom_up, top_block) -> FPN:
    """detectron2's FPN from ``cfg.MODEL.FPN`` over ``bottom_up``, with ``cfg.D2NORM`` bound for its norms."""
    with norm_options(cfg):
        return FPN(
            bottom_up=bottom_up,
            in_features=cfg.MODEL.FPN.IN_FEATURES,
            out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            norm=cfg.MODEL.FPN.NORM,
            top_block=top_block,
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )


def rcnn_top_block(cfg, bottom_up):
    """P6 by max-pooling (Faster/Mask R-CNN)."""
    return LastLevelMaxPool()


def retinanet_top_block(cfg, bottom_up):
    """P6/P7 from res5 (RetinaNet)."""
    return LastLevelP6P7(bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS)
