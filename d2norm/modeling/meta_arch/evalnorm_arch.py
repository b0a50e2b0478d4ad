"""EvalNorm-aware meta-architectures (evalnorm §3.4 "Online estimation", §4.3 Table 2).

EvalNorm layers (:class:`~d2norm.layers.evalnorm.EvalNorm2d`) go anywhere through the stock ``NORM`` keys
(``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``, ``MODEL.RETINANET.NORM``, ...). In
``"online"`` mode each training forward stores the stop-gradient aux loss of eqs 7-9; this module makes the
*model* collect it, so detectron2's ``DefaultTrainer`` (``sum(loss_dict.values()).backward()``) learns α̂, β̂
with no other change (§3.4: "use of stop_gradient ... allows us to collapse the two steps into a single one
without affecting the training of the model parameters").

Design: one mixin, :class:`EvalNormModelMixin`, put in front of a detectron2 meta-architecture class.
Parameter and buffer names are exactly the base class's, so every checkpoint of the base architecture loads.

* ``META_ARCHITECTURE: "EvalNormGeneralizedRCNN"`` / ``"EvalNormRetinaNet"``: the mixin on detectron2's
  ``GeneralizedRCNN`` / ``RetinaNet``.
* ``META_ARCHITECTURE: "EvalNormMetaArch"``: the mixin on any registered meta-architecture class named by
  ``D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE`` (e.g. ``"ProposalNetwork"``, ``"DomainBNRetinaNet"``);
  :func:`evalnorm_aware` does the same in Python.

In training the mixin

1. adds ``loss_evalnorm`` = ``D2NORM.EVALNORM.AUX_LOSS_WEIGHT`` × Σ(aux loss of every EvalNorm layer) to the
   loss dict whenever a layer is in mode ``"online"`` (one term, even with weight 0, so α̂, β̂ stay in the
   graph for DDP). Its gradient reaches α̂, β̂ only, so with a per-parameter optimizer (SGD, Adam; no
   ``SOLVER.CLIP_GRADIENTS`` of type "full_model", whose global norm would include α̂, β̂) every other
   parameter and buffer follows exactly the same trajectory as the same model with plain BN;
2. writes α̂, β̂ (the values the layers use at evaluation) to the event storage (``D2NORM.EVALNORM_MODEL.LOG_*``);
3. applies the Table 2 set-up (``D2NORM.EVALNORM_MODEL.{STATS_INIT, AFFINE_INIT, FREEZE_STATS}``):

   ======  ====================  ========  ===================  ========  ==========================================
   row     network weights       trained   BN EMA statistics    trained   keys
   ======  ====================  ========  ===================  ========  ==========================================
   (a)     random                yes       random (0 / 1)       yes       WEIGHTS "", STATS_INIT/AFFINE_INIT "fresh"
   (b)     ImageNet              yes       random (0 / 1)       yes       STATS_INIT "fresh", AFFINE_INIT "fresh"
   (c)     ImageNet              yes       ImageNet             no        STATS_INIT "loaded", FREEZE_STATS True
   (d)     ImageNet              yes       ImageNet             yes       STATS_INIT "loaded", FREEZE_STATS False
   ======  ====================  ========  ===================  ========  ==========================================

   "fresh" values are set at the start of training — the first training forward with grad enabled, unless
   the run was resumed (event storage iteration > 0) — because ``DefaultTrainer`` loads ``MODEL.WEIGHTS``
   after building the model; evaluation-only runs never reset anything. :meth:`~EvalNormModelMixin.
   apply_evalnorm_init` does it explicitly. ``FREEZE_STATS`` sets ``momentum = 0`` in every BN-derived layer
   at build time: the EMA stays as loaded while the training forward still normalizes with mini-batch
   statistics and α̂, β̂ learn against the stale EMA (the reading of "statistics frozen" under which EvalNorm
   can "adjust statistics", §4.3). The same keys with ``NORM: "BN"`` give the EMA rows of Table 2 with the
   same training; detectron2's usual frozen-BN baseline (eval-mode normalization in training, frozen γ/β) is
   ``NORM: "FrozenBN"`` instead.

**Importing BN / FrozenBN checkpoints.** ``EvalNorm2d`` loads ``nn.BatchNorm2d`` and detectron2
``FrozenBatchNorm2d`` entries (``weight``, ``bias``, ``running_mean``, ``running_var``); ``DetectionCheckpointer``
maps ImageNet files by name heuristics (e.g. torchvision-converted ``R-50.pkl``: BN statistics included). After
every ``load_state_dict`` the model records :attr:`evalnorm_load_report` (a
:class:`~d2norm.layers.report.ConversionReport`: ``uninitialized_target`` per layer, ``skipped`` = layers absent
from the checkpoint) and logs what could not be mapped:
EvalNorm's α̂/β̂ (absent from BN checkpoints: they keep ``INIT_ALPHA``/``INIT_BETA``) and BN layers whose
affine was loaded without statistics (Caffe2/MSRA ``R-50.pkl``: BN folded into the FrozenBN scale/shift; the
EMA keeps mean 0 / var 1, which is exactly how detectron2's FrozenBN loads that file, but the true ImageNet
statistics cannot be recovered, so Table 2 rows (c)/(d) need a checkpoint with statistics).
``FREEZE_AT`` > 0 converts the frozen stages' BN-derived layers (EvalNorm included) to ``FrozenBatchNorm2d``
(detectron2's behaviour); Table 2 trains every weight, so its configs use ``FREEZE_AT: 0``.
"""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...options import Bool, Choice, Int, Option, check_values, declare_node, default
from ...layers.base import D2NormModule
from ...layers.evalnorm import EvalNorm2d, evalnorm_aux_loss, evalnorm_modules
from ...layers.report import ConversionReport

