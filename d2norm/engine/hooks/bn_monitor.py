"""BN-statistics monitor (rethinking Fig. 2; estimation-shift Def. 2), cfg ``D2NORM.BN_MONITOR``."""
import time
from typing import Dict, Iterable, Optional, Sequence

from detectron2.engine.train_loop import HookBase

from ...options import Bool, Int, Option, check_node, check_once, declare_node
from .common import Patterns, build_d2norm_train_loader, per_rank_batch

__all__ = ["BNMonitorHook", "check_bn_monitor_cfg", "build_bn_monitor_hook"]


NODE = "BN_MONITOR"
OPTIONS = declare_node(NODE, (
    Option("ENABLED", False, "Write bn_monitor/<layer>/{mean_gap, std_gap, batch_mean_gap, batch_std_gap, "
           "batch_mean_spread, batch_std_spread} (d2norm/stats/monitor.py) to the event storage.", check=Bool()),
    Option("PERIOD", 100, "Every PERIOD iterations.", check=Int(1)),
    Option("NUM_BATCHES", 4, "Training batches forwarded per measurement (Fig. 2 uses 100; it costs NUM_BATCHES "
           "forwards).", check=Int(1)),
    Option("BATCH_SIZE", 0, "Images per rank per batch; 0 = the training batch per rank (the batch the EMA is "
           "updated with, Fig. 2).", check=Int(0, note=" (0 = the training batch per rank)")),
    Option("LAYERS", [], "Regular expressions (re.search) on layer names; [] = every layer with population "
           "statistics.", check=Patterns),
), doc="BN-statistics monitor: rethinking §3.1 Fig. 2; estimation-shift Def. 2 (BNMonitorHook)")


def check_bn_monitor_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.BN_MONITOR`` value and what is allowed."""
    check_node(cfg, NODE)


class BNMonitorHook(HookBase):
    """Every ``period`` iterations, per layer, the gaps between the EMA and the current model's batch and
    population statistics (:func:`d2norm.stats.monitor.bn_statistics_gaps`; rethinking Fig. 2, estimation-shift
    Def. 2) on ``num_batches`` training batches, written to the event storage as
    ``bn_monitor/<layer>/<metric>`` (tensorboard / json writers show them). No side effect on the model or the
    training RNG streams. Distributed: all ranks forward their batches; population moments are all-reduced.
    """

    def __init__(self, data_loader: Iterable, period: int, num_batches: int, layers: Sequence[str] = ()):
        self._data_loader = data_loader
        self._data_iter = None
        self.period = int(period)
        self.num_batches = int(num_batches)
        self.layers = list(layers)
        self.last_result: Optional[Dict[str, Dict[str, float]]] = None

    def after_step(self):
        if (self.trainer.iter + 1) % self.period == 0:
            self.measure()

    def measure(self) -> Dict[str, Dict[str, float]]:
        from ...stats.monitor import bn_statistics_gaps

        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        start = time.perf_counter()
        res = bn_statistics_gaps(self.trainer.model, self._data_iter, self.num_batches, self.layers)
        self.last_result = res
        storage = self.trainer.storage
        for layer, metrics in res.items():
            for k, v in metrics.items():
                storage.put_scalar(f"bn_monitor/{layer}/{k}", v, smoothing_hint=False)
        storage.put_scalar("bn_monitor/time", time.perf_counter() - start, smoothing_hint=False)
        return res


def check_bn_monitor_layers(patterns: Sequence[str], model) -> None:
    """ValueError for a ``D2NORM.BN_MONITOR.LAYERS`` pattern that matches none of ``model``'s layers with
    population statistics (it would silently monitor nothing), listing those layers."""
    from ...stats.monitor import select_layers
    from ...stats.precise_bn import population_stat_layers

    names = list(population_stat_layers(model))
    dead = [p for p in patterns if not select_layers(names, [p])]
    if dead:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ValueError(
            f"D2NORM.BN_MONITOR.LAYERS: {dead} match(es) none of the model's layers with population statistics "
            f"({shown or 'none'}); use regular expressions (re.search) on these names, or [] for all."
        )


def build_bn_monitor_hook(cfg, data_loader=None, build_train_loader=None, model=None) -> BNMonitorHook:
    """:class:`BNMonitorHook` from ``cfg.D2NORM.BN_MONITOR`` (validated; with ``model``, every LAYERS pattern
    must match one of its layers)."""
    check_once(cfg, NODE, check_bn_monitor_cfg)
    c = cfg.D2NORM.BN_MONITOR
    if model is not None:
        check_bn_monitor_layers(c.LAYERS, model)
    if data_loader is None:
        data_loader = build_d2norm_train_loader(cfg, per_rank_batch(cfg, c.BATCH_SIZE), build_train_loader)
    return BNMonitorHook(data_loader, c.PERIOD, c.NUM_BATCHES, c.LAYERS)
