"""Training from a detectron2 LazyConfig (python config) with d2norm's hooks and optimizer parameter groups.

A LazyConfig has detectron2's usual nodes (``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier``, ``train``; see detectron2's ``configs/common/``). d2norm adds:

* ``train.d2norm``: a dict with the keys of the yacs ``cfg.D2NORM`` node (same names, same meaning, same
  checks), e.g. ``train.d2norm = dict(PRECISE_BN=dict(ENABLED=True, NUM_SAMPLES=400, BATCH_SIZE=8))``. It enables
  the PreciseBN, FrozenBN switch, EvalNorm fit and BN monitor hooks exactly as in a yacs config, gives d2norm
  layers built by name (``norm="GhostBN"``) their options, and ``DATA`` configures the synthetic set. An unknown
  key fails, naming it.
* ``train.clip_gradients`` (optional): detectron2's ``SOLVER.CLIP_GRADIENTS`` keys (``ENABLED``, ``CLIP_TYPE``,
  ``CLIP_VALUE``, ``NORM_TYPE``).
* ``train.seed`` (optional): detectron2's ``SEED``.

The optimizer's parameter groups come from :func:`d2norm.solver.get_optimizer_params` (``weight_decay_norm`` for
every d2norm layer's γ/β, never weight decay for EvalNorm's α̂/β̂): a config whose ``optimizer.params`` uses
detectron2's ``get_default_optimizer_params`` (as detectron2's ``common/optim.py`` does) gets d2norm's function
with the same arguments, and the log says so.

:class:`LazyTrainer` is d2norm's :class:`~d2norm.engine.Trainer` (detectron2's ``DefaultTrainer``: checkpoints
with optimizer state, ``--resume``, periodic evaluation, writers, AMP via ``train.amp.enabled``) whose model,
data, optimizer, schedule and evaluator come from the LazyConfig. It runs on a yacs "bridge" cfg holding the
``train`` values the hooks read (:func:`bridge_cfg`). ``DefaultTrainer``'s own choices apply where detectron2's
LazyConfig script has options: DDP with ``broadcast_buffers=False`` (``train.ddp`` is not read) and writers every
20 iterations (``train.log_period`` is not read).
"""
import copy
import logging
from typing import Any, Dict, Optional

from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import compat
from ..config import add_d2norm_config
from ..data import prepare_datasets
from ..layers.registry import norm_options
from ..solver import get_optimizer_params
from .log_output import FILE_ONLY
from .trainer import Trainer

__all__ = ["LazyTrainer", "bridge_cfg", "build_lazy_model", "lazy_test"]

logger = logging.getLogger(__name__)


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _get(node, path: str, default=None):
    cur = node
    for key in path.split("."):
        if cur is None or key not in cur:
            return default
        cur = cur[key]
    return _plain(cur)


def _dataset_names(loader_cfg, what: str):
    names = _get(loader_cfg, "dataset.names")
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"dataloader.{what}.dataset.names must be a dataset name or a list of names, got {names!r}")
    return tuple(names)


def _merge_upper(cfg: CfgNode, key: str, values: Optional[Dict[str, Any]], where: str) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a dict of cfg.{key} keys, got {values!r}")
    try:
        cfg.merge_from_other_cfg(CfgNode({key: values}))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: {e} (its keys are those of the yacs cfg.{key} node)") from None


