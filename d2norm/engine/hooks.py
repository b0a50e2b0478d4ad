"""Training hooks of d2norm (added from cfg by :meth:`d2norm.engine.trainer.Trainer.build_d2norm_hooks`).

* :class:`PreciseBNHook` — PreciseBN (rethinking §3.2, A.2, A.3, A.10), cfg ``D2NORM.PRECISE_BN``.
* :class:`FrozenBNSwitchHook` — BN → FrozenBN during training (rethinking §4.3, Fig. 6), ``D2NORM.FROZEN_BN_SWITCH``.
* :class:`EvalNormFitHook` — offline α̂, β̂ of EvalNorm (evalnorm §3.4), ``D2NORM.EVALNORM_FIT``.
* :class:`BNMonitorHook` — EMA vs batch / population statistics (rethinking Fig. 2; estimation-shift Def. 2),
  ``D2NORM.BN_MONITOR``.
"""
import logging
import time
from typing import Iterable, Optional

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ..stats import ESTIMATORS, population_stat_layers, recompute_population_stats

__all__ = ["PreciseBNHook", "check_precise_bn_cfg", "build_precise_bn_hook", "build_precise_bn_loader"]

logger = logging.getLogger(__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_precise_bn_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.PRECISE_BN`` value and what is allowed."""
    c = cfg.D2NORM.PRECISE_BN
    for key in ("ENABLED", "EXACT_LAYERWISE"):
        if not isinstance(c[key], bool):
            raise ValueError(f"D2NORM.PRECISE_BN.{key} must be True or False, got {c[key]!r}")
    if not _is_int(c.PERIOD) or c.PERIOD < -1:
        raise ValueError(
            f"D2NORM.PRECISE_BN.PERIOD must be an integer >= -1 (-1 = TEST.EVAL_PERIOD, 0 = only after the last "
            f"iteration), got {c.PERIOD!r}"
        )
    for key in ("NUM_SAMPLES", "BATCH_SIZE"):
        if not _is_int(c[key]) or c[key] < 1:
            raise ValueError(f"D2NORM.PRECISE_BN.{key} must be a positive integer, got {c[key]!r}")
    if c.ESTIMATOR not in ESTIMATORS:
        raise ValueError(f"D2NORM.PRECISE_BN.ESTIMATOR must be one of {ESTIMATORS}, got {c.ESTIMATOR!r}")
    if c.ENABLED and cfg.TEST.PRECISE_BN.ENABLED:
        raise ValueError(
            "TEST.PRECISE_BN.ENABLED (detectron2's PreciseBN) and D2NORM.PRECISE_BN.ENABLED are both True: "
            "enable only D2NORM.PRECISE_BN"
        )


def build_precise_bn_loader(cfg, build_train_loader=None):
    """A training-style loader (``cfg.DATASETS.TRAIN``, training mapper, so batches carry ``instances`` for a
    detectron2 model in training mode) yielding ``BATCH_SIZE`` images per rank. Built on every rank (the
    training sampler draws a shared seed); no worker processes (as detectron2's PreciseBN) so the idle
    iterator kept between runs holds no processes or prefetched batches."""
    from detectron2.data import build_detection_train_loader

    c = cfg.clone()
    c.defrost()
    c.SOLVER.IMS_PER_BATCH = cfg.D2NORM.PRECISE_BN.BATCH_SIZE * comm.get_world_size()
    c.DATALOADER.NUM_WORKERS = 0
    return (build_train_loader or build_detection_train_loader)(c)


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
        exact_layerwise=c.EXACT_LAYERWISE,
    )


# =============================================================================================================
# FrozenBN switch (rethinking §4.3, Fig. 6), EvalNorm offline fitting (evalnorm §3.4), BN-statistics monitor
# (rethinking Fig. 2; estimation-shift Def. 2). The statistics math lives in d2norm.stats / d2norm.layers.frozen;
# what follows is trainer plumbing (when to run, optimizer / DDP bookkeeping, event storage).
# =============================================================================================================
import contextlib  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Dict, List, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ += [
    "FrozenBNSwitchHook", "check_frozen_bn_switch_cfg", "build_frozen_bn_switch_hook", "switch_to_frozen_bn",
    "rebuild_optimizer_param_groups", "EvalNormFitHook", "check_evalnorm_fit_cfg", "build_evalnorm_fit_hook",
    "BNMonitorHook", "check_bn_monitor_cfg", "build_bn_monitor_hook", "build_d2norm_train_loader",
]


def _check_bool(path: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{path} must be True or False, got {v!r}")


def _check_int(path: str, v, lo: int, what: str = "") -> None:
    if not _is_int(v) or v < lo:
        raise ValueError(f"{path} must be an integer >= {lo}{what}, got {v!r}")


def _check_patterns(path: str, v) -> None:
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"{path} must be a list of regular expressions (strings), got {v!r}")
    for p in v:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{path}: {p!r} is not a valid regular expression ({e})") from None


def build_d2norm_train_loader(cfg, images_per_rank: int, build_train_loader=None):
    """A training-style loader (``cfg.DATASETS.TRAIN``, training mapper: batches carry ``instances``) of
    ``images_per_rank`` images per rank, without worker processes (an idle iterator kept between runs then
    holds no processes), for hooks that forward the model besides the training step."""
    from detectron2.data import build_detection_train_loader

    c = cfg.clone()
    c.defrost()
    c.SOLVER.IMS_PER_BATCH = images_per_rank * comm.get_world_size()
    c.DATALOADER.NUM_WORKERS = 0
    return (build_train_loader or build_detection_train_loader)(c)


def _per_rank_batch(cfg, value: int) -> int:
    """``value`` if > 0, else the training batch per rank (SOLVER.IMS_PER_BATCH / world size, at least 1)."""
    return value if value > 0 else max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())


@contextlib.contextmanager
def _isolated_rng():
    from ..stats.precise_bn import _isolated_rng as iso

    with iso():
        yield


# ---- FrozenBN switch -----------------------------------------------------------------------------------
def check_frozen_bn_switch_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.FROZEN_BN_SWITCH`` value and what is allowed."""
    c = cfg.D2NORM.FROZEN_BN_SWITCH
    p = "D2NORM.FROZEN_BN_SWITCH."
    for key in ("ENABLED", "PRECISE_BN", "TRAINABLE_AFFINE"):
        _check_bool(p + key, c[key])
    _check_int(p + "ITER", c.ITER, 0, " (the first iteration trained with FrozenBN)")
    _check_int(p + "WARMUP_ITERS", c.WARMUP_ITERS, 0, " (0 = no LR re-warm-up)")
    f = c.WARMUP_FACTOR
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        raise ValueError(f"{p}WARMUP_FACTOR must be a number in (0, 1], got {f!r}")
    _check_patterns(p + "LAYERS", c.LAYERS)
    if c.ENABLED and c.PRECISE_BN:
        check_precise_bn_cfg(cfg)


@torch.no_grad()
def _broadcast_frozen_state(net: nn.Module, names: Sequence[str]) -> None:
    """Every rank takes rank 0's frozen statistics (per-rank EMAs differ when buffers are not broadcast, as in
    detectron2's DDP setup); one collective."""
    import torch.distributed as dist

    if comm.get_world_size() == 1:
        return
    bufs = [b for n in sorted(names) for b in net.get_submodule(n).buffers()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs])
    dist.broadcast(flat, src=0)
    off = 0
    for b in bufs:
        b.copy_(flat[off: off + b.numel()].view_as(b).to(b.dtype))
        off += b.numel()


def rebuild_optimizer_param_groups(optimizer: torch.optim.Optimizer, fresh_groups: List[dict], scheduler=None):
    """Give ``optimizer`` (in place: every holder of the object stays valid) the param groups ``fresh_groups``
    of an optimizer freshly built for the converted model, so its parameters are exactly the model's trainable
    parameters, grouped as a resumed run builds them.

    State (momentum buffers) of parameters that remain is kept (the same Parameter objects); state of removed
    ones is dropped. Each group's ``initial_lr`` is its base LR and its ``lr`` the base LR times the multiplier
    the LR schedule currently applies (read from the old groups); a torch/detectron2 LR scheduler's
    ``base_lrs`` follow the new groups.
    """
    mult = None
    for g in optimizer.param_groups:
        if g.get("initial_lr"):
            mult = g["lr"] / g["initial_lr"]
            break
    groups = []
    for g in fresh_groups:
        g = dict(g)
        g["params"] = list(g["params"])
        base = g["lr"]
        g["initial_lr"] = base
        g["lr"] = base * mult if mult is not None else base
        groups.append(g)
    keep = {id(p) for g in groups for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in keep]:
        del optimizer.state[p]
    optimizer.param_groups[:] = groups
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in groups]


