"""Training hooks of d2norm (added from cfg by :meth:`d2norm.engine.trainer.Trainer.build_d2norm_hooks`), one
module per hook; the statistics math they run lives in :mod:`d2norm.stats` and :mod:`d2norm.layers`, what is
here is trainer plumbing (when to run, optimizer / DDP bookkeeping, event storage).

* :class:`PreciseBNHook` — PreciseBN (rethinking §3.2, A.2, A.3, A.10), cfg ``D2NORM.PRECISE_BN``.
* :class:`FrozenBNSwitchHook` — BN → FrozenBN during training (rethinking §4.3, Fig. 6), ``D2NORM.FROZEN_BN_SWITCH``.
* :class:`EvalNormFitHook` — offline α̂, β̂ of EvalNorm (evalnorm §3.4), ``D2NORM.EVALNORM_FIT``.
* :class:`NonFiniteStatsHook` — reports the statistics updates layers skipped for non-finite batches (always on).
* :class:`BNMonitorHook` — EMA vs batch / population statistics (rethinking Fig. 2; estimation-shift Def. 2),
  ``D2NORM.BN_MONITOR``.
"""
from .common import build_d2norm_train_loader
from .precise_bn import PreciseBNHook, build_precise_bn_hook, build_precise_bn_loader, check_precise_bn_cfg
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

__all__ = [
    "PreciseBNHook", "check_precise_bn_cfg", "build_precise_bn_hook", "build_precise_bn_loader",
    "FrozenBNSwitchHook", "check_frozen_bn_switch_cfg", "build_frozen_bn_switch_hook", "switch_to_frozen_bn",
    "rebuild_optimizer_param_groups",
    "EvalNormFitHook", "check_evalnorm_fit_cfg", "build_evalnorm_fit_hook",
    "BNMonitorHook", "check_bn_monitor_cfg", "build_bn_monitor_hook",
    "build_d2norm_train_loader",
    "NonFiniteStatsHook",
]