def bridge_cfg(lazy) -> CfgNode:
    """The yacs cfg d2norm's Trainer and hooks read, from a LazyConfig's ``train`` and ``dataloader`` nodes.

    ``D2NORM`` = defaults + ``train.d2norm``; ``SOLVER.{MAX_ITER, CHECKPOINT_PERIOD, AMP.ENABLED, IMS_PER_BATCH,
    CLIP_GRADIENTS}``, ``TEST.EVAL_PERIOD``, ``OUTPUT_DIR``, ``MODEL.{DEVICE, WEIGHTS}``, ``SEED``,
    ``DATALOADER.NUM_WORKERS`` and ``DATASETS.{TRAIN, TEST}`` from the LazyConfig.
    """
    for node in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        if node not in lazy:
            raise ValueError(f"LazyConfig has no {node!r} node (needed by tools/lazyconfig_train_net.py)")
    train, data = lazy.train, lazy.dataloader
    cfg = add_d2norm_config(get_cfg())
    _merge_upper(cfg, "D2NORM", _get(train, "d2norm"), "train.d2norm")
    clip = _get(train, "clip_gradients")
    if clip is not None:
        _merge_upper(cfg.SOLVER, "CLIP_GRADIENTS", clip, "train.clip_gradients")
    cfg.OUTPUT_DIR = _get(train, "output_dir", "./output")
    cfg.SOLVER.MAX_ITER = int(_get(train, "max_iter"))
    cfg.SOLVER.CHECKPOINT_PERIOD = int(_get(train, "checkpointer.period", 5000))
    cfg.SOLVER.AMP.ENABLED = bool(_get(train, "amp.enabled", False))
    cfg.TEST.EVAL_PERIOD = int(_get(train, "eval_period", 0))
    cfg.MODEL.DEVICE = _get(train, "device", "cuda")
    cfg.MODEL.WEIGHTS = _get(train, "init_checkpoint", "") or ""
    cfg.SEED = int(_get(train, "seed", -1))
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(f"train.amp.enabled=True needs train.device 'cuda' (detectron2's AMPTrainer), got "
                         f"train.device={cfg.MODEL.DEVICE!r}")
    cfg.SOLVER.IMS_PER_BATCH = int(_get(data, "train.total_batch_size"))
    cfg.DATALOADER.NUM_WORKERS = int(_get(data, "train.num_workers", 0))
    cfg.DATASETS.TRAIN = _dataset_names(data.train, "train")
    cfg.DATASETS.TEST = _dataset_names(data.test, "test") if "test" in data else ()
    cfg.TEST.PRECISE_BN.ENABLED = False  # detectron2's own PreciseBN hook: use train.d2norm.PRECISE_BN
    cfg.freeze()
    return cfg


def build_lazy_model(lazy, cfg: CfgNode):
    """``instantiate(lazy.model)`` on ``cfg.MODEL.DEVICE``, with ``cfg.D2NORM`` bound for d2norm layers named by
    string or by ``norm_layer(name)`` without options."""
    with norm_options(cfg):
        model = instantiate(lazy.model)
    return model.to(cfg.MODEL.DEVICE)


def lazy_test(lazy, model):
    """detectron2's ``do_test``: ``inference_on_dataset`` with ``dataloader.test`` and ``dataloader.evaluator``."""
    if "evaluator" not in lazy.dataloader:
        return {}
    evaluator = instantiate(lazy.dataloader.evaluator)
    if getattr(evaluator, "_use_fast_impl", False) and not compat.HAS_COMPILED_OPS:
        # detectron2's COCOEvaluator would log "Evaluating predictions with unofficial COCO API" while compat
        # routes it to pycocotools' COCOeval (as d2norm's Trainer builds it): say what runs
        evaluator._use_fast_impl = False
    ret = inference_on_dataset(model, instantiate(lazy.dataloader.test), evaluator)
    print_csv_format(ret)
    return ret


class LazyTrainer(Trainer):
    """d2norm's Trainer with model, data, optimizer, LR schedule and evaluator from a LazyConfig."""

    def __init__(self, lazy):
        self.lazy = lazy
        cfg = bridge_cfg(lazy)
        prepare_datasets(cfg)  # generate/register the synthetic set if used; check the datasets exist
        super().__init__(cfg)

    def build_model(self, cfg):
        model = build_lazy_model(self.lazy, cfg)
        logger.info("Model:\n%s", model, extra=FILE_ONLY)  # the full print in log.txt only, as train_net.py
        return model

    def build_optimizer(self, cfg, model):
        opt = copy.deepcopy(self.lazy.optimizer)
        if "params" in opt and opt.params.get("_target_") in (get_default_optimizer_params,
                                                               "detectron2.solver.build.get_default_optimizer_params",
                                                               "detectron2.solver.get_default_optimizer_params"):
            logger.info("optimizer.params: detectron2's get_default_optimizer_params -> d2norm.solver."
                        "get_optimizer_params (weight_decay_norm for every d2norm layer, none for EvalNorm α̂/β̂)")
            opt.params._target_ = get_optimizer_params
        if "params" in opt:
            opt.params.model = model
        return maybe_add_gradient_clipping(cfg, instantiate(opt))

    def build_train_loader(self, cfg):
        loader = copy.deepcopy(self.lazy.dataloader.train)
        loader.total_batch_size = cfg.SOLVER.IMS_PER_BATCH
        loader.num_workers = cfg.DATALOADER.NUM_WORKERS
        return instantiate(loader)

    def build_lr_scheduler(self, cfg, optimizer):
        return LRMultiplier(optimizer, multiplier=instantiate(self.lazy.lr_multiplier), max_iter=cfg.SOLVER.MAX_ITER)

    def test(self, cfg, model, evaluators=None):  # DefaultTrainer.test is a classmethod over cfg.DATASETS.TEST
        return lazy_test(self.lazy, model)
