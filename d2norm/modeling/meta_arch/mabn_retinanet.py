"""RetinaNet with MABN in the head (mabn Appendix B.3, Table 7: "Training from scratch for one-stage model").

detectron2 v0.6's ``RetinaNetHead`` builds its subnets from plain ``nn.Conv2d`` followed by the norm in an
``nn.Sequential``, not from detectron2 ``Conv2d`` with a ``norm``. ``MABNRetinaNet`` builds the stock RetinaNet
(with ``MODEL.RETINANET.NORM: "MABN"``) and then turns every ``nn.Conv2d`` that directly precedes an MABN layer in
a ``Sequential`` into :class:`~d2norm.layers.mabn.CenteredPlainConv2d`
(mabn eq 18; no new state, same parameter names), checks that every MABN layer of the model is fed by a
centered conv, and sets the head's warm-up from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS`` (the paper uses batch
statistics in the heads for the first 10 000 iterations). Each head layer is shared by the L FPN levels, so it is
called L times per iteration: warm-up, SMA buffer m and momentum are rescaled to per-call values that span the
paper's iterations (:func:`~d2norm.layers.mabn.set_mabn_calls_per_iteration`: HEAD_WARMUP_ITERS 10 000 ends after
10 000 iterations, not 2 000; the SMA covers the last m iterations of every level). Use it with a MABN backbone
(``build_mabn_retinanet_resnet_fpn_backbone``).
"""
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from ...layers.mabn import centralize_mabn_convs, check_mabn_wiring, set_mabn_calls_per_iteration, set_mabn_warmup
from ..backbone.mabn_resnet import mabn_warmup_from_cfg, require_norm

__all__ = ["MABNRetinaNet"]


@META_ARCH_REGISTRY.register()
class MABNRetinaNet(RetinaNet):
    """detectron2's RetinaNet whose head normalizes with MABN after weight-centralized convs (mabn Table 7).

    Needs ``MODEL.RETINANET.NORM: "MABN"``; the backbone should be a MABN backbone. Every MABN layer in the
    model must be fed by a centered conv (ValueError otherwise).
    """

    @configurable
    def __init__(self, *, head_warmup_iters: int, **kwargs):
        super().__init__(**kwargs)
        centralize_mabn_convs(self.head)
        set_mabn_warmup(self.head, head_warmup_iters)
        # one head layer serves every FPN level: L calls per iteration; the paper's warm-up (B.3), SMA window m
        # and momentum are per iteration (set_mabn_calls_per_iteration)
        set_mabn_calls_per_iteration(self.head, len(self.head_in_features))
        check_mabn_wiring(self, "MABNRetinaNet",
                          "; use a MABN backbone (e.g. build_mabn_retinanet_resnet_fpn_backbone)")

    @classmethod
    def from_config(cls, cfg):
        require_norm(cfg.MODEL.RETINANET.NORM, ("MABN",), "MODEL.RETINANET.NORM")
        ret = super().from_config(cfg)
        ret["head_warmup_iters"] = mabn_warmup_from_cfg(cfg, "HEAD")
        return ret
