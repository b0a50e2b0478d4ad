"""RetinaNet whose shared head normalizes per FPN level or over all levels (rethinking §5.2, Table 5, Alg. 1, A.9).

The RetinaNet head is shared by the FPN levels (P3–P7), so every BN layer in it sees ``K = len(IN_FEATURES)``
domains. Three independent choices (``cfg.D2NORM.RETINANET_HEAD``) decide how it behaves:

=====  ==============  ==============  ===========  ======  ======================================================
Row    TRAIN_STATS     POP_STATS       AFFINE       AP      notes (Table 5, 3x R50-FPN, SyncBN, 16 images)
=====  ==============  ==============  ===========  ======  ======================================================
1      shared          shared          shared       39.1    Alg. 1 ``RetinaNetHead_Row1`` (levels concatenated)
2      shared          per_level       shared        2.1    inconsistent: collapses
3      per_level       shared          shared       34.1    Alg. 1 ``RetinaNetHead_Row3`` ("standard" usage)
4      per_level       per_level       shared       39.1    = detectron2's own NORM "BN"/"SyncBN" head
5      per_level       shared          per_level    35.5
6      per_level       per_level       per_level    39.2    Alg. 1 ``RetinaNetHead_Row6``
=====  ==============  ==============  ===========  ======  ======================================================

``SYNC: True`` (every Table 5 row: "All BatchNorm entries are trained with ... SyncBN") all-reduces the batch
statistics across ranks, weighted by element count, so a rank's layer normalizes with the statistics of the
whole (global) mini-batch of its level(s); ``SYNC: False`` is per-GPU BN.

What is built:

* :class:`DomainBNRetinaNetHead` — detectron2's ``RetinaNetHead`` structure and parameter names
  (``cls_subnet``/``bbox_subnet`` = ``NUM_CONVS`` × [Conv2d, norm, ReLU], ``cls_score``, ``bbox_pred``), with
  every norm a :class:`~d2norm.layers.domain_bn.DomainBatchNorm2d` (domain k = level ``levels[k]``) applied
  to all levels at once through ``forward_domains`` (convs are applied per level, as in Alg. 1).
* :class:`~d2norm.layers.sync_domain_bn.SyncDomainBatchNorm2d` (``SYNC: True``) — DomainBatchNorm2d whose
  training statistics are all-reduced across ranks (same state dict as DomainBatchNorm2d).
* ``META_ARCHITECTURE: "DomainBNRetinaNet"`` — detectron2's ``RetinaNet`` with that head (v0.6's RetinaNet
  constructs ``RetinaNetHead`` itself, hence the subclass). Everything else comes from ``MODEL.RETINANET.*``;
  ``MODEL.RETINANET.NORM`` must be empty (the head's norm is configured by ``D2NORM.RETINANET_HEAD``).

**Population-statistics layout (for PreciseBN and other tools).** ``head.levels`` (tuple of feature names,
index = domain index) and ``head.norm_layout`` (dict) describe the layout; ``head.domain_norm_layers()``
lists ``(name, module)`` for every norm layer of the head (all :class:`DomainBatchNorm2d`). For each layer,
the population statistics that match SGD training are:

* ``POP_STATS: per_level`` — ``running_mean``/``running_var`` of shape (K, C): row k = statistics of that
  layer's input on level ``levels[k]`` only (``num_batches_tracked`` (K,): updates per row);
* ``POP_STATS: shared`` with ``TRAIN_STATS: shared`` (row 1) — one set (C,): statistics of the layer's
  input pooled over all levels (every position of every level weighted equally, as in Alg. 1 Row1);
* ``POP_STATS: shared`` with ``TRAIN_STATS: per_level`` (rows 3, 5) — one set (C,) updated once per level
  call from that level's batch statistics (the "standard implementation"; each call is one batch).

The EMA during training follows these rules on the *training* path (with ``SYNC`` the statistics are
global). A PreciseBN pass (``d2norm.layers.domain_bn.DomainBNAdapter``, routing the layer's ``forward_domains``:
the head always calls ``module.forward_domains(xs)`` through the instance, so an instance-level patch takes
effect) computes them on the *inference* path (rethinking Table 5 / Alg. 1; upstream
``projects/Rethinking-BatchNorm/retinanet-eval-domain-specific.py`` runs PreciseBN on the per-level model):
every layer normalizes level k by level k's statistics unless both TRAIN_STATS and POP_STATS are shared
(row 1: all levels together), so the statistics of deeper layers are those the evaluated model sees. The two
paths coincide for rows 1, 3, 4, 5, 6; for row 2 only the pass gives the paper's per-level statistics (the EMA
of a row-2 model is collected while earlier layers normalize with the shared statistics): evaluate row 2 after
PreciseBN / ``tools/recompute_bn_stats.py``, as the paper and upstream do.

**Checkpoints.** ``load_state_dict`` (and :func:`convert_retinanet_head_state_dict`) accept a stock
detectron2 RetinaNet head: NORM "BN"/"SyncBN" (``CycleBatchNormList``: per-level statistics
``cls_subnet.1.<k>.running_*``, shared affine), a shared single-BN head, GN, or no norm (whose convs sit at
other ``cls_subnet`` indices). What cannot be mapped is logged with a warning and reported by torch as missing
(e.g. per-level statistics into a ``POP_STATS: shared`` head: one set cannot be recovered from five; recompute
with PreciseBN). fvcore's ``Checkpointer`` drops shape-mismatched keys *before* ``load_state_dict``; load a
stock checkpoint through :func:`convert_retinanet_head_state_dict` first to map every entry.
"""
import logging
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import Tensor, nn

