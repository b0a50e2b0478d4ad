"""BN → FrozenBN during training (rethinking §4.3, Fig. 6), cfg ``D2NORM.FROZEN_BN_SWITCH``: when to switch and
what to record. The layer conversion is :func:`d2norm.layers.frozen.freeze_bn_layers`; keeping the running
trainer consistent with it (statistics on every rank, optimizer, LR scheduler, DDP) is
:mod:`d2norm.engine.trainer_surgery`'s; loading a checkpoint written after the switch is
:class:`d2norm.engine.checkpoint.D2NormCheckpointer`'s (it replays the conversion this hook records).
"""
import logging
import time
from typing import Callable, List, Optional, Sequence

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ...options import Bool, Int, Number, Option, check_node, check_once, declare_node
from ..trainer_surgery import rebuild_optimizer_param_groups, switch_to_frozen_bn
from .common import Patterns
from .precise_bn import PreciseBNSpec, check_precise_bn_cfg

__all__ = [
    "FrozenBNSwitchHook", "check_frozen_bn_switch_cfg", "build_frozen_bn_switch_hook", "switch_to_frozen_bn",
    "rebuild_optimizer_param_groups",
]

logger = logging.getLogger(__name__)


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
