"""RetinaNet with MABN in the head (mabn Appendix B.3, Table 7: "Training from scratch for one-stage model").

detectron2 v0.6's ``RetinaNetHead`` builds its subnets from plain ``nn.Conv2d`` followed by the norm in an
``nn.Sequential``, so the class swap used for detectron2 ``Conv2d`` (``backbone/mabn_resnet.py``) does not reach
them. ``MABNRetinaNet`` builds the stock RetinaNet (with ``MODEL.RETINANET.NORM: "MABN"``) and then turns every
``nn.Conv2d`` that directly precedes an MABN layer in a ``Sequential`` into :class:`CenteredPlainConv2d`
(mabn eq 18; no new state, same parameter names), checks that every MABN layer of the model is fed by a
centered conv, and sets the head's warm-up from ``D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS`` (the paper uses batch
statistics in the heads for the first 10 000 iterations). Use it with a MABN backbone
(``build_mabn_retinanet_resnet_fpn_backbone``).
"""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import nn

from ...layers.mabn import CenteredConv2d, MABN2d
from ..backbone.mabn_resnet import _require, mabn_warmup_from_cfg, set_mabn_warmup

__all__ = ["CenteredPlainConv2d", "centralize_sequential_mabn_convs", "MABNRetinaNet"]


class CenteredPlainConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Centralization (mabn eq 18): ``W − mean over (in, kh, kw)`` per output channel,
    inside the forward graph (same math as :class:`~d2norm.layers.mabn.CenteredConv2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self._conv_forward(x, w - w.mean(dim=(1, 2, 3), keepdim=True), self.bias)


def centralize_sequential_mabn_convs(module: nn.Module) -> List[str]:
    """In every ``nn.Sequential`` of ``module``, make each plain ``nn.Conv2d`` directly followed by an
    :class:`MABN2d` a :class:`CenteredPlainConv2d` (class swap in place); returns the converted names."""
    converted = []
    for seq_name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name, conv), (_, nxt) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(nxt, MABN2d):
                conv.__class__ = CenteredPlainConv2d
                converted.append(f"{seq_name}.{name}" if seq_name else name)
    return converted


def _mabn_fed_by_centered_conv(module: nn.Module) -> set:
    fed = {id(m.norm) for m in module.modules() if isinstance(m, CenteredConv2d)}
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.children())
            for conv, nxt in zip(children, children[1:]):
                if isinstance(conv, CenteredPlainConv2d) and isinstance(nxt, MABN2d):
                    fed.add(id(nxt))
    return fed


@META_ARCH_REGISTRY.register()
class MABNRetinaNet(RetinaNet):
    """detectron2's RetinaNet whose head normalizes with MABN after weight-centralized convs (mabn Table 7).

    Needs ``MODEL.RETINANET.NORM: "MABN"``; the backbone should be a MABN backbone. Every MABN layer in the
    model must be fed by a centered conv (ValueError otherwise).
    """

    @configurable
    def __init__(self, *, head_warmup_iters: int, **kwargs):
        super().__init__(**kwargs)
        centralize_sequential_mabn_convs(self.head)
        set_mabn_warmup(self.head, head_warmup_iters)
        fed = _mabn_fed_by_centered_conv(self)
        loose = [n for n, m in self.named_modules() if isinstance(m, MABN2d) and id(m) not in fed]
        if loose:
            raise ValueError(
                f"MABNRetinaNet: MABN layers not preceded by a weight-centralized conv (mabn eq 18): "
                f"{', '.join(loose)}; use a MABN backbone (e.g. build_mabn_retinanet_resnet_fpn_backbone)"
            )

    @classmethod
    def from_config(cls, cfg):
        _require(cfg.MODEL.RETINANET.NORM, ("MABN",), "MODEL.RETINANET.NORM")
        ret = super().from_config(cfg)
        ret["head_warmup_iters"] = mabn_warmup_from_cfg(cfg, "HEAD")
        return ret