__all__ = [
    "EvalNormModelOptions",
    "evalnorm_model_options",
    "EvalNormModelMixin",
    "EvalNormGeneralizedRCNN",
    "EvalNormRetinaNet",
    "EvalNormMetaArch",
    "evalnorm_aware",
    "bn_statistics_layers",
    "LOSS_KEY",
    "check_aux_loss_collected",
    "check_evalnorm_training_cfg",
]

logger = logging.getLogger(__name__)

LOSS_KEY = EvalNorm2d.aux_loss_key
_INIT_CHOICES = ("loaded", "fresh")


NODE = "EVALNORM_MODEL"
OPTIONS = declare_node(NODE, (
    Option("BASE_META_ARCHITECTURE", "GeneralizedRCNN", "'EvalNormMetaArch' only: the registered meta-architecture "
           "made EvalNorm-aware (parameter names unchanged)."),
    Option("STATS_INIT", "loaded", "Table 2 'BN EMA Stats / Init': 'loaded' = as loaded from MODEL.WEIGHTS (rows a, "
           "c, d); 'fresh' = reset to mean 0, var 1 at the start of training (row b). Every BN-derived layer.",
           check=Choice(*_INIT_CHOICES)),
    Option("AFFINE_INIT", "loaded", "§4.3 row (b) 'initial values of BN parameters from [11]': 'fresh' also resets "
           "gamma = 1, beta = 0 then; 'loaded' keeps them (rows c, d).", check=Choice(*_INIT_CHOICES)),
    Option("FREEZE_STATS", False, "Table 2 'BN EMA Stats / Train?': True (row c) = the EMA is never updated in "
           "training (momentum 0); the training forward still uses batch statistics and alpha/beta still learn.",
           check=Bool()),
    Option("LOG_PERIOD", 20, "Write alpha-hat / beta-hat to the event storage every LOG_PERIOD iterations "
           "(evalnorm/{alpha,beta}_{mean,min,max}); 0 = never.", check=Int(0, note=" (0 = never)")),
    Option("LOG_PER_LAYER", True, "Also evalnorm/alpha/<layer>, evalnorm/beta/<layer> (evalnorm Fig. 3).",
           check=Bool()),
), doc="EvalNorm-aware models (EvalNormGeneralizedRCNN / EvalNormRetinaNet / EvalNormMetaArch add ONE loss term "
       "loss_evalnorm = D2NORM.EVALNORM.AUX_LOSS_WEIGHT x the layers' eq-9 aux loss): evalnorm §3.4, §4.3 Table 2")


