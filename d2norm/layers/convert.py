"""``convert_norm``: swap the BN / FrozenBN modules of a built (e.g. pre-trained) model for a registered layer.

Affine parameters and population statistics are carried over wherever the target layer has a tensor of the
same name and shape (every BN-derived d2norm layer: GhostBN, BatchStatsBN, ExampleWeightedBN, EvalNorm,
AnySyncBN, DomainBN with per-domain sets filled from the single set). What cannot be mapped (e.g. MABN has no
running mean; BGN keeps statistics per channel group) is reported in the returned :class:`ConversionReport`
and logged, never silently defaulted.
"""
import contextlib
import logging
from typing import Optional

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .base import D2NormModule
from .registry import NORM_REGISTRY, get_norm, norm_options, valid_norm_names
from .report import ConversionReport

__all__ = ["convert_norm", "SOURCE_TYPES"]

logger = logging.getLogger(__name__)

#: module types that are converted (detectron2's BatchNorm2d / NaiveSyncBatchNorm subclass nn.BatchNorm2d)
SOURCE_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _expand_to(src: torch.Tensor, dst: torch.Tensor) -> Optional[torch.Tensor]:
    """``src`` reshaped for ``dst``: same shape, or a per-channel tensor repeated over leading domain dims."""
    if src.shape == dst.shape:
        return src
    if src.dim() == 1 and dst.dim() == 2 and dst.shape[1] == src.shape[0]:
        return src.unsqueeze(0).expand_as(dst)  # DomainBN: one set copied into every domain
    if src.dim() == 0 and dst.dim() == 1:
        return src.expand_as(dst)
    return None


def _convert_one(old: nn.Module, to: str, prefix: str, report: ConversionReport) -> nn.Module:
    new = get_norm(to, old.num_features)
    ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
    if ref is not None:
        new = new.to(device=ref.device)
    src = old.state_dict()
    dst = new.state_dict()
    # what means the same as BN's state in the target (its bn_state_keys): BN-derived layers take the statistics
    # too, the others (MABN, BGN) the affine only
    mappable = set(new.bn_state_keys)
    unmapped, copied = [], set()
    with torch.no_grad():
        for k, v in src.items():
            if k not in mappable:
                unmapped.append(k)
                continue
            value = _expand_to(v, dst[k])
            if value is None:
                unmapped.append(k)
                continue
            dst[k].copy_(value.to(dst[k].dtype))
            copied.add(k)
    # every target entry not copied is left at its init (also one whose name the source has, e.g. BGN's
    # running_var, which is not BN's)
    missing = [k for k in dst if k not in copied]
    if unmapped:
        report.unmapped_source[prefix] = unmapped
    if missing:
        report.uninitialized_target[prefix] = missing
    new.train(old.training)
    if getattr(old, "weight", None) is None:
        # affine-less source (e.g. detectron2's CycleBatchNormList members): the identity affine the new layer
        # got must stay identity, or conversion would add trainable parameters.
        for p in new.parameters(recurse=False):
            p.requires_grad_(False)
        report.uninitialized_target.setdefault(prefix, []).append("(affine frozen at identity: source had none)")
    elif isinstance(old, FrozenBatchNorm2d):
        # A frozen source stays frozen: its affine is not trained unless the caller unfreezes it.
        for p in new.parameters(recurse=False):
            p.requires_grad_(False)
    else:
        for name, p in new.named_parameters(recurse=False):
            old_p = getattr(old, name, None)
            if isinstance(old_p, nn.Parameter):
                p.requires_grad_(old_p.requires_grad)
    report.converted[prefix] = type(old).__name__
    return new


def convert_norm(model: nn.Module, to: str, cfg=None, names=None) -> "tuple[nn.Module, ConversionReport]":
    """Replace every BN / SyncBN / FrozenBN module of ``model`` by the registered layer ``to``.

    d2norm layers already in the model (which may subclass ``nn.BatchNorm2d``) are left as they are, unless
    ``names`` (a set of module names) is given: then exactly those modules are converted, whatever their type
    (e.g. GhostBN layers, which are BN at inference); their BN state (:attr:`bn_state_keys`) carries over.

    Args:
        model: the model (converted in place; if ``model`` itself is a BN it is returned converted).
        to: a d2norm registered norm name (``NORM_REGISTRY``).
        cfg: detectron2 cfg whose ``D2NORM`` options the new layers use; ``None`` uses the options bound by an
            enclosing :func:`norm_options` or the defaults.

    Returns:
        ``(model, report)``; the report lists converted modules and any state that could not be mapped.
    """
    if to not in NORM_REGISTRY:
        raise ValueError(
            f"convert_norm: {to!r} is not a d2norm registered norm. Registered: "
            f"{', '.join(n for n in valid_norm_names() if n in NORM_REGISTRY)}"
        )
    report = ConversionReport(target=to)
    # Without cfg, an enclosing norm_options(...) applies, else the defaults (the layer says so once per type).
    ctx = norm_options(cfg) if cfg is not None else contextlib.nullcontext()

    def selected(module: nn.Module, prefix: str) -> bool:
        if names is not None:
            return prefix in names
        return isinstance(module, SOURCE_TYPES) and not isinstance(module, D2NormModule)

    def recurse(module: nn.Module, prefix: str) -> nn.Module:
        if selected(module, prefix):
            return _convert_one(module, to, prefix, report)
        for name, child in module.named_children():
            new = recurse(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        return module

    with ctx:
        model = recurse(model, "")
    if report.unmapped_source or report.uninitialized_target:
        logger.warning("convert_norm -> %s", report.summary())
    else:
        logger.info("convert_norm -> %s", report.summary())
    return model, report