def _rebuild_ddp(old):
    """A new ``DistributedDataParallel`` over ``old.module`` with ``old``'s options and comm hooks (its reducer
    knows the new parameter set); ``old``'s autograd hooks are removed so its reducer never fires again.
    Collective (parameter/buffer broadcast from rank 0): every rank must call it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = dict(
        device_ids=old.device_ids, output_device=old.output_device, dim=old.dim,
        process_group=old.process_group, find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view,
        broadcast_buffers=getattr(old, "forward_sync_buffers", getattr(old, "broadcast_buffers", True)),
    )
    cap = getattr(getattr(old, "_bucket_config", None), "bucket_cap_mb", None)
    if cap is not None:
        kwargs["bucket_cap_mb"] = cap
    if getattr(old, "static_graph", False):
        kwargs["static_graph"] = True
    if hasattr(old, "_remove_autograd_hooks"):
        old._remove_autograd_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers kept for its init semantics
        new = DDP(old.module, **kwargs)
    for hook, state in getattr(old, "_comm_hooks", []):
        new.register_comm_hook(state, hook)
    return new


def switch_to_frozen_bn(trainer, trainable_affine: bool = True, names=None, layers: Sequence[str] = ()):
    """Convert ``trainer.model``'s BN-family layers to FrozenBN (:func:`d2norm.layers.frozen.freeze_bn_layers`)
    and keep training consistent:

    * statistics: rank 0's on every rank (one broadcast);
    * optimizer: param groups rebuilt in place from ``trainer.build_optimizer(cfg, model)`` on the converted
      model (:func:`rebuild_optimizer_param_groups`), scheduler ``base_lrs`` and detectron2's ``LRScheduler``
      hook's summary group updated. With trainable γ/β the parameter objects are the same as before, so their
      momentum carries over;
    * DDP: when the set of trainable parameters changed (frozen γ/β, EvalNorm's α̂/β̂ dropped), the wrapper is
      rebuilt over the same module (its reducer registered hooks on the old set and would wait forever for
      gradients of removed parameters); every reference to the old wrapper in the trainer and its hooks is
      replaced. With an unchanged set the wrapper is kept.

    Call on every rank at the same iteration, between iterations. Returns the :class:`FreezeReport`.
    """
    from detectron2.engine import hooks as d2hooks
    from torch.nn.parallel import DistributedDataParallel

    from ..layers.frozen import freeze_bn_layers
    from ..stats.monitor import select_layers

    model = trainer.model
    ddp = model if isinstance(model, DistributedDataParallel) else None
    net = ddp.module if ddp is not None else model
    before = [p for p in net.parameters() if p.requires_grad]
    flt = None
    if layers:
        flt = lambda n: bool(select_layers([n], layers))  # noqa: E731
    report = freeze_bn_layers(net, trainable_affine=trainable_affine, names=names, name_filter=flt)
    _broadcast_frozen_state(net, list(report))
    after = [p for p in net.parameters() if p.requires_grad]

    fresh = trainer.build_optimizer(trainer.cfg, net)  # a classmethod; trainer may be a weakref proxy
    rebuild_optimizer_param_groups(trainer.optimizer, fresh.param_groups, getattr(trainer, "scheduler", None))
    del fresh
    for h in getattr(trainer, "_hooks", []):
        if isinstance(h, d2hooks.LRScheduler) and getattr(h, "_optimizer", None) is not None:
            h._best_param_group_id = d2hooks.LRScheduler.get_best_param_group_id(h._optimizer)

    if ddp is not None and {id(p) for p in before} != {id(p) for p in after}:
        new = _rebuild_ddp(ddp)
        trainer.model = new  # DefaultTrainer.model sets _trainer.model
        for h in getattr(trainer, "_hooks", []):
            for k, v in list(vars(h).items()):
                if v is ddp:
                    setattr(h, k, new)
    logger.info(
        "FrozenBN switch: %d layers converted (%s affine), %d left unchanged; %d -> %d trainable parameters%s",
        len(report), "trainable" if trainable_affine else "frozen", len(report.skipped), len(before), len(after),
        "; DDP rebuilt" if trainer.model is not model else "",
    )
    return report


class FrozenBNSwitchHook(HookBase):
    """Switch BN to FrozenBN at iteration ``switch_iter`` (rethinking §4.3, Fig. 6: the last 20% of training
    with FrozenBN after an optional PreciseBN, with a linear warm-up of the LR).

    * ``before_step`` of iteration ``switch_iter`` (or the first iteration after it, e.g. on a resume from a
      checkpoint written before the switch): ``precise_bn()`` if given, then :func:`switch_to_frozen_bn`.
    * LR re-warm-up: during ``warmup_iters`` iterations from the switch, every group's LR (as set by the LR
      schedule) is multiplied by ``f + (1 − f)·(it − switch)/warmup_iters`` (``f = warmup_factor``), detectron2's
      linear warm-up rule; stateless, so resuming inside the window continues it.
    * Checkpoints: :meth:`state_dict` records the converted layer names; :meth:`attach_checkpointer` makes the
      trainer's checkpointer convert the model (same layers, same affine choice, no PreciseBN) *before* it loads
      a checkpoint written after the switch, so model, optimizer and scheduler state load into the matching
      structure. A checkpoint written before the switch loads as is, and the switch happens when training reaches
      ``switch_iter``.
    """

    def __init__(self, switch_iter: int, trainable_affine: bool = True, precise_bn: Optional[Callable] = None,
                 warmup_iters: int = 0, warmup_factor: float = 0.001, layers: Sequence[str] = ()):
        self.switch_iter = int(switch_iter)
        self.trainable_affine = bool(trainable_affine)
        self.precise_bn = precise_bn
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.layers = list(layers)
        self.switched = False
        self.switched_at: Optional[int] = None
        self.converted: List[str] = []
        self.report = None

    # ---- training ----
    def before_step(self):
        it = self.trainer.iter
        if not self.switched and it >= self.switch_iter:
            self.switch()
        s = self.switched_at
        if self.warmup_iters > 0 and s is not None and s <= it < s + self.warmup_iters:
            f = self.lr_factor(it)
            for g in self.trainer.optimizer.param_groups:
                g["lr"] = g["lr"] * f

    def lr_factor(self, it: int) -> float:
        if self.switched_at is None or self.warmup_iters <= 0 or it >= self.switched_at + self.warmup_iters:
            return 1.0
        a = (it - self.switched_at) / self.warmup_iters
        return self.warmup_factor * (1.0 - a) + a

    def switch(self):
        t = self.trainer
        start = time.perf_counter()
        if self.precise_bn is not None:
            self.precise_bn()
        self.report = switch_to_frozen_bn(t, self.trainable_affine, layers=self.layers)
        self.switched, self.switched_at, self.converted = True, t.iter, sorted(self.report)
        elapsed = time.perf_counter() - start
        if comm.is_main_process():
            logger.info("FrozenBN switch at iteration %d: %d layers in %.2f s", t.iter, len(self.converted), elapsed)
        t.storage.put_scalar("frozen_bn_switch/num_layers", len(self.converted), smoothing_hint=False)

    # ---- checkpoints ----
    def state_dict(self):
        return {"switched": self.switched, "switched_at": self.switched_at, "layers": list(self.converted),
                "trainable_affine": self.trainable_affine}

    def load_state_dict(self, state):
        if state.get("switched") and not self.switched:
            raise RuntimeError(
                "FrozenBNSwitchHook: the checkpoint was written after the FrozenBN switch but the model was loaded "
                "unconverted; load it through the trainer's checkpointer (FrozenBNSwitchHook.attach_checkpointer)"
            )
        if not state.get("switched") and self.switched:
            raise RuntimeError("FrozenBNSwitchHook: a checkpoint from before the switch cannot be loaded after it")
        self.switched_at = state.get("switched_at")

    def convert_for_checkpoint(self, trainer, state: dict) -> None:
        """Convert exactly the layers a checkpoint recorded (no PreciseBN: its statistics are in the checkpoint)."""
        self.trainable_affine = bool(state.get("trainable_affine", self.trainable_affine))
        self.report = switch_to_frozen_bn(trainer, self.trainable_affine, names=state.get("layers") or [])
        self.switched, self.switched_at, self.converted = True, state.get("switched_at"), sorted(self.report)
        logger.info("FrozenBN switch: model converted (%d layers) to load a checkpoint written after the switch",
                    len(self.converted))

    def attach_checkpointer(self, trainer, checkpointer) -> None:
        """Make ``checkpointer`` convert the model before loading a checkpoint that this hook's state marks as
        written after the switch (resume, or ``MODEL.WEIGHTS`` of such a checkpoint)."""
        original = checkpointer._load_model
        hook = self
        key = type(self).__qualname__

        def _load_model(checkpoint):
            state = None
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("trainer"), dict):
                state = checkpoint["trainer"].get("hooks", {}).get(key)
            if state and state.get("switched") and not hook.switched:
                hook.convert_for_checkpoint(trainer, state)
            return original(checkpoint)

        checkpointer._load_model = _load_model


def build_frozen_bn_switch_hook(cfg, trainer) -> FrozenBNSwitchHook:
    """:class:`FrozenBNSwitchHook` from ``cfg.D2NORM.FROZEN_BN_SWITCH`` (validated); PreciseBN before the switch
    uses ``D2NORM.PRECISE_BN``'s NUM_SAMPLES / BATCH_SIZE / ESTIMATOR / EXACT_LAYERWISE, with a loader built at
    switch time. Attaches the hook to ``trainer.checkpointer``."""
    check_frozen_bn_switch_cfg(cfg)
    c = cfg.D2NORM.FROZEN_BN_SWITCH
    precise: Optional[Callable] = None
    if c.PRECISE_BN:
        p = cfg.D2NORM.PRECISE_BN

        def _precise():
            loader = build_precise_bn_loader(cfg, trainer.build_train_loader)
            return recompute_population_stats(
                trainer.model, iter(loader), p.NUM_SAMPLES, batch_size=p.BATCH_SIZE, estimator=p.ESTIMATOR,
                exact_layerwise=p.EXACT_LAYERWISE,
            )

        precise = _precise
    if c.ITER >= cfg.SOLVER.MAX_ITER:
        # not an error: a short run of a long config (e.g. SOLVER.MAX_ITER overridden for a smoke test)
        logger.warning("D2NORM.FROZEN_BN_SWITCH.ITER=%d >= SOLVER.MAX_ITER=%d: the switch will not happen in this "
                       "run", c.ITER, cfg.SOLVER.MAX_ITER)
    hook = FrozenBNSwitchHook(c.ITER, c.TRAINABLE_AFFINE, precise, c.WARMUP_ITERS, c.WARMUP_FACTOR, c.LAYERS)
    if getattr(trainer, "checkpointer", None) is not None:
        hook.attach_checkpointer(trainer, trainer.checkpointer)
    return hook


# ---- EvalNorm offline fitting ----------------------------------------------------------------------------
def check_evalnorm_fit_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.EVALNORM_FIT`` value and what is allowed."""
    c = cfg.D2NORM.EVALNORM_FIT
    p = "D2NORM.EVALNORM_FIT."
    _check_bool(p + "ENABLED", c.ENABLED)
    _check_bool(p + "SET_OFFLINE_MODE", c.SET_OFFLINE_MODE)
    if not _is_int(c.ITER) or c.ITER == 0 or c.ITER < -1:
        raise ValueError(f"{p}ITER must be -1 (after the last iteration) or an integer >= 1, got {c.ITER!r}")
    _check_int(p + "BATCH_SIZE", c.BATCH_SIZE, 0, " (0 = the training batch per rank)")
    e = cfg.D2NORM.EVALNORM
    _check_int("D2NORM.EVALNORM.OFFLINE_ITERS", e.OFFLINE_ITERS, 1)
    lr = e.OFFLINE_LR
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"D2NORM.EVALNORM.OFFLINE_LR must be a number > 0, got {lr!r}")


