"""Offline α̂, β̂ of EvalNorm during training (evalnorm §3.4), cfg ``D2NORM.EVALNORM_FIT``."""
import logging
import time
from typing import Iterable, Optional

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ...options import Bool, Int, Option, check_node, check_once, declare_node
from ...utils.validation import check_int
from .common import build_d2norm_train_loader, per_rank_batch

__all__ = ["EvalNormFitHook", "check_evalnorm_fit_cfg", "build_evalnorm_fit_hook"]

logger = logging.getLogger(__name__)


NODE = "EVALNORM_FIT"


def _fit_iter(label, v):
    if isinstance(v, bool) or v != -1:
        check_int(label, v, minimum=1, note=", or -1 (after the last iteration)")
    return v


OPTIONS = declare_node(NODE, (
    Option("ENABLED", False, "Fit alpha-hat/beta-hat with D2NORM.EVALNORM.OFFLINE_ITERS Adam steps at OFFLINE_LR on "
           "training batches (evalnorm §3.4 'Offline estimation'); nothing else in the model changes.", check=Bool()),
    Option("ITER", -1, "-1 = after the last iteration (before the final checkpoint / evaluation); k >= 1 = after "
           "iteration k.", check=_fit_iter),
    Option("BATCH_SIZE", 0, "Images per rank per fitting step (N = OFFLINE_ITERS x BATCH_SIZE x ranks); 0 = the "
           "training batch per rank.", check=Int(0, note=" (0 = the training batch per rank)")),
    Option("SET_OFFLINE_MODE", True, "After the final fit, set every EvalNorm layer's mode to 'offline' so "
           "evaluation uses the fitted values.", check=Bool()),
), doc="EvalNorm offline fitting hook: evalnorm §3.4 'Offline estimation' (EvalNormFitHook)")


def check_evalnorm_fit_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.EVALNORM_FIT`` (or ``D2NORM.EVALNORM.OFFLINE_*``) value and what is
    allowed."""
    check_node(cfg, NODE)
    check_node(cfg, "EVALNORM")


class EvalNormFitHook(HookBase):
    """Offline α̂, β̂ (evalnorm §3.4 "Offline estimation") with
    :func:`d2norm.stats.evalnorm_fit.fit_evalnorm_offline` after iteration ``fit_iter`` (``-1``: after the
    last one, before the final checkpoint and evaluation), on ``num_iters`` batches of the loader (N = num_iters
    × batch × ranks training images). Only α̂, β̂ change: every other parameter, buffer, flag and the training
    RNG streams are restored. With ``set_offline_mode`` the EvalNorm layers use mode ``"offline"`` (the fitted
    values) after the *final* fit (not mid-training: changing the mode changes the trainable parameter set).
    Writes ``evalnorm_fit/loss_first``, ``evalnorm_fit/loss_last`` and ``evalnorm_fit/<layer>/{alpha,beta}``.
    """

    def __init__(self, data_loader: Iterable, fit_iter: int, num_iters: int, lr: float, set_offline_mode=True):
        self._data_loader = data_loader
        self._data_iter = None
        self.fit_iter = int(fit_iter)
        self.num_iters = int(num_iters)
        self.lr = float(lr)
        self.set_offline_mode = bool(set_offline_mode)
        self.last_result: Optional[dict] = None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        target = self.trainer.max_iter if self.fit_iter == -1 else self.fit_iter
        if next_iter == target:
            self.fit(final=next_iter == self.trainer.max_iter)

    def fit(self, final: bool = False) -> dict:
        from ...layers.evalnorm import evalnorm_modules
        from ...stats.evalnorm_fit import fit_evalnorm_offline
        from ...stats.passes import isolated_rng, unwrap_model

        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        net = unwrap_model(self.trainer.model)
        layers = evalnorm_modules(net)
        if not layers:
            logger.warning("EvalNorm fit: the model has no EvalNorm layer; nothing to fit")
            return {}
        start = time.perf_counter()
        with isolated_rng():
            res = fit_evalnorm_offline(net, self._data_iter, self.num_iters, lr=self.lr)
        self.last_result = res
        if final and self.set_offline_mode:
            for m in layers.values():
                m.mode = "offline"
        storage = self.trainer.storage
        if res["losses"]:
            storage.put_scalar("evalnorm_fit/loss_first", res["losses"][0], smoothing_hint=False)
            storage.put_scalar("evalnorm_fit/loss_last", res["losses"][-1], smoothing_hint=False)
        for name, ab in res["alpha_beta"].items():
            storage.put_scalar(f"evalnorm_fit/{name}/alpha", ab["alpha"], smoothing_hint=False)
            storage.put_scalar(f"evalnorm_fit/{name}/beta", ab["beta"], smoothing_hint=False)
        if comm.is_main_process():
            logger.info("EvalNorm offline fit (%d layers, %d iterations): aux loss %.4g -> %.4g in %.2f s",
                        len(layers), len(res["losses"]), res["losses"][0] if res["losses"] else float("nan"),
                        res["losses"][-1] if res["losses"] else float("nan"), time.perf_counter() - start)
        return res


def build_evalnorm_fit_hook(cfg, data_loader=None, build_train_loader=None) -> EvalNormFitHook:
    """:class:`EvalNormFitHook` from ``cfg.D2NORM.EVALNORM_FIT`` and ``D2NORM.EVALNORM.OFFLINE_{ITERS,LR}``."""
    check_once(cfg, NODE, check_evalnorm_fit_cfg)
    c = cfg.D2NORM.EVALNORM_FIT
    if data_loader is None:
        data_loader = build_d2norm_train_loader(cfg, per_rank_batch(cfg, c.BATCH_SIZE), build_train_loader)
    if c.ITER > cfg.SOLVER.MAX_ITER:
        logger.warning("D2NORM.EVALNORM_FIT.ITER=%d > SOLVER.MAX_ITER=%d: no fit in this run", c.ITER,
                       cfg.SOLVER.MAX_ITER)
    return EvalNormFitHook(data_loader, c.ITER, cfg.D2NORM.EVALNORM.OFFLINE_ITERS, cfg.D2NORM.EVALNORM.OFFLINE_LR,
                           c.SET_OFFLINE_MODE)