from ...options import Bool, Choice, Int, Option, check_node, check_values, declare_node, default
from ...layers.domain_bn import DomainBatchNorm2d, domain_bn_modules
from ...layers.sync_domain_bn import SyncDomainBatchNorm2d

__all__ = [
    "DomainBNRetinaNetHead",
    "DomainBNRetinaNet",
    "convert_retinanet_head_state_dict",
    "head_options_from_cfg",
]

logger = logging.getLogger(__name__)

_CHOICES = ("shared", "per_level")
# cfg value → DomainBatchNorm2d option (a level is a domain)
_TO_DOMAIN = {"shared": "shared", "per_level": "per_domain"}
_DIMS = (0, 2, 3)


# ---------------------------------------------------------------------------------------------------------
# cfg
# ---------------------------------------------------------------------------------------------------------
NODE = "RETINANET_HEAD"
OPTIONS = declare_node(NODE, (
    Option("TRAIN_STATS", "per_level", "Table 5 'SGD Training' (Fig. 7): 'per_level' = each level normalized by its "
           "own mini-batch statistics; 'shared' = by statistics of all levels concatenated (Alg. 1 Row1).",
           check=Choice(*_CHOICES)),
    Option("POP_STATS", "per_level", "Table 5 'Population Stats': 'per_level' = one EMA set (K, C), each level's "
           "used at test time; 'shared' = one set (C,) for all levels.", check=Choice(*_CHOICES)),
    Option("AFFINE", "shared", "Table 5 'Affine Parameters': 'shared' = one (gamma, beta) of shape (C,); "
           "'per_level' = (K, C).", check=Choice(*_CHOICES)),
    Option("SYNC", True, "Table 5 'SyncBN': True = batch statistics all-reduced over ranks (weighted by element "
           "count, A.6); False = per-GPU BN. No effect in one process.", check=Bool()),
    Option("SYNC_GROUP_SIZE", 0, "With SYNC: consecutive ranks normalized together (0 = all ranks, as the paper's "
           "16 images).", check=Int(0, note=" (0 = all ranks)")),
), doc="DomainBNRetinaNet's head with per-level BN: rethinking §5.2, Table 5, Alg. 1, A.9 (rows as (TRAIN_STATS, "
       "POP_STATS, AFFINE): 1 (shared, shared, shared) 39.1 AP, 2 (shared, per_level, shared) 2.1, 3 (per_level, "
       "shared, shared) 34.1, 4 (per_level, per_level, shared) 39.1, 5 (per_level, shared, per_level) 35.5, "
       "6 (per_level, per_level, per_level) 39.2; every row SyncBN; default row 4)")


