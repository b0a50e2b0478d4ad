"""``Trainer(DefaultTrainer)``: builds d2norm models/optimizers/evaluators from cfg. No training math here."""
import logging
import os
from typing import List

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import compat
from ..config import add_d2norm_config
from ..data import prepare_datasets
from ..layers import build_model
from ..solver import build_optimizer

__all__ = ["Trainer", "setup_cfg"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with d2norm's model builder (cfg-bound norm options), optimizer
    (``WEIGHT_DECAY_NORM`` for every d2norm layer) and a COCO evaluator that runs without detectron2's ``_C``.

    d2norm hooks are added by :meth:`build_d2norm_hooks` (extended by the hooks issue).
    """

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # Without the compiled _C, pycocotools' COCOeval is used (compat.fast_coco_eval).
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=compat.HAS_COMPILED_OPS
        )

    # detectron2 v0.6's DefaultTrainer does not checkpoint its SimpleTrainer (optimizer state: SGD momentum,
    # AMP grad scaler), so --resume silently restarted momentum; later detectron2 versions added exactly this.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("Checkpoint has no optimizer state (written by detectron2's DefaultTrainer): "
                           "resuming with a fresh optimizer state.")

    def build_d2norm_hooks(self) -> List:
        """d2norm hooks enabled in ``cfg.D2NORM`` (run after IterationTimer/LRScheduler, before checkpointing
        and evaluation, so checkpoints and evaluations see their effect), in this order:

        * ``D2NORM.BN_MONITOR``: :class:`~d2norm.engine.hooks.BNMonitorHook` (rethinking Fig. 2; estimation-shift
          Def. 2), first so it measures the training EMA before PreciseBN replaces it;
        * ``D2NORM.FROZEN_BN_SWITCH``: :class:`~d2norm.engine.hooks.FrozenBNSwitchHook` (rethinking §4.3); it is
          attached to :attr:`checkpointer` so a checkpoint written after the switch loads into a converted model;
        * ``D2NORM.PRECISE_BN``: :class:`~d2norm.engine.hooks.PreciseBNHook` (rethinking §3.2, A.3) with a
          training-style loader of ``BATCH_SIZE`` images per rank built by :meth:`build_train_loader`;
        * ``D2NORM.EVALNORM_FIT``: :class:`~d2norm.engine.hooks.EvalNormFitHook` (evalnorm §3.4), after PreciseBN
          so α̂, β̂ are fitted against the final population statistics.
        """
        from .hooks import (
            build_bn_monitor_hook,
            build_evalnorm_fit_hook,
            build_frozen_bn_switch_hook,
            build_precise_bn_hook,
            check_bn_monitor_cfg,
            check_evalnorm_fit_cfg,
            check_frozen_bn_switch_cfg,
            check_precise_bn_cfg,
        )

        cfg = self.cfg
        check_precise_bn_cfg(cfg)
        check_frozen_bn_switch_cfg(cfg)
        check_evalnorm_fit_cfg(cfg)
        check_bn_monitor_cfg(cfg)
        loader = self.build_train_loader
        ret = []
        if cfg.D2NORM.BN_MONITOR.ENABLED:
            ret.append(build_bn_monitor_hook(cfg, build_train_loader=loader))
        if cfg.D2NORM.FROZEN_BN_SWITCH.ENABLED:
            ret.append(build_frozen_bn_switch_hook(cfg, self))
        if cfg.D2NORM.PRECISE_BN.ENABLED:
            ret.append(build_precise_bn_hook(cfg, self.model, build_train_loader=loader))
        if cfg.D2NORM.EVALNORM_FIT.ENABLED:
            ret.append(build_evalnorm_fit_hook(cfg, build_train_loader=loader))
        return ret

    def build_hooks(self):
        ret = super().build_hooks()
        extra = self.build_d2norm_hooks()
        # Right after IterationTimer and LRScheduler (present on every rank), so they run before the
        # checkpointer, evaluation and writers.
        return ret[:2] + extra + ret[2:]


def setup_cfg(args):
    """cfg from ``--config-file`` and ``KEY VALUE`` overrides, with datasets prepared; detectron2's default_setup."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2's default_setup configures the "detectron2"/"fvcore" loggers only; d2norm logs its hooks,
    # conversions and compat decisions under "d2norm".
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2norm", abbrev_name="d2norm")
    prepare_datasets(cfg)
    return cfg
