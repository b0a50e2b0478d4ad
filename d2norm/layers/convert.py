"""``convert_norm``: swap the BN / FrozenBN modules of a built (e.g. pre-trained) model for a registered layer.

Affine parameters and population statistics are carried over wherever the target layer has a tensor of the
same name and shape (every BN-derived d2norm layer: GhostBN, BatchStatsBN, ExampleWeightedBN, EvalNorm,
AnySyncBN, DomainBN with per-domain sets filled from the single set). What cannot be mapped (e.g. MABN has no
running mean; BGN keeps statistics per channel group) is reported in the returned :class:`ConversionReport`
and logged, never silently defaulted.
"""
import contextlib
import logging
import os
from typing import List, Optional, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .base import D2NormModule
from .registry import NORM_REGISTRY, get_norm, norm_options, valid_norm_names
from .report import ConversionReport

__all__ = ["convert_norm", "SOURCE_TYPES", "BN_NORM_NAMES", "registered_norm_names", "cfg_with_norm", "conversion_plan",
           "convert_bn_layers"]

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


# ---- conversion policy of the tools (fit_evalnorm, tune_example_weight): which layers, which cfg keys ------------
#: detectron2's trainable BN names (FrozenBN is frozen by design: never converted by the tools)
BN_NORM_NAMES = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN")


def registered_norm_names(model: nn.Module, names: Sequence[str]) -> List[str]:
    """The ``NORM`` names (registry keys) of the d2norm layers ``names`` of ``model`` (e.g. ``["GhostBN"]``)."""
    by_class = {cls: n for n, cls in NORM_REGISTRY}
    wanted = set(names)
    return sorted({by_class[type(m)] for n, m in model.named_modules() if n in wanted and type(m) in by_class})


def cfg_with_norm(cfg, to: str, weights: str, sources: Sequence[str] = (), **overrides):
    """A copy of ``cfg`` whose BN norm keys (:data:`BN_NORM_NAMES`, and keys naming one of ``sources``, the
    converted d2norm norms) name ``to``, whose MODEL.WEIGHTS is ``weights`` and whose OUTPUT_DIR is the folder of
    ``weights`` (a config written next to a converted checkpoint evaluates into its own folder, never over the
    training run's ``config.yaml`` and ``inference/``); extra ``{"D2NORM.X.Y": value}`` overrides are applied
    too. Returns ``(cfg, keys left unchanged)``: ``MODEL.RETINANET.NORM`` "BN"/"SyncBN"
    (detectron2's per-level head BN) cannot be named by a registered norm without changing the layout."""
    from .cfg_checks import norm_keys

    c = cfg.clone()
    c.defrost()
    opts, kept = [], []
    for key, value in list(norm_keys(c)):  # every NORM leaf, a custom head's too (as the setup checks walk them)
        if value in tuple(BN_NORM_NAMES) + tuple(sources):
            if key == "MODEL.RETINANET.NORM":
                # detectron2 builds "BN"/"SyncBN" heads as per-level CycleBatchNormList; a registered name
                # would build one shared layer with other state-dict keys, so the name stays
                kept.append(key)
                continue
            opts += [key, to]
    opts += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.dirname(os.path.abspath(weights))]
    for k, v in overrides.items():
        opts += [k, v]
    c.merge_from_list(opts)
    return c, kept


def conversion_plan(model: nn.Module, to: str, bn_inference_only: bool = False):
    """Which norm layers of ``model`` the tools convert to ``to`` (``"EvalNorm"`` / ``"ExampleWeightedBN"``),
    decided before any work: ``(convert, keep)``, module names to convert and ``{name: reason}`` of the norm
    layers left as they are.

    * converted: torch's / detectron2's trainable BN (BN, SyncBN, NaiveSyncBN) and every d2norm layer whose
      :meth:`~d2norm.layers.base.D2NormModule.sample_stats_inference_unsupported` is ``None`` (BN-derived: GhostBN,
      AnySyncBN, BatchStatsBN, ExampleWeightedBN / EvalNorm (into the other), DomainBN with one set);
    * kept: layers already of type ``to`` (used as they are); detectron2's ``FrozenBatchNorm2d`` (frozen in
      training: no batch statistics, so no train/test discrepancy to correct); MABN, BGN, per-domain DomainBN
      (the reason each gives);
    * with ``bn_inference_only`` (``tune_example_weight``, whose α = 0 must reproduce the model's own
      inference) also layers whose current inference is not BN's fixed affine map (EvalNorm's eqs 5-6,
      BatchStatsBN's batch statistics, ExampleWeightedBN with α > 0).
    """
    from .base import NotAnAffine
    from .protocol import norm_protocol

    target = NORM_REGISTRY.get(to)
    convert, keep = [], {}
    for name, m in model.named_modules():
        view = norm_protocol(m)
        if view is None:
            continue
        if isinstance(m, target):
            keep[name] = f"already {to}"
            continue
        reason = view.sample_stats_inference_unsupported()
        if reason is None and bn_inference_only:
            try:
                view.inference_affine()
            except NotAnAffine as e:
                reason = f"its inference is not BN's ({e}); alpha = 0 would change it"
        if reason is None:
            convert.append(name)
        else:
            keep[name] = reason
    return convert, keep


def convert_bn_layers(model: nn.Module, to: str, cfg, names: Optional[Sequence[str]] = None) -> List[str]:
    """:func:`d2norm.layers.convert.convert_norm` on the layers :func:`conversion_plan` selects (or ``names``).
    Returns the converted module names."""
    if names is None:
        names, _ = conversion_plan(model, to)
    model, report = convert_norm(model, to, cfg, names=set(names))
    return list(report.converted)
