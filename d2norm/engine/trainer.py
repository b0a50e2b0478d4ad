"""``Trainer(DefaultTrainer)``: builds d2norm models/optimizers/evaluators from cfg. No training math here."""
import copy
import functools
import logging
import os
from typing import List, Optional

import numpy as np

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from .. import compat
from ..config import add_d2norm_config, resolve_config_file
from ..options import check_cfg
from ..data import prepare_datasets
from ..layers import build_model
from ..layers.cfg_checks import check_norm_cfg
from ..layers.protocol import aux_loss_keys
from ..modeling.meta_arch.evalnorm_arch import check_aux_loss_collected, check_evalnorm_training_cfg
from ..solver import build_optimizer
from .checkpoint import D2NormCheckpointer
from .run_folder import check_fresh_start, keep_previous_config
from .log_output import FILE_ONLY, has_log_file, quiet_known_warnings, route_log_handlers, setup_training_loggers

__all__ = ["Trainer", "setup_cfg", "validate_launch", "preflight"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with d2norm's model builder (cfg-bound norm options), optimizer
    (``WEIGHT_DECAY_NORM`` for every d2norm layer) and a COCO evaluator that runs without detectron2's ``_C``.

    d2norm hooks are added by :meth:`build_d2norm_hooks`; the checkpointer is a
    :class:`~d2norm.engine.checkpoint.D2NormCheckpointer` (loads checkpoints written after the FrozenBN switch).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        check_aux_loss_collected(self.model)  # online EvalNorm whose aux loss nobody adds: fail, not train
        self._trainer._write_metrics = functools.partial(_write_metrics, self._trainer._write_metrics,
                                                         aux_loss_keys(self.model))

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info("Model:\n%s", model, extra=FILE_ONLY)
        if has_log_file("d2norm"):
            n = sum(p.numel() for p in model.parameters())
            logger.info("Model: %s, %d parameters (full print in %s)", type(model).__name__, n,
                        os.path.join(cfg.OUTPUT_DIR, "log.txt"))
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

    def build_writers(self):
        """detectron2's writers; without the ``tensorboard`` package (e.g. a bare GPU machine) its
        ``TensorboardXWriter`` cannot be built: the console printer and ``metrics.json`` only, said once."""
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            from detectron2.utils.events import CommonMetricPrinter, JSONWriter

            logger.warning("tensorboard is not installed: no TensorBoard event file (metrics.json and the console "
                           "still get every scalar)")
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        return super().build_writers()

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from .errors import empty_dataset_is_a_tool_error  # --eval-only on an empty set: one error line, exit 2

        with empty_dataset_is_a_tool_error(dataset_name):
            return super().build_test_loader(cfg, dataset_name)

    def resume_or_load(self, resume=True):
        """detectron2's, where ``--resume`` into a folder whose checkpoint was written by another model (its
        optimizer's parameter groups do not match) is a :class:`~d2norm.engine.cli.ToolError` naming the folder
        instead of torch's "loaded state dict contains a parameter group that doesn't match"."""
        from .errors import ToolError

        try:
            return super().resume_or_load(resume=resume)
        except ValueError as e:
            if not (resume and "parameter group" in str(e)):
                raise
            raise ToolError(
                f"--resume: the checkpoint in {self.cfg.OUTPUT_DIR!r} was written by a model with other parameters "
                f"(another architecture or norm?): {e}. Resume with the config that trained it, or train this "
                f"config in a new OUTPUT_DIR.") from None

    def load_state_dict(self, state_dict):
        """detectron2's resume, also from a checkpoint without optimizer state (one written by v0.6's
        ``DefaultTrainer``, which did not save it; compat ``trainer_state`` adds the state on v0.6): warns and
        keeps a fresh optimizer state instead of failing with ``KeyError: '_trainer'``."""
        if "_trainer" in state_dict:
            return super().load_state_dict(state_dict)
        TrainerBase.load_state_dict(self, state_dict)
        logger.warning("Checkpoint has no optimizer state (written by detectron2 v0.6's DefaultTrainer): "
                       "resuming with a fresh optimizer state.")

    def build_d2norm_hooks(self) -> List:
        """The d2norm hooks enabled in ``cfg.D2NORM``, in the order of :data:`d2norm.engine.hooks.HOOKS` (which
        says why), built from a cfg checked once (:func:`validate_launch` marks it; a Trainer made without it
        checks here)."""
        from .hooks import build_hooks, check_hooks_cfg

        check_hooks_cfg(self.cfg)
        return build_hooks(self.cfg, self)

    def build_hooks(self):
        # DefaultTrainer.__init__ builds a DetectionCheckpointer just before calling build_hooks, whose
        # PeriodicCheckpointer and our FrozenBN switch hook take self.checkpointer: replace it first.
        c = self.checkpointer
        if not isinstance(c, D2NormCheckpointer):
            self.checkpointer = D2NormCheckpointer(c.model, c.save_dir, save_to_disk=c.save_to_disk,
                                                   **c.checkpointables)
        ret = super().build_hooks()
        extra = self.build_d2norm_hooks()
        # Right after IterationTimer and LRScheduler (present on every rank), so they run before the
        # checkpointer, evaluation and writers.
        return ret[:2] + extra + ret[2:]


def _write_metrics(write, aux_keys, loss_dict, data_time, prefix=""):
    """detectron2's ``SimpleTrainer._write_metrics`` with the norm layers' auxiliary losses (``aux_keys``:
    :func:`~d2norm.layers.protocol.aux_loss_keys`, e.g. EvalNorm's eq-9 term, which trains only α̂, β̂) left out
    of ``total_loss`` (the detection loss a user compares across runs) and written as their own scalars
    (averaged over ranks; a non-finite one stops training as detectron2 does)."""
    aux = {k: v for k, v in loss_dict.items() if k in aux_keys}
    write({k: v for k, v in loss_dict.items() if k not in aux}, data_time, prefix)
    if not aux:
        return
    gathered = comm.gather({k: float(v.detach().cpu().item()) for k, v in aux.items()})
    if comm.is_main_process():
        storage = get_event_storage()
        values = {k: float(np.mean([g[k] for g in gathered])) for k in aux}
        if not all(np.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={storage.iter}!\nloss_dict = {values}")
        storage.put_scalars(**values)  # as detectron2: only total_loss carries the prefix


def validate_launch(cfg, args, world_size: Optional[int] = None) -> None:
    """Every check of a ``train_net.py`` launch, run before anything is written to ``OUTPUT_DIR`` (so a failed
    launch into a run's folder leaves its ``config.yaml`` and checkpoints as they were): the norm choices
    (:func:`~d2norm.layers.cfg_checks.check_norm_cfg`); for a training, the d2norm hooks' options and EvalNorm's
    aux-loss rule; the run folder (:func:`~d2norm.engine.run_folder.check_fresh_start`: no training from
    scratch over an earlier run's checkpoints without ``--overwrite``). ``world_size``: the launch's number of
    processes (default: the current process group's)."""
    from .hooks import check_hooks_cfg

    eval_only = bool(getattr(args, "eval_only", False))
    check_norm_cfg(cfg, world_size)
    check_cfg(cfg)  # every declared D2NORM option, used or not
    if not eval_only:
        check_hooks_cfg(cfg)
        check_evalnorm_training_cfg(cfg)
    check_fresh_start(cfg.OUTPUT_DIR, resume=bool(getattr(args, "resume", False)), eval_only=eval_only,
                      overwrite=bool(getattr(args, "overwrite", False)))


def preflight(cfg, args) -> None:
    """:func:`validate_launch` for ``launch_main``: before the processes start, with their number."""
    validate_launch(cfg, args, world_size=args.num_gpus * args.num_machines)


def setup_cfg(args):
    """cfg from ``--config-file`` and ``KEY VALUE`` overrides, validated (:func:`validate_launch`) before
    detectron2's ``default_setup`` writes anything, with datasets prepared."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    args = copy.copy(args)  # default_setup reads (and logs) the config file too: the resolved one
    args.config_file = resolve_config_file(args.config_file)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    validate_launch(cfg, args)  # before any file is written, data prepared or model built
    # environment table, config dump and model print to OUTPUT_DIR/log.txt only; no colour codes in the file
    quiet_known_warnings()
    setup_training_loggers(cfg.OUTPUT_DIR, comm.get_rank())
    with keep_previous_config(cfg.OUTPUT_DIR, comm.is_main_process()):
        default_setup(cfg, args)
    # detectron2's default_setup configures the "detectron2"/"fvcore" loggers only; d2norm logs its hooks,
    # conversions and compat decisions under "d2norm".
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2norm", abbrev_name="d2norm")
    route_log_handlers()
    if comm.is_main_process() and has_log_file():
        logger.info("Environment info, config files and model print: %s", os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    prepare_datasets(cfg)
    return cfg
