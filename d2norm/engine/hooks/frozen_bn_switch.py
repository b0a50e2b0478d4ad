"""BN → FrozenBN during training (rethinking §4.3, Fig. 6), cfg ``D2NORM.FROZEN_BN_SWITCH``: the layer conversion
is :func:`d2norm.layers.frozen.freeze_bn_layers`; what is here keeps the running trainer consistent with it
(statistics on every rank, optimizer param groups, LR scheduler, DDP wrapper, checkpoints).

torch and detectron2 offer no public API to change the parameter set of a live optimizer / DDP wrapper, so this
module reads and writes some of their private attributes. All of them are used through the accessors in the
block "Private attributes" below and nowhere else; a torch or detectron2 upgrade that renames one breaks only
those functions. Loading a checkpoint written after the switch is
:class:`d2norm.engine.checkpoint.D2NormCheckpointer`'s.
"""
import logging
import time
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from torch import nn

from ...options import check_once, Bool, Int, Number, Option, check_node, declare_node
from .common import Patterns
from .precise_bn import PreciseBNSpec, check_precise_bn_cfg

__all__ = [
    "FrozenBNSwitchHook", "check_frozen_bn_switch_cfg", "build_frozen_bn_switch_hook", "switch_to_frozen_bn",
    "rebuild_optimizer_param_groups",
]

logger = logging.getLogger(__name__)


# ---- Private attributes of torch / detectron2 objects (every use in this module goes through these) -------
def _trainer_hooks(trainer) -> list:
    """detectron2 ``TrainerBase._hooks``: the registered hooks (no public getter)."""
    return getattr(trainer, "_hooks", [])


def _refresh_lr_scheduler_hooks(trainer) -> None:
    """detectron2 ``hooks.LRScheduler._optimizer`` / ``._best_param_group_id``: the group whose LR the hook logs
    is chosen once at ``before_train``; choose it again for the new param groups."""
    from detectron2.engine import hooks as d2hooks

    for h in _trainer_hooks(trainer):
        if isinstance(h, d2hooks.LRScheduler) and getattr(h, "_optimizer", None) is not None:
            h._best_param_group_id = d2hooks.LRScheduler.get_best_param_group_id(h._optimizer)


def _set_scheduler_last_lr(scheduler, lrs: List[float]) -> None:
    """torch ``LRScheduler._last_lr`` (what ``get_last_lr()`` returns) for a changed set of param groups."""
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = lrs


def _ddp_bucket_cap_mb(ddp) -> Optional[float]:
    """torch ``DistributedDataParallel._bucket_config.bucket_cap_mb`` (the constructor argument is not kept)."""
    return getattr(getattr(ddp, "_bucket_config", None), "bucket_cap_mb", None)


def _ddp_remove_autograd_hooks(ddp) -> None:
    """torch ``DistributedDataParallel._remove_autograd_hooks()``: detach the old reducer from the parameters."""
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()


def _ddp_comm_hooks(ddp) -> list:
    """torch ``DistributedDataParallel._comm_hooks``: ``(hook, state)`` pairs given to ``register_comm_hook``."""
    return getattr(ddp, "_comm_hooks", [])


# ---- the switch ----------------------------------------------------------------------------------------------
NODE = "FROZEN_BN_SWITCH"
#: the model conversion this hook records in its checkpoint state (replayed by the checkpointer on load)
CONVERSION = "frozen_bn"
OPTIONS = declare_node(NODE, (
    Option("ENABLED", False, "At iteration ITER every BN-family layer becomes a constant affine map "
           "(d2norm/layers/frozen.py: BN, GhostBN, AnySyncBN, EvalNorm/BatchStatsBN/ExampleWeightedBN with their "
           "EMA, MABN exactly; BGN and per-domain DomainBN unchanged). Fig. 6: the last 20 of 100 epochs.",
           check=Bool()),
    Option("ITER", 0, "The first iteration trained with FrozenBN (>= SOLVER.MAX_ITER: no switch in this run, "
           "warned).", check=Int(0, note=" (the first iteration trained with FrozenBN)")),
    Option("PRECISE_BN", True, "Recompute population statistics right before the switch (PreciseBN, §3.2) with "
           "D2NORM.PRECISE_BN's NUM_SAMPLES / BATCH_SIZE / ESTIMATOR / EXACT_LAYERWISE; False freezes the EMA.",
           check=Bool()),
    Option("TRAINABLE_AFFINE", True, "§4.3 keeps gamma/beta trainable after the switch (True); False freezes them "
           "too (detectron2's FrozenBatchNorm2d, the fine-tuning variant of §4.4 / footnote 4).", check=Bool()),
    Option("WARMUP_ITERS", 0, "LR re-warm-up after the switch (Fig. 6: 'a linear warmup of one epoch'): iterations, "
           "factor from WARMUP_FACTOR to 1 on top of the schedule; 0 = none.",
           check=Int(0, note=" (0 = no LR re-warm-up)")),
    Option("WARMUP_FACTOR", 0.001, "Start factor of the re-warm-up (detectron2's linear warm-up rule).",
           check=Number(0, 1, low_open=True)),
    Option("LAYERS", [], "Regular expressions (re.search) on module names; only matching layers are switched; "
           "[] = all.", check=Patterns),
), doc="FrozenBN switch: rethinking §4.3, Fig. 6 (FrozenBNSwitchHook)")