@dataclass(frozen=True)
class EvalNormModelOptions:
    """Options of :class:`EvalNormModelMixin` (``D2NORM.EVALNORM.AUX_LOSS_WEIGHT``, ``D2NORM.EVALNORM_MODEL.*``)."""

    aux_loss_weight: float = default("EVALNORM", "AUX_LOSS_WEIGHT")
    stats_init: str = default(NODE, "STATS_INIT")
    affine_init: str = default(NODE, "AFFINE_INIT")
    freeze_stats: bool = default(NODE, "FREEZE_STATS")
    log_period: int = default(NODE, "LOG_PERIOD")
    log_per_layer: bool = default(NODE, "LOG_PER_LAYER")

    def __post_init__(self):
        check_values("EVALNORM", AUX_LOSS_WEIGHT=self.aux_loss_weight)
        check_values(NODE, STATS_INIT=self.stats_init, AFFINE_INIT=self.affine_init, FREEZE_STATS=self.freeze_stats,
                     LOG_PER_LAYER=self.log_per_layer, LOG_PERIOD=self.log_period)


def evalnorm_model_options(cfg) -> EvalNormModelOptions:
    """:class:`EvalNormModelOptions` from ``cfg``; ValueError for bad values or contradicting settings."""
    c = cfg.D2NORM.EVALNORM_MODEL
    opts = EvalNormModelOptions(
        aux_loss_weight=cfg.D2NORM.EVALNORM.AUX_LOSS_WEIGHT,
        stats_init=c.STATS_INIT,
        affine_init=c.AFFINE_INIT,
        freeze_stats=c.FREEZE_STATS,
        log_period=c.LOG_PERIOD,
        log_per_layer=c.LOG_PER_LAYER,
    )
    if opts.freeze_stats:
        # PreciseBN recomputes the population statistics, which is the opposite of Table 2 (c)'s frozen EMA.
        for key, on in (
            ("D2NORM.PRECISE_BN.ENABLED", "PRECISE_BN" in cfg.D2NORM and cfg.D2NORM.PRECISE_BN.ENABLED),
            ("TEST.PRECISE_BN.ENABLED", cfg.TEST.PRECISE_BN.ENABLED),
        ):
            if on:
                raise ValueError(
                    f"D2NORM.EVALNORM_MODEL.FREEZE_STATS=True (statistics frozen, evalnorm Table 2 (c)) contradicts "
                    f"{key}=True (statistics recomputed); disable one of them"
                )
    return opts


def bn_statistics_layers(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """``(name, module)`` of every BN-derived layer with an EMA (torch ``_BatchNorm`` subclasses with
    ``track_running_stats``: BN, SyncBN, EvalNorm, GhostBN, ...). detectron2's ``FrozenBatchNorm2d`` is not one."""
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]


