"""PreciseBN during training (rethinking §3.2, A.2, A.3, A.10), cfg ``D2NORM.PRECISE_BN``."""
import logging
import time
from typing import Iterable, Optional

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ...stats import ESTIMATORS, NONFINITE_POLICIES, population_stat_layers, recompute_population_stats
from ...utils.validation import check_bool, check_choice, check_int
from .common import build_d2norm_train_loader

__all__ = ["PreciseBNHook", "check_precise_bn_cfg", "build_precise_bn_hook", "build_precise_bn_loader"]

logger = logging.getLogger(__name__)


def check_precise_bn_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.PRECISE_BN`` value and what is allowed."""
    c = cfg.D2NORM.PRECISE_BN
    for key in ("ENABLED", "EXACT_LAYERWISE"):
        check_bool(f"D2NORM.PRECISE_BN.{key}", c[key])
    check_int("D2NORM.PRECISE_BN.PERIOD", c.PERIOD, minimum=-1,
              note=" (-1 = TEST.EVAL_PERIOD, 0 = only after the last iteration)")
    for key in ("NUM_SAMPLES", "BATCH_SIZE"):
        check_int(f"D2NORM.PRECISE_BN.{key}", c[key], minimum=1)
    check_choice("D2NORM.PRECISE_BN.ESTIMATOR", c.ESTIMATOR, ESTIMATORS)
    check_choice("D2NORM.PRECISE_BN.NONFINITE", c.NONFINITE, NONFINITE_POLICIES)
    if c.ENABLED and cfg.TEST.PRECISE_BN.ENABLED:
        raise ValueError(
            "TEST.PRECISE_BN.ENABLED (detectron2's PreciseBN) and D2NORM.PRECISE_BN.ENABLED are both True: "
            "enable only D2NORM.PRECISE_BN"
        )


def build_precise_bn_loader(cfg, build_train_loader=None):
    """:func:`~.common.build_d2norm_train_loader` of ``D2NORM.PRECISE_BN.BATCH_SIZE`` images per rank."""
    return build_d2norm_train_loader(cfg, cfg.D2NORM.PRECISE_BN.BATCH_SIZE, build_train_loader)


class PreciseBNHook(HookBase):
    """Recompute population statistics every ``period`` iterations and after the last iteration.

    Runs :func:`d2norm.stats.recompute_population_stats` on the trainer's model with ``num_samples`` images
    over all ranks, forwarded ``batch_size`` per rank; every rank ends with identical statistics; nothing else
    in the model (or the training RNG streams) changes. Its data iterator persists across runs, so each run
    sees new images. Logs its time (and writes ``precise_bn/time`` to the event storage); the progress bar
    shows on rank 0.
    """

    def __init__(
        self,
        model,
        data_loader: Iterable,
        period: int,
        num_samples: int,
        batch_size: int,
        estimator: str = "population",
        exact_layerwise: bool = False,
        progress: bool = True,
        nonfinite: str = "error",
    ):
        self._model = model
        self._data_loader = data_loader
        self._data_iter = None
        self.period = int(period)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.estimator = estimator
        self.exact_layerwise = exact_layerwise
        self.progress = progress
        self.nonfinite = nonfinite
        self.num_runs = 0
        self.last_results: Optional[dict] = None
        n = len(population_stat_layers(model))
        if n == 0:
            logger.warning("PreciseBN: the model has no layer with population statistics in training mode")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self.period > 0 and next_iter % self.period == 0):
            self.update_stats()

    def update_stats(self) -> dict:
        """Run PreciseBN now (all ranks must call it together)."""
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        start = time.perf_counter()
        self.last_results = recompute_population_stats(
            self._model,
            self._data_iter,
            self.num_samples,
            batch_size=self.batch_size,
            estimator=self.estimator,
            exact_layerwise=self.exact_layerwise,
            progress=self.progress,
            nonfinite=self.nonfinite,
        )
        elapsed = time.perf_counter() - start
        self.num_runs += 1
        if comm.is_main_process():
            it = getattr(getattr(self, "trainer", None), "iter", None)
            logger.info(
                "PreciseBN (iteration %s): %d layers, %d images, B=%d, estimator=%s%s: %.2f s",
                None if it is None else it + 1, len(self.last_results), self.num_samples, self.batch_size,
                self.estimator, ", exact layer-wise" if self.exact_layerwise else "", elapsed,
            )
        storage = getattr(getattr(self, "trainer", None), "storage", None)
        if storage is not None:
            storage.put_scalar("precise_bn/time", elapsed, smoothing_hint=False)
        return self.last_results


def build_precise_bn_hook(cfg, model, data_loader=None, build_train_loader=None) -> PreciseBNHook:
    """:class:`PreciseBNHook` from ``cfg.D2NORM.PRECISE_BN`` (validated); the loader defaults to
    :func:`build_precise_bn_loader`."""
    check_precise_bn_cfg(cfg)
    c = cfg.D2NORM.PRECISE_BN
    period = cfg.TEST.EVAL_PERIOD if c.PERIOD == -1 else c.PERIOD
    if data_loader is None:
        data_loader = build_precise_bn_loader(cfg, build_train_loader)
    return PreciseBNHook(
        model, data_loader, period, c.NUM_SAMPLES, c.BATCH_SIZE, estimator=c.ESTIMATOR,
        exact_layerwise=c.EXACT_LAYERWISE, nonfinite=c.NONFINITE,
    )