def head_options_from_cfg(cfg) -> Dict:
    """``cfg.D2NORM.RETINANET_HEAD`` → validated head options; ValueError naming the bad key and value."""
    c = cfg.D2NORM.RETINANET_HEAD
    check_node(cfg, NODE)
    g = int(c.SYNC_GROUP_SIZE)
    return {
        "train_stats": c.TRAIN_STATS,
        "pop_stats": c.POP_STATS,
        "affine": c.AFFINE,
        "sync": c.SYNC,
        "sync_group_size": g,
        "bn_eps": cfg.D2NORM.BN.EPS,
        "bn_momentum": cfg.D2NORM.BN.MOMENTUM,
    }


# ---------------------------------------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------------------------------------
class DomainBNRetinaNetHead(nn.Module):
    """detectron2's ``RetinaNetHead`` (same structure, parameter names and initialization) whose norm layers are
    :class:`DomainBatchNorm2d` with one domain per FPN level (rethinking §5.2, Table 5, Alg. 1; layouts and
    the population-statistics contract in the module docstring).

    ``forward(features)`` takes the level features in ``levels`` order (high to low resolution) and returns
    ``(logits, bbox_reg)`` as the stock head. Convs and ReLUs run per level; each norm layer receives all
    levels at once (``forward_domains``), which is what makes shared training statistics (row 1, Alg. 1
    Row1) possible without concatenating the activations.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        levels: Sequence[str],
        train_stats: str = default(NODE, "TRAIN_STATS"),
        pop_stats: str = default(NODE, "POP_STATS"),
        affine: str = default(NODE, "AFFINE"),
        sync: bool = default(NODE, "SYNC"),
        sync_group_size: int = default(NODE, "SYNC_GROUP_SIZE"),
        bn_eps: float = 1e-5,
        bn_momentum: Optional[float] = 0.1,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        check_values(NODE, TRAIN_STATS=train_stats, POP_STATS=pop_stats, AFFINE=affine, SYNC=sync)
        self.levels = tuple(levels)
        if len(self.levels) != len(input_shape) or len(self.levels) == 0:
            raise ValueError(f"levels {self.levels!r} must name each of the {len(input_shape)} input features")
        if len({s.channels for s in input_shape}) != 1:
            channels = [s.channels for s in input_shape]
            raise ValueError(f"all head input levels must have the same channels, got {channels}")
        self._num_features = K = len(input_shape)
        self.norm_layout = {
            "levels": self.levels,
            "train_stats": train_stats,
            "pop_stats": pop_stats,
            "affine": affine,
            "sync": sync,
            "sync_group_size": sync_group_size,
        }

        def norm(c: int) -> DomainBatchNorm2d:
            kw = dict(
                num_domains=K,
                train_stats=_TO_DOMAIN[train_stats],
                pop_stats=_TO_DOMAIN[pop_stats],
                affine_per_domain=affine == "per_level",
                eps=bn_eps,
                momentum=bn_momentum,
            )
            if sync:
                return SyncDomainBatchNorm2d(c, sync_group_size=sync_group_size, **kw)
            return DomainBatchNorm2d(c, **kw)

        cls_subnet, bbox_subnet = [], []
        for in_channels, out_channels in zip([input_shape[0].channels] + list(conv_dims), conv_dims):
            for subnet in (cls_subnet, bbox_subnet):
                subnet.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1))
                subnet.append(norm(out_channels))
                subnet.append(nn.ReLU())
        self.cls_subnet = nn.Sequential(*cls_subnet)
        self.bbox_subnet = nn.Sequential(*bbox_subnet)
        self.cls_score = nn.Conv2d(conv_dims[-1], num_anchors * num_classes, kernel_size=3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], num_anchors * 4, kernel_size=3, stride=1, padding=1)

        # detectron2's RetinaNetHead initialization (focal loss prior, RetinaNet §4.1)
        for modules in (self.cls_subnet, self.bbox_subnet, self.cls_score, self.bbox_pred):
            for layer in modules.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, mean=0, std=0.01)
                    nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(f"the shared head needs the same number of anchors on every level, got {num_anchors}")
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "num_anchors": num_anchors[0],
            "conv_dims": [input_shape[0].channels] * cfg.MODEL.RETINANET.NUM_CONVS,
            "levels": list(cfg.MODEL.RETINANET.IN_FEATURES),
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
            **head_options_from_cfg(cfg),
        }

    def domain_norm_layers(self) -> List[Tuple[str, DomainBatchNorm2d]]:
        """``(name relative to the head, module)`` of every norm layer, in forward order per subnet."""
        return list(domain_bn_modules(self).items())

    @staticmethod
    def _run(subnet: nn.Sequential, xs: List[Tensor]) -> List[Tensor]:
        for mod in subnet:
            if hasattr(mod, "forward_domains"):  # the head's DomainBN layers
                xs = mod.forward_domains(xs)  # domain k = level k (Alg. 1: BN sees every level)
            else:
                xs = [mod(x) for x in xs]  # convs / ReLU applied per level, as in Alg. 1
        return xs

    def forward(self, features: List[Tensor]):
        if len(features) != self._num_features:
            raise ValueError(f"expected {self._num_features} level features ({self.levels}), got {len(features)}")
        logits = [self.cls_score(x) for x in self._run(self.cls_subnet, list(features))]
        bbox_reg = [self.bbox_pred(x) for x in self._run(self.bbox_subnet, list(features))]
        return logits, bbox_reg

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Map a stock detectron2 head in place before the children load (they see this dict's entries).
        converted, _ = _convert(self, state_dict, prefix)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update(converted)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- stock checkpoint mapping ----------------------------------------------------------------------------
_SUBNET_KEY = re.compile(r"^(cls_subnet|bbox_subnet)\.(\d+)\.(.+)$")
_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _convert(head: DomainBNRetinaNetHead, state_dict: Dict, prefix: str) -> Tuple[Dict, List[str]]:
    """Entries of ``state_dict`` under ``prefix`` in ``head``'s layout, and messages about what was not mapped.

    Handles (rethinking Table 5 row 4 = detectron2's NORM "BN" head):
    * no-norm head: subnet index 2i (conv i) → 3i (ours: [conv, norm, ReLU] per conv);
    * ``CycleBatchNormList``: ``<j>.<k>.running_*`` (level k) → row k of ``<j>.running_*`` when POP_STATS is
      per_level; not mappable to a shared set (reported, dropped);
    * single-set BN / GN / shared affine: left as is (DomainBatchNorm2d copies one set into every level).
    """
    K = head._num_features
    pop_per_level = head.norm_layout["pop_stats"] == "per_level"
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    notes: List[str] = []

    # no-norm layout: a parameter at one of our ReLU positions (index % 3 == 2) only exists there
    no_norm = any((m := _SUBNET_KEY.match(k)) and int(m.group(2)) % 3 == 2 for k in sub)
    if no_norm:
        remapped = {}
        for key, v in sub.items():
            m = _SUBNET_KEY.match(key)
            if m and int(m.group(2)) % 2 == 0:
                key = f"{m.group(1)}.{3 * (int(m.group(2)) // 2)}.{m.group(3)}"
            remapped[key] = v
        sub = remapped
        notes.append(
            "checkpoint head has no norm layers (detectron2 RetinaNetHead with NORM ''): convs remapped "
            "(cls_subnet/bbox_subnet index 2i -> 3i); no head norm layer is "
            "in the checkpoint: they keep their current values (after a fresh build: weight 1, bias 0, "
            "running_mean 0, running_var 1)"
        )

    # CycleBatchNormList (detectron2 NORM "BN"/"SyncBN"): per-level statistics in child modules 0..K'-1
    out = {}
    cycles: Dict[str, Dict[str, Dict[int, Tensor]]] = {}
    for key, v in sub.items():
        m = re.match(r"^((?:cls_subnet|bbox_subnet)\.\d+)\.(\d+)\.(running_mean|running_var|num_batches_tracked)$", key)
        if m:
            cycles.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
        else:
            out[key] = v
    for layer, stats in sorted(cycles.items()):
        unmapped = []
        for name, per_level in sorted(stats.items()):
            if pop_per_level and sorted(per_level) == list(range(K)):
                out[f"{layer}.{name}"] = torch.stack([per_level[k] for k in range(K)])
            else:
                unmapped.append(name)
        if unmapped:
            levels = sorted({k for per_level in stats.values() for k in per_level})
            why = (
                "POP_STATS is shared and one set cannot be recovered from per-level sets (recompute it with PreciseBN)"
                if not pop_per_level
                else f"the head has {K} levels {list(head.levels)}"
            )
            notes.append(
                f"{prefix}{layer}: checkpoint holds per-level {', '.join(unmapped)} for levels {levels} "
                f"(detectron2 CycleBatchNormList); {why}: not loaded, the current values are kept"
            )
    for note in notes:
        logger.warning("DomainBNRetinaNetHead: %s", note)
    return {prefix + k: v for k, v in out.items()}, notes


def convert_retinanet_head_state_dict(
    state_dict: Dict[str, Tensor], head: DomainBNRetinaNetHead, prefix: str = "head."
) -> Tuple[Dict[str, Tensor], List[str]]:
    """A copy of ``state_dict`` with the entries under ``prefix`` in ``head``'s layout, and the list of what
    could not be mapped (also logged). Single-set (C,) entries are expanded to (K, C) where the head keeps
    per-level tensors, so the result also loads through fvcore's shape-checking ``Checkpointer``.

    Usage for a whole model: ``sd, notes = convert_retinanet_head_state_dict(ckpt["model"], model.head)``.
    """
    converted, notes = _convert(head, state_dict, prefix)
    own = head.state_dict()
    for key, v in list(converted.items()):
        ours = own.get(key[len(prefix):])
        K = head._num_features
        if ours is not None and ours.dim() == v.dim() + 1 and ours.shape[1:] == v.shape and ours.shape[0] == K:
            converted[key] = v.unsqueeze(0).repeat(K, *([1] * v.dim()))
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    out.update(converted)
    return out, notes


# ---------------------------------------------------------------------------------------------------------
# meta-architecture
# ---------------------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class DomainBNRetinaNet(RetinaNet):
    """detectron2's ``RetinaNet`` with :class:`DomainBNRetinaNetHead` (rethinking §5.2, Table 5).

    ``MODEL.META_ARCHITECTURE: "DomainBNRetinaNet"``; head layout from ``D2NORM.RETINANET_HEAD``, everything
    else from ``MODEL.RETINANET.*`` (which must have ``NORM: ""``).
    """

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.RETINANET.NORM:
            raise ValueError(
                f"DomainBNRetinaNet builds its head norm from D2NORM.RETINANET_HEAD; MODEL.RETINANET.NORM must be "
                f"'' , got {cfg.MODEL.RETINANET.NORM!r}"
            )
        head_options_from_cfg(cfg)  # validate before building anything
        ret = super().from_config(cfg)  # also builds a stock head, replaced below
        shapes = ret["backbone"].output_shape()
        feature_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        ret["head"] = DomainBNRetinaNetHead(cfg, feature_shapes)
        return ret