def _other_stat_layers(model: nn.Module) -> List[str]:
    """d2norm layers with state but no BN (mean, variance) EMA (MABN, BGN: their ``estimated_stats()`` is None):
    the Table 2 keys cannot act on them."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, D2NormModule) and m.estimated_stats() is None and any(True for _ in m.buffers(False))
    ]


def _matches(key: str, name: str) -> bool:
    # keys are relative to the module load_state_dict was called on, which may be an ancestor of the model
    return key == name or key.endswith("." + name)


def _post_load_hook(model: "EvalNormModelMixin", incompatible) -> None:
    """Record and log what a checkpoint could not provide (runs after every ``load_state_dict``)."""
    missing = list(incompatible.missing_keys)
    report = model.evalnorm_load_report = ConversionReport(target=type(model).__name__)
    if not missing:
        return

    def lacks(prefix: str, attr: str) -> bool:
        return any(_matches(k, f"{prefix}.{attr}" if prefix else attr) for k in missing)

    stats_missing, absent, en_missing = [], [], []
    evalnorm_names = set(evalnorm_modules(model))
    for name, m in bn_statistics_layers(model):
        no_stats = lacks(name, "running_mean") or lacks(name, "running_var")
        no_affine = m.affine and lacks(name, "weight")
        if no_stats and no_affine:
            absent.append(name)  # layer not in the checkpoint at all (e.g. a new head): nothing to map
        elif no_stats:
            stats_missing.append(name)
        if name in evalnorm_names and not no_affine and (lacks(name, "alpha_logit") or lacks(name, "beta_logit")):
            en_missing.append(name)
    for name in stats_missing:
        report.uninitialized_target[name] = ["running_mean", "running_var"]
    for name in en_missing:
        report.uninitialized_target.setdefault(name, []).extend(["alpha_logit", "beta_logit"])
    for name in absent:
        report.skipped[name] = "not in the checkpoint (e.g. a new head): keeps its initialization"
    if en_missing:
        logger.info(
            "EvalNorm model: %d EvalNorm layer(s) loaded from a BN/FrozenBN state without alpha/beta; they keep "
            "D2NORM.EVALNORM.INIT_ALPHA/INIT_BETA and are learned online (evalnorm §3.4).",
            len(en_missing),
        )
    if stats_missing:
        level = logging.INFO if model.evalnorm_options.stats_init == "fresh" else logging.WARNING
        logger.log(
            level,
            "EvalNorm model: %d BN-derived layer(s) got their affine but no running statistics from the checkpoint "
            "(e.g. a Caffe2/MSRA FrozenBN file, whose BN statistics are folded into the scale/shift and cannot be "
            "recovered); their EMA stays mean 0 / var 1 (as detectron2's FrozenBN loads such a file). Table 2 "
            "'loaded statistics' rows (c)/(d) need a checkpoint with BN statistics (e.g. torchvision R-50). "
            "Layers: %s",
            len(stats_missing),
            ", ".join(stats_missing[:8]) + (", ..." if len(stats_missing) > 8 else ""),
        )


class EvalNormModelMixin:
    """Put before a detectron2 meta-architecture class: ``class M(EvalNormModelMixin, GeneralizedRCNN)``.

    Adds ``loss_evalnorm`` (evalnorm §3.4 online estimation) and α̂/β̂ logging in training, and the Table 2
    (§4.3) statistics set-up. See the module docstring.
    """

    @configurable
    def __init__(self, *, evalnorm_options: Optional[EvalNormModelOptions] = None, **kwargs):
        """
        Args:
            evalnorm_options: :class:`EvalNormModelOptions` (default: the defaults).
            kwargs: arguments of the base meta-architecture.
        """
        super().__init__(**kwargs)
        self.evalnorm_options = evalnorm_options or EvalNormModelOptions()
        self.evalnorm_load_report = ConversionReport(target=type(self).__name__)
        o = self.evalnorm_options
        if o.freeze_stats or o.stats_init == "fresh":
            other = _other_stat_layers(self)
            if other:
                raise ValueError(
                    "D2NORM.EVALNORM_MODEL.FREEZE_STATS / STATS_INIT 'fresh' act on BN-derived layers only; these "
                    f"layers keep other statistics: {', '.join(other[:8])}"
                )
        if o.freeze_stats:
            for _, m in bn_statistics_layers(self):
                # running = (1 - 0) * running + 0 * batch: exactly the loaded EMA (Table 2 (c) "Train? ✗")
                m.momentum = 0.0
        self._evalnorm_init_pending = o.stats_init == "fresh" or o.affine_init == "fresh"
        self.register_load_state_dict_post_hook(_post_load_hook)
        if not evalnorm_modules(self):
            logger.info("%s has no EvalNorm layer (e.g. an EMA baseline): no %s term", type(self).__name__, LOSS_KEY)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["evalnorm_options"] = evalnorm_model_options(cfg)
        return ret

    # ---- Table 2 set-up --------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_evalnorm_init(self) -> Dict[str, int]:
        """Set the "fresh" statistics / affine of Table 2 rows (a), (b) now (BN's initial values, [11]):
        ``STATS_INIT "fresh"``: running mean 0, var 1, ``num_batches_tracked`` 0; ``AFFINE_INIT "fresh"``:
        γ = 1, β = 0; in every BN-derived layer. detectron2 ``FrozenBatchNorm2d`` layers (``FREEZE_AT``) are
        left as they are. Returns the number of layers reset per kind."""
        o = self.evalnorm_options
        self._evalnorm_init_pending = False
        layers = bn_statistics_layers(self)
        counts = {"stats": 0, "affine": 0}
        for _, m in layers:
            if o.stats_init == "fresh":
                m.reset_running_stats()
                counts["stats"] += 1
            if o.affine_init == "fresh" and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
                counts["affine"] += 1
        frozen = [n for n, m in self.named_modules() if isinstance(m, FrozenBatchNorm2d)]
        logger.info(
            "EvalNorm model (evalnorm Table 2): fresh statistics in %d layer(s), fresh affine in %d layer(s)%s",
            counts["stats"],
            counts["affine"],
            f"; {len(frozen)} FrozenBatchNorm2d layer(s) (FREEZE_AT) left as loaded" if frozen else "",
        )
        return counts

    def _maybe_apply_init(self) -> None:
        if not self._evalnorm_init_pending or not torch.is_grad_enabled():
            return  # statistics tools (no_grad forwards) never trigger it
        try:
            it = get_event_storage().iter
        except AssertionError:
            it = 0
        if it > 0:
            self._evalnorm_init_pending = False
            logger.info("EvalNorm model: training resumed at iteration %d; Table 2 'fresh' init not applied", it)
            return
        self.apply_evalnorm_init()

    # ---- training ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        layers = evalnorm_modules(self)
        if any(m.fitting for m in layers.values()):
            # fit_evalnorm_offline drives this forward and collects the aux terms itself
            return super().forward(batched_inputs)
        self._maybe_apply_init()
        online = any(m.mode == "online" for m in layers.values())
        if online:
            evalnorm_aux_loss(self)  # drop terms of forwards nobody collected (only this iteration counts)
        losses = super().forward(batched_inputs)
        if online:
            if not isinstance(losses, dict):
                raise TypeError(f"{type(self).__name__}: expected a loss dict in training, got {type(losses)}")
            if LOSS_KEY in losses:
                raise ValueError(f"{type(self).__name__}: the base model already returns {LOSS_KEY!r}")
            losses[LOSS_KEY] = evalnorm_aux_loss(self) * float(self.evalnorm_options.aux_loss_weight)
        self._log_alpha_beta(layers)
        return losses

    @torch.no_grad()
    def _log_alpha_beta(self, layers: Dict[str, EvalNorm2d]) -> None:
        period = self.evalnorm_options.log_period
        if period <= 0 or not layers:
            return
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        if storage.iter % period:
            return
        names, values = [], []
        for name, m in layers.items():
            try:
                a, b = m.eval_alpha_beta()
            except RuntimeError:  # "rule" mode before any recorded batch size
                continue
            dev = m.alpha_logit.device
            names.append(name)
            values.append(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev) for v in (a, b)]))
        if not values:
            return
        ab = torch.stack(values).cpu()  # one device-to-host copy
        for i, key in enumerate(("alpha", "beta")):
            col = ab[:, i]
            storage.put_scalar(f"evalnorm/{key}_mean", float(col.mean()), smoothing_hint=False)
            storage.put_scalar(f"evalnorm/{key}_min", float(col.min()), smoothing_hint=False)
            storage.put_scalar(f"evalnorm/{key}_max", float(col.max()), smoothing_hint=False)
            if self.evalnorm_options.log_per_layer:
                for name, v in zip(names, col.tolist()):
                    storage.put_scalar(f"evalnorm/{key}/{name}", v, smoothing_hint=False)


_AWARE: Dict[type, type] = {}


def evalnorm_aware(base: type) -> type:
    """The EvalNorm-aware subclass ``(EvalNormModelMixin, base)`` of a meta-architecture class (cached)."""
    if not isinstance(base, type) or not issubclass(base, nn.Module):
        raise ValueError(f"evalnorm_aware needs a meta-architecture class (nn.Module subclass), got {base!r}")
    if issubclass(base, EvalNormModelMixin):
        return base
    if base not in _AWARE:
        _AWARE[base] = type(
            f"EvalNorm{base.__name__}",
            (EvalNormModelMixin, base),
            {"__module__": __name__, "__doc__": f"{base.__name__} with EvalNormModelMixin (evalnorm §3.4, §4.3)."},
        )
    return _AWARE[base]


@META_ARCH_REGISTRY.register()
class EvalNormGeneralizedRCNN(EvalNormModelMixin, GeneralizedRCNN):
    """detectron2's ``GeneralizedRCNN`` (Faster/Mask R-CNN) + :class:`EvalNormModelMixin` (evalnorm §4.3)."""


@META_ARCH_REGISTRY.register()
class EvalNormRetinaNet(EvalNormModelMixin, RetinaNet):
    """detectron2's ``RetinaNet`` + :class:`EvalNormModelMixin`. ``MODEL.RETINANET.NORM: "EvalNorm"`` shares
    one layer over the FPN levels (one aux term per level call; cf. rethinking §5.2 on shared head BN)."""


_AWARE[GeneralizedRCNN] = EvalNormGeneralizedRCNN
_AWARE[RetinaNet] = EvalNormRetinaNet


@META_ARCH_REGISTRY.register()
def EvalNormMetaArch(cfg):  # noqa: N802  (registry name)
    """``META_ARCHITECTURE: "EvalNormMetaArch"``: ``D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE`` made
    EvalNorm-aware (same parameter names as the base)."""
    name = cfg.D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE
    if name == "EvalNormMetaArch" or name not in META_ARCH_REGISTRY:
        valid = sorted(k for k, v in META_ARCH_REGISTRY if isinstance(v, type) and k != "EvalNormMetaArch")
        raise ValueError(
            f"D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE={name!r} is not a registered meta-architecture class; "
            f"valid: {', '.join(valid)}"
        )
    return evalnorm_aware(META_ARCH_REGISTRY.get(name))(cfg)


def _no_aux_loss_error(what: str, arch: str) -> ValueError:
    return ValueError(
        f"{what} in MODEL.META_ARCHITECTURE {arch!r}, which never adds EvalNorm's aux loss (evalnorm §3.4 eq 9) "
        f"to the training loss: alpha-hat, beta-hat would not train. Use MODEL.META_ARCHITECTURE "
        f"'EvalNormGeneralizedRCNN' / 'EvalNormRetinaNet' (or 'EvalNormMetaArch' with "
        f"D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE {arch!r}), which add it as {LOSS_KEY!r}; or "
        f"D2NORM.EVALNORM.MODE 'rule' / 'offline' (no aux loss in training; fit alpha-hat, beta-hat afterwards "
        f"with tools/fit_evalnorm.py)."
    )


def check_evalnorm_training_cfg(cfg) -> None:
    """Training setup, before anything is written: a NORM key naming ``EvalNorm`` with
    ``D2NORM.EVALNORM.MODE "online"`` needs a meta-architecture that adds the layers' aux loss to the loss dict
    (:class:`EvalNormModelMixin`); a stock one would train every other weight while α̂, β̂ stay at their
    initial value, with nothing said until the pending terms overflow. ValueError naming the keys and the fix."""
    from ...layers.cfg_checks import norm_keys
    from ...layers.registry import get_norm, norm_options

    keys = [k for k, v in norm_keys(cfg) if v == "EvalNorm"]
    if keys:
        with norm_options(cfg):  # the layer's own option checks first (they name the bad D2NORM.EVALNORM key)
            get_norm("EvalNorm", 8)
    if cfg.D2NORM.EVALNORM.MODE != "online":
        return
    arch = cfg.MODEL.META_ARCHITECTURE
    if not keys or arch == "EvalNormMetaArch" or arch not in META_ARCH_REGISTRY:
        return
    cls = META_ARCH_REGISTRY.get(arch)
    if isinstance(cls, type) and issubclass(cls, EvalNormModelMixin):
        return
    raise _no_aux_loss_error(f"{', '.join(keys)} 'EvalNorm' with D2NORM.EVALNORM.MODE 'online'", arch)


def check_aux_loss_collected(model: nn.Module) -> None:
    """Training setup on the built model (also layers a custom head or a LazyConfig placed): EvalNorm layers in
    mode ``"online"`` in a model that is not an :class:`EvalNormModelMixin` are a ValueError (see
    :func:`check_evalnorm_training_cfg`)."""
    net = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if isinstance(net, EvalNormModelMixin):
        return
    online = [n for n, m in evalnorm_modules(net).items() if m.mode == "online"]
    if online:
        raise _no_aux_loss_error(
            f"{len(online)} EvalNorm layer(s) in mode 'online' (D2NORM.EVALNORM.MODE), e.g. {online[0]!r},",
            type(net).__name__)
