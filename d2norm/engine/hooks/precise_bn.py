"""PreciseBN during training (rethinking §3.2, A.2, A.3, A.10), cfg ``D2NORM.PRECISE_BN``."""
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ...options import Bool, Choice, Int, Option, check_node, check_once, declare_node
from ...stats import ESTIMATORS, NONFINITE_POLICIES, population_stat_layers, recompute_population_stats
from .common import build_d2norm_train_loader

__all__ = ["PreciseBNHook", "PreciseBNSpec", "check_precise_bn_cfg", "build_precise_bn_hook", "build_precise_bn_loader"]

logger = logging.getLogger(__name__)

NODE = "PRECISE_BN"
OPTIONS = declare_node(NODE, (
    Option("ENABLED", False, "Recompute population statistics during training (PreciseBNHook over "
           "d2norm.stats.recompute_population_stats). Replaces detectron2's TEST.PRECISE_BN (both: ValueError).",
           check=Bool()),
    Option("PERIOD", -1, "Every PERIOD iterations and after the last one; -1 = TEST.EVAL_PERIOD (statistics fresh for "
           "every evaluation, §3.2 Fig. 3), 0 = only after the last iteration.",
           check=Int(-1, note=" (-1 = TEST.EVAL_PERIOD, 0 = only after the last iteration)")),
    Option("NUM_SAMPLES", 1000, "N: images over all ranks per run (§3.2 Table 1: 10^3-10^4 suffice); each rank "
           "forwards its share.", check=Int(1)),
    Option("BATCH_SIZE", 16, "B: images per forward on each rank = the normalization batch of the pass, independent "
           "of SOLVER.IMS_PER_BATCH (§3.2 Table 2: B >= 10^2 where memory allows; no backward).", check=Int(1)),
    Option("ESTIMATOR", "population", "'population': eq 2 with per-batch sizes (variance of all samples); "
           "'mean_of_batch_var': eq 3 (A.2).", check=Choice(*ESTIMATORS)),
    Option("EXACT_LAYERWISE", False, "A.3: estimate layer k with layers < k already using their exact population "
           "statistics (= the population forwarded as one batch); one pass per layer call, this rank's N/W images "
           "kept in memory.", check=Bool()),
    Option("NONFINITE", "error", "A batch with non-finite statistics in some layer: 'error' stops naming the layer "
           "and batch (statistics unchanged); 'skip' leaves those layer calls out of the estimate, with a warning.",
           check=Choice(*NONFINITE_POLICIES)),
), doc="PreciseBN: rethinking §3.2, A.2, A.3, A.10; Tables 1-2")


def check_precise_bn_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.PRECISE_BN`` value and what is allowed."""
    check_node(cfg, NODE)
    if cfg.D2NORM.PRECISE_BN.ENABLED and cfg.TEST.PRECISE_BN.ENABLED:
        raise ValueError(
            "TEST.PRECISE_BN.ENABLED (detectron2's PreciseBN) and D2NORM.PRECISE_BN.ENABLED are both True: "
            "enable only D2NORM.PRECISE_BN"
        )


@dataclass(frozen=True)
class PreciseBNSpec:
    """One PreciseBN run's settings (rethinking §3.2: N images, B per forward, eq 2 / eq 3, A.3 exact
    layer-wise, the non-finite policy), from ``cfg.D2NORM.PRECISE_BN`` by :meth:`from_cfg` for the PreciseBN
    hook, the FrozenBN switch's PreciseBN and ``tools/recompute_bn_stats.py`` alike."""

    num_samples: int
    batch_size: int
    estimator: str = "population"
    exact_layerwise: bool = False
    nonfinite: str = "error"

    @classmethod
    def from_cfg(cls, cfg, **overrides) -> "PreciseBNSpec":
        """The spec of ``cfg.D2NORM.PRECISE_BN`` (checked), with ``overrides`` (``None`` = keep the cfg's)."""
        check_once(cfg, NODE, check_precise_bn_cfg)
        c = cfg.D2NORM.PRECISE_BN
        values = dict(num_samples=c.NUM_SAMPLES, batch_size=c.BATCH_SIZE, estimator=c.ESTIMATOR,
                      exact_layerwise=c.EXACT_LAYERWISE, nonfinite=c.NONFINITE)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def loader(self, cfg, build_train_loader=None):
        """:func:`~.common.build_d2norm_train_loader` of ``batch_size`` images per rank."""
        return build_d2norm_train_loader(cfg, self.batch_size, build_train_loader)

    def run(self, model, data, progress: bool = False):
        """:func:`d2norm.stats.recompute_population_stats` of ``model`` on ``data`` with these settings."""
        return recompute_population_stats(
            model, data, self.num_samples, batch_size=self.batch_size, estimator=self.estimator,
            exact_layerwise=self.exact_layerwise, progress=progress, nonfinite=self.nonfinite)

    def describe(self) -> str:
        return (f"N={self.num_samples}, B={self.batch_size}, estimator={self.estimator}"
                f"{', exact layer-wise' if self.exact_layerwise else ''}")