def check_frozen_bn_switch_cfg(cfg) -> None:
    """ValueError naming the bad ``D2NORM.FROZEN_BN_SWITCH`` value and what is allowed."""
    check_node(cfg, NODE)
    c = cfg.D2NORM.FROZEN_BN_SWITCH
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
        _set_scheduler_last_lr(scheduler, [g["lr"] for g in groups])


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
    cap = _ddp_bucket_cap_mb(old)
    if cap is not None:
        kwargs["bucket_cap_mb"] = cap
    if getattr(old, "static_graph", False):
        kwargs["static_graph"] = True
    _ddp_remove_autograd_hooks(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers kept for its init semantics
        new = DDP(old.module, **kwargs)
    for hook, state in _ddp_comm_hooks(old):
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

    Call on every rank at the same iteration, between iterations. Returns the :class:`~d2norm.layers.report.ConversionReport`.
    """
    from torch.nn.parallel import DistributedDataParallel

    from ...layers.frozen import freeze_bn_layers
    from ...stats.monitor import select_layers

    model = trainer.model
    ddp = model if isinstance(model, DistributedDataParallel) else None
    net = ddp.module if ddp is not None else model
    before = [p for p in net.parameters() if p.requires_grad]
    flt = None
    if layers:
        flt = lambda n: bool(select_layers([n], layers))  # noqa: E731
    report = freeze_bn_layers(net, trainable_affine=trainable_affine, names=names, name_filter=flt)
    _broadcast_frozen_state(net, list(report.converted))
    after = [p for p in net.parameters() if p.requires_grad]

    fresh = trainer.build_optimizer(trainer.cfg, net)  # a classmethod; trainer may be a weakref proxy
    rebuild_optimizer_param_groups(trainer.optimizer, fresh.param_groups, getattr(trainer, "scheduler", None))
    del fresh
    _refresh_lr_scheduler_hooks(trainer)

    if ddp is not None and {id(p) for p in before} != {id(p) for p in after}:
        new = _rebuild_ddp(ddp)
        trainer.model = new  # DefaultTrainer.model sets _trainer.model
        for h in _trainer_hooks(trainer):
            for k, v in list(vars(h).items()):
                if v is ddp:
                    setattr(h, k, new)
    logger.info(
        "FrozenBN switch: %d layers converted (%s affine), %d left unchanged; trainable parameter tensors "
        "%d -> %d (%d -> %d values)%s",
        len(report.converted), "trainable" if trainable_affine else "frozen", len(report.skipped), len(before), len(after),
        sum(p.numel() for p in before), sum(p.numel() for p in after),
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
        self.switched, self.switched_at, self.converted = True, t.iter, sorted(self.report.converted)
        elapsed = time.perf_counter() - start
        if comm.is_main_process():
            logger.info("FrozenBN switch at iteration %d: %d layers in %.2f s", t.iter, len(self.converted), elapsed)
        t.storage.put_scalar("frozen_bn_switch/num_layers", len(self.converted), smoothing_hint=False)

    # ---- checkpoints ----
    def state_dict(self):
        # "conversion" records what the switch did to the model, so a checkpointer replays it through the layers
        # (d2norm.layers.frozen.freeze_bn_layers) without knowing this hook (D2NormCheckpointer.conversion_state)
        return {"conversion": CONVERSION, "switched": self.switched, "switched_at": self.switched_at,
                "layers": list(self.converted), "trainable_affine": self.trainable_affine}

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
        self.switched, self.switched_at, self.converted = True, state.get("switched_at"), sorted(self.report.converted)
        logger.info("FrozenBN switch: model converted (%d layers) to load a checkpoint written after the switch",
                    len(self.converted))

    def attach_checkpointer(self, trainer, checkpointer) -> None:
        """Make ``checkpointer`` (a :class:`~d2norm.engine.checkpoint.D2NormCheckpointer`, as d2norm's Trainer
        builds) convert ``trainer`` before loading a checkpoint that this hook's state marks as written after the
        switch (resume, or ``MODEL.WEIGHTS`` of such a checkpoint)."""
        if not callable(getattr(checkpointer, "attach_frozen_bn_switch", None)):
            raise TypeError(
                f"FrozenBNSwitchHook.attach_checkpointer needs a d2norm.engine.checkpoint.D2NormCheckpointer (it "
                f"converts the model before a post-switch checkpoint loads), got {type(checkpointer).__name__}; "
                f"d2norm.engine.Trainer builds one"
            )
        checkpointer.attach_frozen_bn_switch(trainer, self)


def build_frozen_bn_switch_hook(cfg, trainer) -> FrozenBNSwitchHook:
    """:class:`FrozenBNSwitchHook` from ``cfg.D2NORM.FROZEN_BN_SWITCH`` (validated); PreciseBN before the switch
    uses ``D2NORM.PRECISE_BN``'s NUM_SAMPLES / BATCH_SIZE / ESTIMATOR / EXACT_LAYERWISE, with a loader built at
    switch time. Attaches the hook to ``trainer.checkpointer``."""
    check_once(cfg, NODE, check_frozen_bn_switch_cfg)
    c = cfg.D2NORM.FROZEN_BN_SWITCH
    precise: Optional[Callable] = None
    if c.PRECISE_BN:
        spec = PreciseBNSpec.from_cfg(cfg)

        def _precise():
            return spec.run(trainer.model, iter(spec.loader(cfg, trainer.build_train_loader)))

        precise = _precise
    if c.ITER >= cfg.SOLVER.MAX_ITER:
        # not an error: a short run of a long config (e.g. SOLVER.MAX_ITER overridden for a smoke test)
        logger.warning("D2NORM.FROZEN_BN_SWITCH.ITER=%d >= SOLVER.MAX_ITER=%d: the switch will not happen in this "
                       "run", c.ITER, cfg.SOLVER.MAX_ITER)
    hook = FrozenBNSwitchHook(c.ITER, c.TRAINABLE_AFFINE, precise, c.WARMUP_ITERS, c.WARMUP_FACTOR, c.LAYERS)
    if getattr(trainer, "checkpointer", None) is not None:
        hook.attach_checkpointer(trainer, trainer.checkpointer)
    return hook
