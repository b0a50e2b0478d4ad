#!/usr/bin/env python
"""Train / evaluate a detectron2 LazyConfig (python config) with d2norm layers, heads, hooks and optimizer groups.

detectron2's ``tools/lazyconfig_train_net.py``, on d2norm's :class:`~d2norm.engine.lazy.LazyTrainer`: d2norm's
hooks (PreciseBN, FrozenBN switch, EvalNorm fit, BN monitor) are configured by ``train.d2norm`` (the keys of the
yacs ``cfg.D2NORM`` node), the optimizer gets d2norm's parameter groups, checkpoints hold the optimizer state.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/cpu/faster_rcnn_R18_FPN_ghostbn.py
    python tools/lazyconfig_train_net.py --config-file <py> --num-gpus 8 [train.amp.enabled=True]
    python tools/lazyconfig_train_net.py --config-file <py> --resume                  # continue from last checkpoint
    python tools/lazyconfig_train_net.py --config-file <py> --eval-only train.init_checkpoint=<pth>

Overrides are ``key=value`` (detectron2's LazyConfig.apply_overrides), e.g. ``train.max_iter=100``,
``train.d2norm.PRECISE_BN.ENABLED=True``.
"""
import logging
import os

import d2norm  # noqa: F401  (compat + registrations before detectron2 is used)
from detectron2.config import LazyConfig
from detectron2.engine import default_setup
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2norm.data import prepare_datasets
from d2norm.engine.cli import ToolError, launch_main, load_weights
from d2norm.engine.checkpoint import D2NormCheckpointer
from d2norm.engine.log_output import quiet_known_warnings, route_log_handlers, setup_training_loggers
from d2norm.engine.run_folder import check_fresh_start, keep_previous_config
from d2norm.engine.lazy import LazyTrainer, bridge_cfg, build_lazy_model, lazy_test

logger = logging.getLogger("d2norm")


def load_lazy_cfg(config_file, opts=()):
    """The LazyConfig with ``key=value`` overrides; a missing or broken file / bad override is a ToolError."""
    if not os.path.isfile(config_file):
        raise ToolError(f"config file {config_file!r} not found")
    try:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
        bridge_cfg(cfg)
    except ToolError:
        raise
    except Exception as e:
        raise ToolError(f"config {config_file!r} (overrides {list(opts)}): {type(e).__name__}: {e}") from None
    return cfg


def main(args):
    return run(load_lazy_cfg(args.config_file, args.opts), args)


def preflight(cfg, args):
    """Before anything is written: no training from scratch over an earlier run's checkpoints in
    ``train.output_dir`` without ``--overwrite`` (:func:`~d2norm.engine.run_folder.check_fresh_start`)."""
    check_fresh_start(bridge_cfg(cfg).OUTPUT_DIR, resume=bool(args.resume), eval_only=bool(args.eval_only),
                      overwrite=bool(getattr(args, "overwrite", False)), key="train.output_dir")


def run(cfg, args):
    """Train (or with ``args.eval_only`` evaluate) the loaded LazyConfig ``cfg``; returns the last COCO results."""
    preflight(cfg, args)
    out = bridge_cfg(cfg).OUTPUT_DIR
    # as train_net.py: environment table, config dump and model print go to OUTPUT_DIR/log.txt only
    quiet_known_warnings()
    setup_training_loggers(out, comm.get_rank())
    with keep_previous_config(out, comm.is_main_process()):
        default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="d2norm", abbrev_name="d2norm")
    route_log_handlers()
    bridge = bridge_cfg(cfg)
    prepare_datasets(bridge)

    if args.eval_only:
        model = build_lazy_model(cfg, bridge)
        # evaluating a model whose parameters were partly not loaded (another architecture) is an error
        load_weights(D2NormCheckpointer(model, save_dir=bridge.OUTPUT_DIR, on_mismatch="error",
                                        on_bad_stats="error"), bridge.MODEL.WEIGHTS, resume=args.resume,
                     key="train.init_checkpoint")
        return lazy_test(cfg, create_ddp_model(model))

    trainer = LazyTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    launch_main(main, check_config=load_lazy_cfg, preflight=preflight)
