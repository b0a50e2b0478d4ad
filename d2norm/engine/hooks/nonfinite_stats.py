"""Reports the moving-statistics updates that d2norm layers skipped because a batch's statistics were non-finite
(the rule lives on the layers: :func:`d2norm.layers.base.skip_nonfinite_stats`). Always on in d2norm's Trainer."""
import logging
from typing import Dict

from detectron2.engine.train_loop import HookBase

from ...layers.base import D2NormModule, nonfinite_skip_counts

__all__ = ["NonFiniteStatsHook"]

logger = logging.getLogger(__name__)


class NonFiniteStatsHook(HookBase):
    """After every iteration: ``nonfinite_stats/skipped`` (updates skipped so far, all layers) in the event
    storage when it changed, and a warning naming each layer that skipped one in this iteration.

    A layer on the CPU warns by itself as it skips; on an accelerator it only counts (the decision stays on
    the device, no synchronization inside the forward), and this hook reads all counters with one
    synchronization per iteration and warns for them. Before training, every d2norm layer learns its module
    name, so the layers' own warnings name it.
    """

    def __init__(self, model):
        self._model = getattr(model, "module", model)  # DDP / DP
        self._seen: Dict[str, int] = {}

    def before_train(self):
        for name, m in self._model.named_modules():
            if isinstance(m, D2NormModule):
                m._d2norm_name = name

    def after_step(self):
        counts = nonfinite_skip_counts(self._model)
        if counts == self._seen:
            return
        modules = dict(self._model.named_modules())
        for name, n in counts.items():
            new = n - self._seen.get(name, 0)
            layer = modules.get(name)
            counter = getattr(layer, "nonfinite_skips", None)
            if new > 0 and counter is not None and counter.device.type != "cpu":
                logger.warning("%s %r: %d update(s) of its moving statistics skipped at iteration %d: non-finite "
                               "batch statistics (NaN/Inf in its training input); %d skipped so far",
                               type(layer).__name__, name, new, self.trainer.iter, n)
        self._seen = counts
        self.trainer.storage.put_scalar("nonfinite_stats/skipped", sum(counts.values()), smoothing_hint=False)