class EvalNormFitHook(HookBase):
    """Offline α̂, β̂ (evalnorm §3.4 "Offline estimation") with
    :func:`d2norm.layers.evalnorm_fit.fit_evalnorm_offline` after iteration ``fit_iter`` (``-1``: after the
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
        from ..layers.evalnorm import evalnorm_modules
        from ..layers.evalnorm_fit import fit_evalnorm_offline
        from ..stats.precise_bn import _unwrap

        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        net = _unwrap(self.trainer.model)
        layers = evalnorm_modules(net)
        if not layers:
            logger.warning("EvalNorm fit: the model has no EvalNorm layer; nothing to fit")
            return {}
        start = time.perf_counter()
        with _isolated_rng():
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
    check_evalnorm_fit_cfg(cfg)
    c = cfg.D2NORM.EVALNORM_FIT
    if data_loader is None:
        data_loader = build_d2norm_train_loader(cfg, _per_rank_batch(cfg, c.BATCH_SIZE), build_train_loader)
    if c.ITER > cfg.SOLVER.MAX_ITER:
        logger.warning("D2NORM.EVALNORM_FIT.ITER=%d > SOLVER.MAX_ITER=%d: no fit in this run", c.ITER,
                       cfg.SOLVER.MAX_ITER)
    return EvalNormFitHook(data_loader, c.ITER, cfg.D2NORM.EVALNORM.OFFLINE_ITERS, cfg.D2NORM.EVALNORM.OFFLINE_LR,
                           c.SET_OFFLINE_MODE)


# ---- BN-statistics monitor -------------------------------------------------------------------------------
def check_bn_monitor_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.BN_MONITOR`` value and what is allowed."""
    c = cfg.D2NORM.BN_MONITOR
    p = "D2NORM.BN_MONITOR."
    _check_bool(p + "ENABLED", c.ENABLED)
    _check_int(p + "PERIOD", c.PERIOD, 1)
    _check_int(p + "NUM_BATCHES", c.NUM_BATCHES, 1)
    _check_int(p + "BATCH_SIZE", c.BATCH_SIZE, 0, " (0 = the training batch per rank)")
    _check_patterns(p + "LAYERS", c.LAYERS)


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
        from ..stats.monitor import bn_statistics_gaps

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


def build_bn_monitor_hook(cfg, data_loader=None, build_train_loader=None) -> BNMonitorHook:
    """:class:`BNMonitorHook` from ``cfg.D2NORM.BN_MONITOR`` (validated)."""
    check_bn_monitor_cfg(cfg)
    c = cfg.D2NORM.BN_MONITOR
    if data_loader is None:
        data_loader = build_d2norm_train_loader(cfg, _per_rank_batch(cfg, c.BATCH_SIZE), build_train_loader)
    return BNMonitorHook(data_loader, c.PERIOD, c.NUM_BATCHES, c.LAYERS)