def build_precise_bn_loader(cfg, build_train_loader=None):
    """:func:`~.common.build_d2norm_train_loader` of ``D2NORM.PRECISE_BN.BATCH_SIZE`` images per rank."""
    return PreciseBNSpec.from_cfg(cfg).loader(cfg, build_train_loader)


class PreciseBNHook(HookBase):
    """Recompute population statistics every ``period`` iterations and after the last iteration.

    Runs :func:`d2norm.stats.recompute_population_stats` on the trainer's model with ``num_samples`` images
    over all ranks, forwarded ``batch_size`` per rank; every rank ends with identical statistics; nothing else
    in the model (or the training RNG streams) changes. Its data iterator persists across runs, so each run
    sees new images. Logs its time (and writes ``precise_bn/time`` to the event storage); the progress bar
    shows on rank 0.
    """

    def __init__(self, model, data_loader: Iterable, period: int, spec: PreciseBNSpec, progress: bool = True):
        self._model = model
        self._data_loader = data_loader
        self._data_iter = None
        self.period = int(period)
        self.spec = spec
        self.progress = progress
        self.num_runs = 0
        self.last_results: Optional[dict] = None
        n = len(population_stat_layers(model))
        if n == 0:
            logger.warning("PreciseBN: the model has no layer with population statistics in training mode")

    # the spec's settings, as attributes of the hook (rethinking §3.2: N, B, eq 2 / eq 3, A.3)
    num_samples = property(lambda self: self.spec.num_samples)
    batch_size = property(lambda self: self.spec.batch_size)
    estimator = property(lambda self: self.spec.estimator)
    exact_layerwise = property(lambda self: self.spec.exact_layerwise)
    nonfinite = property(lambda self: self.spec.nonfinite)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self.period > 0 and next_iter % self.period == 0):
            self.update_stats()

    def update_stats(self) -> dict:
        """Run PreciseBN now (all ranks must call it together)."""
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        start = time.perf_counter()
        self.last_results = self.spec.run(self._model, self._data_iter, progress=self.progress)
        elapsed = time.perf_counter() - start
        self.num_runs += 1
        if comm.is_main_process():
            it = getattr(getattr(self, "trainer", None), "iter", None)
            logger.info(
                "PreciseBN (iteration %s): %d layers, %s: %.2f s",
                None if it is None else it + 1, len(self.last_results), self.spec.describe(), elapsed,
            )
        storage = getattr(getattr(self, "trainer", None), "storage", None)
        if storage is not None:
            storage.put_scalar("precise_bn/time", elapsed, smoothing_hint=False)
        return self.last_results


def build_precise_bn_hook(cfg, model, data_loader=None, build_train_loader=None) -> PreciseBNHook:
    """:class:`PreciseBNHook` from ``cfg.D2NORM.PRECISE_BN`` (:class:`PreciseBNSpec`); the loader defaults to
    the spec's training-style loader."""
    spec = PreciseBNSpec.from_cfg(cfg)
    c = cfg.D2NORM.PRECISE_BN
    period = cfg.TEST.EVAL_PERIOD if c.PERIOD == -1 else c.PERIOD
    if data_loader is None:
        data_loader = spec.loader(cfg, build_train_loader)
    return PreciseBNHook(model, data_loader, period, spec)
