"""Training hooks of d2norm, one module per hook (with its cfg node declared there) and one row each in
:data:`HOOKS`, the table the trainer builds them from; the statistics math they run lives in :mod:`d2norm.stats` and :mod:`d2norm.layers`, what is
here is trainer plumbing (when to run, optimizer / DDP bookkeeping, event storage).

* :class:`PreciseBNHook` — PreciseBN (rethinking §3.2, A.2, A.3, A.10), cfg ``D2NORM.PRECISE_BN``.
* :class:`FrozenBNSwitchHook` — BN → FrozenBN during training (rethinking §4.3, Fig. 6), ``D2NORM.FROZEN_BN_SWITCH``.
* :class:`EvalNormFitHook` — offline α̂, β̂ of EvalNorm (evalnorm §3.4), ``D2NORM.EVALNORM_FIT``.
* :class:`NonFiniteStatsHook` — reports the statistics updates layers skipped for non-finite batches (always on).
* :class:`BNMonitorHook` — EMA vs batch / population statistics (rethinking Fig. 2; estimation-shift Def. 2),
  ``D2NORM.BN_MONITOR``.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

from ...options import check_once
from .common import build_d2norm_train_loader
from .precise_bn import PreciseBNHook, PreciseBNSpec, build_precise_bn_hook, build_precise_bn_loader, check_precise_bn_cfg
from .frozen_bn_switch import (
    FrozenBNSwitchHook,
    build_frozen_bn_switch_hook,
    check_frozen_bn_switch_cfg,
    rebuild_optimizer_param_groups,
    switch_to_frozen_bn,
)
from .evalnorm_fit import EvalNormFitHook, build_evalnorm_fit_hook, check_evalnorm_fit_cfg
from .bn_monitor import BNMonitorHook, build_bn_monitor_hook, check_bn_monitor_cfg
from .nonfinite_stats import NonFiniteStatsHook


@dataclass(frozen=True)
class HookEntry:
    """One row of :data:`HOOKS`: ``cfg.D2NORM.<node>.ENABLED`` switches the hook on (``node`` None: always on);
    ``build(cfg, trainer)`` makes it from a checked cfg; ``check(cfg)`` is its setup check (declared options and
    the rules between them), run once per launch by :func:`check_hooks_cfg`."""

    node: Optional[str]
    build: Callable
    check: Optional[Callable] = None

    def enabled(self, cfg) -> bool:
        return self.node is None or bool(cfg.D2NORM[self.node].ENABLED)


#: the d2norm hooks in the order the trainer runs them (after IterationTimer / LRScheduler, before checkpointing
#: and evaluation): the BN monitor first, so it measures the training EMA before PreciseBN replaces it; the
#: FrozenBN switch; PreciseBN; EvalNorm's offline fit after PreciseBN (fitted against the final population
#: statistics); the non-finite statistics report last. A new hook: its module + one entry here.
HOOKS = (
    HookEntry("BN_MONITOR", lambda cfg, t: build_bn_monitor_hook(cfg, build_train_loader=t.build_train_loader,
                                                                 model=t.model), check_bn_monitor_cfg),
    HookEntry("FROZEN_BN_SWITCH", build_frozen_bn_switch_hook, check_frozen_bn_switch_cfg),
    HookEntry("PRECISE_BN", lambda cfg, t: build_precise_bn_hook(cfg, t.model, build_train_loader=t.build_train_loader),
              check_precise_bn_cfg),
    HookEntry("EVALNORM_FIT", lambda cfg, t: build_evalnorm_fit_hook(cfg, build_train_loader=t.build_train_loader),
              check_evalnorm_fit_cfg),
    HookEntry(None, lambda cfg, t: NonFiniteStatsHook(t.model)),
)


def check_hooks_cfg(cfg) -> None:
    """Every hook's setup check (:data:`HOOKS`), enabled or not: a bad value fails at setup."""
    for entry in HOOKS:
        if entry.check is not None:
            check_once(cfg, entry.node, entry.check)


def build_hooks(cfg, trainer) -> List:
    """The enabled hooks of :data:`HOOKS`, in order, built for ``trainer``."""
    return [entry.build(cfg, trainer) for entry in HOOKS if entry.enabled(cfg)]


__all__ = [
    "HOOKS", "HookEntry", "check_hooks_cfg", "build_hooks",
    "PreciseBNHook", "PreciseBNSpec", "check_precise_bn_cfg", "build_precise_bn_hook", "build_precise_bn_loader",
    "FrozenBNSwitchHook", "check_frozen_bn_switch_cfg", "build_frozen_bn_switch_hook", "switch_to_frozen_bn",
    "rebuild_optimizer_param_groups",
    "EvalNormFitHook", "check_evalnorm_fit_cfg", "build_evalnorm_fit_hook",
    "BNMonitorHook", "check_bn_monitor_cfg", "build_bn_monitor_hook",
    "build_d2norm_train_loader",
    "NonFiniteStatsHook",
]
