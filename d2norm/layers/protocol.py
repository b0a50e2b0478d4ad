"""One answer to "is this a normalization layer, and what does it say about itself", for every consumer
(PreciseBN and the BN monitor, statistics probes, the FrozenBN switch, folding, ``WEIGHT_DECAY_NORM``, the tools'
conversion plan).

d2norm layers implement the protocol themselves (:class:`~d2norm.layers.base.D2NormModule`, each in its own file).
torch's and detectron2's norms cannot, so :func:`norm_protocol` gives them a view with the protocol's answers for
their kind, written here once:

* torch's BN family (``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, detectron2's BatchNorm2d and
  NaiveSyncBatchNorm): BN's population statistics (PreciseBN adapter, probes), its FrozenBN and its inference
  affine; convertible by the tools;
* detectron2's ``FrozenBatchNorm2d``: a constant affine map already (statistics readable, nothing to recompute or
  freeze; not converted: frozen in training, no train/test discrepancy to correct);
* every other norm (GroupNorm, LayerNorm, InstanceNorm, LocalResponseNorm, detectron2's LayerNorm): a norm (weight
  decay) with batch-independent statistics: nothing to recompute, freeze, fold or convert.
"""
from typing import List, Optional, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .base import (
    D2NormModule,
    FrozenBNState,
    NotAnAffine,
    affine_from_stats,
    bn_estimated_stats,
    bn_frozen_state,
    bn_inference_affine,
    normalization_images,
)

__all__ = ["NORM_TYPES", "is_norm_layer", "norm_protocol", "get_stats_adapter", "aux_loss_keys",
           "batch_statistics_of", "cfg_normalization_images"]


def _d2_layer_norm():
    from detectron2.layers import batch_norm

    return getattr(batch_norm, "LayerNorm", None)  # detectron2 main has one; v0.6 does not


#: every module type that is a normalization layer
NORM_TYPES = tuple(t for t in (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, FrozenBatchNorm2d,
                               D2NormModule, _d2_layer_norm()) if t is not None)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (:data:`NORM_TYPES`)."""
    return isinstance(module, NORM_TYPES)


#: detectron2's ``NORM`` names whose layers train with batch statistics, as :attr:`D2NormModule.batch_statistics`
#: says it of d2norm's ("BN": per process; the SyncBN family: over every process); its other names (FrozenBN,
#: GN, LN) have none
D2_BATCH_STATISTICS = {"BN": "process", "SyncBN": "synced", "naiveSyncBN": "synced", "naiveSyncBN_N": "synced",
                       "nnSyncBN": "synced"}


def _registered_class(name: str):
    from .registry import NORM_REGISTRY

    return NORM_REGISTRY.get(name) if isinstance(name, str) and name in NORM_REGISTRY else None


def batch_statistics_of(name: str) -> Optional[str]:
    """``"process"``, ``"synced"`` or ``None`` for a ``NORM`` name (:attr:`D2NormModule.batch_statistics`)."""
    cls = _registered_class(name)
    return cls.batch_statistics if cls is not None else D2_BATCH_STATISTICS.get(name)


def cfg_normalization_images(name: str, cfg, world: int) -> Optional[int]:
    """Images one training normalization group of the norm ``name`` holds under ``cfg`` in a run of ``world``
    processes (``SOLVER.IMS_PER_BATCH / world`` per process; GhostBN's ghost batches, AnySyncBN's sync groups), or
    ``None`` for a norm without batch statistics in training."""
    world = max(1, int(world))
    ipp = max(1, int(cfg.SOLVER.IMS_PER_BATCH) // world)
    cls = _registered_class(name)
    if cls is not None:
        return cls.cfg_normalization_images(cfg, ipp, world)
    return normalization_images(D2_BATCH_STATISTICS.get(name), ipp, world)


class _View:
    """The protocol's defaults for a norm that is not a d2norm layer (``D2NormModule``'s method names)."""

    routed_calls = (("forward", "input"),)
    aux_loss_key = None

    def __init__(self, module: nn.Module):
        self.module = module

    def stats_adapter(self):
        return None

    def estimated_stats(self) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        return None

    def stats_slot(self, *args, **kwargs) -> int:
        return 0

    def frozen_bn_state(self) -> Optional[FrozenBNState]:
        return None  # batch-independent statistics (GN, LN, ...): nothing to freeze

    def inference_affine(self):
        raise NotAnAffine(f"{type(self.module).__name__}: not a normalization layer with a fixed inference affine map")

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        return f"{type(self.module).__name__}: no BN population statistics to mix sample statistics with"

    def training_normalization_batch(self) -> Optional[int]:
        return None

    def training_sub_batches(self, n: int) -> Optional[List[int]]:
        return None


class _BatchNormView(_View):
    def stats_adapter(self):
        from ..stats.adapters import BatchNormAdapter

        return BatchNormAdapter(self.module) if BatchNormAdapter.applies(self.module) else None

    def estimated_stats(self):
        return bn_estimated_stats(self.module)

    def frozen_bn_state(self):
        return bn_frozen_state(self.module)

    def inference_affine(self):
        return bn_inference_affine(self.module)

    def sample_stats_inference_unsupported(self):
        return None


class _FrozenBatchNorm2dView(_View):
    def estimated_stats(self):
        return bn_estimated_stats(self.module)

    def inference_affine(self):
        m = self.module
        return affine_from_stats(m.running_mean, m.running_var, m.eps, m.weight, m.bias)

    def sample_stats_inference_unsupported(self):
        return "FrozenBN: frozen in training, no batch statistics (no train/test discrepancy to correct)"


def norm_protocol(module: nn.Module):
    """The layer itself when it is a d2norm layer; for torch's and detectron2's norms a view answering the same
    methods (module docstring); ``None`` when ``module`` is not a normalization layer."""
    if isinstance(module, D2NormModule):
        return module
    if isinstance(module, _BatchNorm):
        return _BatchNormView(module)
    if isinstance(module, FrozenBatchNorm2d):
        return _FrozenBatchNorm2dView(module)
    if is_norm_layer(module):
        return _View(module)
    return None


def get_stats_adapter(module: nn.Module):
    """The :class:`~d2norm.stats.adapters.StatsAdapter` that recomputes ``module``'s population statistics
    (PreciseBN, BN monitor), or ``None`` when it has none to recompute (eval mode, frozen, no running statistics,
    not a normalization layer)."""
    if not module.training:
        return None
    view = norm_protocol(module)
    return None if view is None else view.stats_adapter()


def aux_loss_keys(model: nn.Module) -> Tuple[str, ...]:
    """The loss keys of the auxiliary losses ``model``'s norm layers declare (``aux_loss_key``), sorted."""
    return tuple(sorted({k for m in model.modules() if (k := getattr(m, "aux_loss_key", None))}))
