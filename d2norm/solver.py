"""Optimizer parameter groups that know d2norm's norm layers.

four-things §3.3 studies weight decay on the affine γ/β of normalization layers; detectron2 exposes it as
``SOLVER.WEIGHT_DECAY_NORM``. v0.6's ``get_default_optimizer_params`` recognises only a closed tuple of torch
norm classes, so d2norm layers that are not torch subclasses (MABN, BGN, ...) would silently get the ordinary
weight decay. This is a re-implementation of that function (same grouping, same bias overrides, same
``reduce_param_groups``) with two additions:

* any :class:`~d2norm.layers.base.D2NormModule` is a norm module (``WEIGHT_DECAY_NORM`` applies);
* parameters listed in a module's ``no_weight_decay`` (EvalNorm's α̂, β̂) get weight decay 0, always.
"""
import copy
from typing import Any, Dict, List, Optional, Set

import torch
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

from .layers.protocol import is_norm_layer

__all__ = ["is_norm_module", "get_optimizer_params", "build_optimizer"]

def is_norm_module(module: torch.nn.Module) -> bool:
    """:func:`d2norm.layers.protocol.is_norm_layer` (d2norm's layers and torch's / detectron2's norms)."""
    return is_norm_layer(module)


def get_optimizer_params(
    model: torch.nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: Optional[float] = 1.0,
    weight_decay_bias: Optional[float] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """detectron2's ``get_default_optimizer_params`` (v0.6 semantics) + d2norm norm layers + no-decay params."""
    overrides = dict(overrides or {})
    defaults: Dict[str, Any] = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    bias_overrides: Dict[str, float] = {}
    if bias_lr_factor is not None and bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError("bias_lr_factor requires base_lr")
        bias_overrides["lr"] = base_lr * bias_lr_factor
    if weight_decay_bias is not None:
        bias_overrides["weight_decay"] = weight_decay_bias
    if bias_overrides:
        if "bias" in overrides:
            raise ValueError("Conflicting overrides for 'bias'")
        overrides["bias"] = bias_overrides

    params: List[Dict[str, Any]] = []
    memo: Set[torch.nn.Parameter] = set()
    for module in model.modules():
        no_decay = set(getattr(module, "no_weight_decay", ()) or ())
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            hyperparams = copy.copy(defaults)
            if is_norm_module(module) and weight_decay_norm is not None:
                hyperparams["weight_decay"] = weight_decay_norm
            hyperparams.update(overrides.get(name, {}))
            if name in no_decay:
                hyperparams["weight_decay"] = 0.0
            params.append({"params": [value], **hyperparams})
    return reduce_param_groups(params)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer`` (SGD + optional gradient clipping) over :func:`get_optimizer_params`."""
    params = get_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
