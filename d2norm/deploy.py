"""Deployment: fold normalization layers whose inference is a fixed affine map into the preceding convolution.

At inference a BN with population statistics "is merely a constant affine transform" (rethinking §4.3), so
``conv → norm`` equals one convolution with ``W' = W·scale`` (per output channel) and ``b' = b·scale + shift``.
rethinking A.8 warns against folding *during training* (it changes what SGD optimizes); at inference it is free
speed. :func:`fold_norms` does it for every norm whose ``inference_affine()`` (the layer's own statement, see
:class:`d2norm.layers.base.D2NormModule`) gives ``(scale, shift)``, and for torch's ``_BatchNorm`` family and
detectron2's ``FrozenBatchNorm2d``; every other norm (the per-sample-statistics layers ExampleWeightedBN α > 0,
EvalNorm, BatchStatsBN, BGN α > 0, GroupNorm, a DomainBN whose domain is chosen per call) is left as it is and
reported with the reason.

Graph patterns folded (the ones detectron2's builders produce):

* a detectron2 ``Conv2d`` with ``norm=`` (ResNet stem/blocks/shortcuts, FPN, R-CNN conv heads, MABN's
  ``CenteredConv2d``) — the norm runs right after the convolution inside the module;
* an ``nn.Sequential`` in which a norm directly follows an ``nn.Conv2d`` that has no norm/activation of its own
  (e.g. detectron2's RetinaNet head subnets).

A ``CenteredConv2d`` (mabn eq 18) centers its weight in forward; its folded weight is the centered weight times
``scale``, so it is replaced by a plain convolution with that weight (centering it again would change nothing but
cost a weight pass per forward). A per-domain DomainBN folds when the domain is static: call ``fold_norms`` inside
``domain_scope(k)``.
"""
import logging
from typing import Tuple

import torch
from torch import nn

from .layers.base import NotAnAffine
from .layers.protocol import is_norm_layer, norm_protocol
from .layers.report import ConversionReport

__all__ = ["fold_norms", "norm_inference_affine"]

logger = logging.getLogger(__name__)


def norm_inference_affine(m: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of ``m``'s inference if it is a fixed per-channel affine map, else
    :class:`NotAnAffine` (the layer's own answer, :func:`d2norm.layers.protocol.norm_protocol`)."""
    view = norm_protocol(m)
    if view is None:
        raise NotAnAffine(f"{type(m).__name__}: not a normalization layer with a fixed inference affine map")
    return view.inference_affine()


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    from .layers.mabn import effective_conv_weight

    w = effective_conv_weight(conv)
    if scale.shape[0] != w.shape[0]:
        raise NotAnAffine(f"norm has {scale.shape[0]} channels, the convolution {w.shape[0]} outputs")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    s, t = scale.to(w.device, dt), shift.to(w.device, dt)
    new_w = w.detach().to(dt) * s.view(-1, *([1] * (w.dim() - 1)))
    b = conv.bias.detach().to(dt) if conv.bias is not None else torch.zeros_like(s)
    conv.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter((b * s + t).to(w.dtype), requires_grad=conv.weight.requires_grad)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain convolution (detectron2 ``Conv2d`` keeps its activation) with ``conv``'s geometry, weight and bias:
    a weight-centralized conv whose folded weight is already centered (see module docstring) need not center it
    again in every forward."""
    from detectron2.layers import Conv2d as D2Conv2d

    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=True, padding_mode=conv.padding_mode)
    if isinstance(conv, D2Conv2d):
        new = D2Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, norm=None,
                       activation=conv.activation, **geometry)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, **geometry)
    new.weight, new.bias = conv.weight, conv.bias
    return new.train(conv.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fold_norms(model: nn.Module) -> ConversionReport:
    """Fold, in place, every fixed-affine norm of ``model`` (eval mode) into the convolution before it.

    Returns a :class:`~d2norm.layers.report.ConversionReport` (also logged): ``converted`` = ``{norm module
    name: convolution it was folded into}``, ``skipped`` = ``{norm module name: reason}``. The model must be in
    eval mode (``model.eval()``): folding is an inference transform (rethinking A.8); a ValueError says so
    otherwise. Outputs are unchanged up to float rounding; the folded model has no norm module left where one
    was folded (the conv gets a bias).
    """
    if model.training:
        raise ValueError(
            "fold_norms is an inference transform: call model.eval() first (folding norms into convolutions "
            "while training changes what SGD optimizes, rethinking A.8)"
        )
    from detectron2.layers import Conv2d as D2Conv2d

    from .layers.mabn import WeightCentralized

    report = ConversionReport(target="fold_norms (into the preceding convolution)")
    handled = set()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, D2Conv2d) and getattr(mod, "norm", None) is not None:
            norm_name = f"{name}.norm" if name else "norm"
            handled.add(id(mod.norm))
            try:
                scale, shift = norm_inference_affine(mod.norm)
                _fold_into(mod, scale, shift)
            except NotAnAffine as e:
                report.skipped[norm_name] = str(e)
                continue
            mod.norm = None
            if name and isinstance(mod, WeightCentralized):
                _replace(model, name, _plain_conv(mod))
            report.converted[norm_name] = name
        elif isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for (cname, conv), (nname, norm) in zip(children, children[1:]):
                full = f"{name}.{nname}" if name else nname
                if isinstance(conv, nn.Conv2d) and type(norm).__name__ == "CycleBatchNormList":
                    handled.update(id(m) for m in norm.modules())
                    report.skipped[full] = (
                        "CycleBatchNormList: a different BN per FPN level after one shared convolution"
                    )
                    continue
                if not (isinstance(conv, nn.Conv2d) and is_norm_layer(norm)):
                    continue
                if getattr(conv, "norm", None) is not None or getattr(conv, "activation", None) is not None:
                    continue
                handled.add(id(norm))
                try:
                    scale, shift = norm_inference_affine(norm)
                    _fold_into(conv, scale, shift)
                except NotAnAffine as e:
                    report.skipped[full] = str(e)
                    continue
                setattr(mod, nname, nn.Identity())
                if isinstance(conv, WeightCentralized):
                    setattr(mod, cname, _plain_conv(conv))
                report.converted[full] = f"{name}.{cname}" if name else cname
    for name, mod in model.named_modules():
        if is_norm_layer(mod) and id(mod) not in handled and name not in report.skipped:
            report.skipped[name] = "no convolution directly before it in a foldable pattern"
    logger.info(report.summary())
    return report
