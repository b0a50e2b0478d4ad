"""A tool's inputs and outputs: cfg and checkpoint loading with clear errors, datasets and loaders, output
folders that never overwrite a run's files, checkpoint / JSON / table writing."""
import contextlib
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from torch import nn

from .errors import ToolError, empty_dataset_is_a_tool_error

__all__ = ["is_main_process", "read_cfg", "load_cfg", "prepare_dataset", "load_model", "load_weights", "source_stem", "claim_outputs",
           "output_dir", "save_checkpoint", "report_kept", "train_style_loader", "test_loader", "write_json",
           "format_table", "FORWARD_MODES", "norm_layers_training", "first"]

logger = logging.getLogger("d2norm.tools")


def is_main_process() -> bool:
    from detectron2.utils import comm

    return comm.is_main_process()


def read_cfg(config_file: str, opts: Sequence[str] = ()):
    """The cfg of ``config_file`` (a relative ``configs/...`` path also from another directory, see
    :func:`d2norm.config.resolve_config_file`) with d2norm's keys and the ``KEY VALUE`` overrides (mutable);
    :class:`ToolError` for a missing or unreadable file, YAML that does not parse, unknown keys or bad values."""
    import yaml
    from detectron2.config import get_cfg

    from ..config import add_d2norm_config, resolve_config_file

    config_file = resolve_config_file(config_file)
    if not config_file or not os.path.isfile(config_file):
        raise ToolError(f"config file not found: {config_file!r}")
    cfg = add_d2norm_config(get_cfg())
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts or []))
    except yaml.YAMLError as e:  # not YAML at all (truncated, binary, bad indentation)
        raise ToolError(f"config file {config_file!r} is not valid YAML: {' '.join(str(e).split())}") from None
    except (KeyError, ValueError, AssertionError, AttributeError, TypeError) as e:  # e.g. a top-level list
        raise ToolError(f"bad config {config_file!r} / overrides {list(opts or [])}: {e}") from None
    return cfg


def load_cfg(config_file: str, opts: Sequence[str] = ()):
    """:func:`read_cfg` followed by the setup-time norm checks (:func:`d2norm.layers.cfg_checks.check_norm_cfg`)."""
    from ..layers.cfg_checks import check_norm_cfg

    cfg = read_cfg(config_file, opts)
    check_norm_cfg(cfg)  # before any data or model work (ValueError: error + exit code 2)
    return cfg


def prepare_dataset(cfg, name: str) -> str:
    """Register ``name`` (generating the synthetic set if it is one of d2norm's) and check it exists; a clear
    :class:`ToolError` for an unregistered dataset or missing files."""
    from ..data import (TRAIN_NAME, VAL_NAME, check_datasets_exist, register_synthetic_dataset, spec_from_cfg,
                        synthetic_root)

    if not name:
        raise ToolError("no dataset given (and none in the cfg's DATASETS)")
    if name in (TRAIN_NAME, VAL_NAME):
        register_synthetic_dataset(synthetic_root(cfg), spec_from_cfg(cfg))
    try:
        check_datasets_exist([name])
    except KeyError as e:
        raise ToolError(e.args[0]) from None
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    return name


def load_model(cfg, weights: Optional[str] = None, return_checkpoint: bool = False):
    """``build_model(cfg)`` in training mode with ``weights`` (default ``cfg.MODEL.WEIGHTS``) loaded by
    detectron2's ``DetectionCheckpointer``; :class:`ToolError` when the checkpoint is missing or unreadable.
    With ``return_checkpoint``: ``(model, the checkpoint's other entries, e.g. "iteration")``."""
    from .checkpoint import D2NormCheckpointer
    from ..layers import build_model

    weights = weights if weights is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise ToolError("no checkpoint given: pass --weights CKPT (or set MODEL.WEIGHTS)")
    model = build_model(cfg)
    extra = load_weights(D2NormCheckpointer(model, on_mismatch="error"), weights, key="--weights")
    model.train()
    return (model, extra or {}) if return_checkpoint else model


def load_weights(checkpointer, weights: str, resume: bool = False, key: str = "MODEL.WEIGHTS"):
    """``checkpointer.resume_or_load(weights, resume=resume)`` for evaluation and the tools: a missing, empty,
    unreadable or non-fitting checkpoint is a :class:`ToolError` naming it (and ``key``), never a traceback or a
    model left at its initialization."""
    from .checkpoint import CheckpointMismatchError, is_remote

    if not (resume and checkpointer.has_checkpoint()):
        if not weights:
            raise ToolError(f"{key} is empty: no checkpoint to evaluate (the model would keep its random "
                            f"initialization); set {key} to a checkpoint")
        if not is_remote(weights) and not os.path.isfile(weights):
            raise ToolError(f"checkpoint not found: {weights!r} ({key})")
    try:
        return checkpointer.resume_or_load(weights, resume=resume)
    except CheckpointMismatchError as e:  # another architecture: the counts say what did not fit
        raise ToolError(str(e)) from None
    except Exception as e:  # corrupt / foreign file: say which one
        raise ToolError(f"cannot load checkpoint {weights!r} ({key}): {type(e).__name__}: {e}") from None


def source_stem(weights: str) -> str:
    """The file name of a checkpoint without its extension (``.../model_0000999.pth`` -> ``model_0000999``):
    outputs are named after their source, so the same tool on two checkpoints of a run writes two files."""
    base = os.path.basename(str(weights).rstrip("/")) or "model"
    return os.path.splitext(base)[0]


def claim_outputs(paths: Sequence[str], overwrite: bool) -> None:
    """Called before any work: an existing output file is a :class:`ToolError` unless ``overwrite``
    (``--overwrite``), so a repeated or second command never replaces an earlier result silently."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ToolError(f"{existing[0]!r} exists (an earlier output of this tool"
                        f"{f', and {len(existing) - 1} more' if len(existing) > 1 else ''}); pass --overwrite to "
                        f"replace it, or choose another --output-name / --output-dir")


def output_dir(args, cfg, tool: str) -> str:
    """``--output-dir``, or ``<cfg.OUTPUT_DIR>/<tool>``: by default a tool writes into its own folder, never
    next to a training run's checkpoints (what ``train_net.py --resume`` of that run picks up)."""
    return args.output_dir or os.path.join(cfg.OUTPUT_DIR, tool)


def save_checkpoint(model: nn.Module, output_dir: str, name: str, source: Optional[Dict[str, Any]] = None,
                    inference_only: Optional[str] = None, **extra) -> str:
    """Write ``output_dir/name.pth`` in DetectionCheckpointer format (``{"model": state_dict, **extra}``).

    * ``source``: the entries of the checkpoint the tool started from besides its model (``load_model(...,
      return_checkpoint=True)``): its ``iteration`` and trainer state (optimizer, scheduler, hooks) are kept, so
      the new checkpoint is what the training run was at that iteration with the tool's change applied. With
      ``inference_only`` (the reason, e.g. the tool changed the layer types, so the optimizer state no longer
      fits), the trainer state is dropped and ``inference_only`` is recorded instead; the iteration stays.
    * ``last_checkpoint`` is never written (``train_net.py --resume`` of a run in ``output_dir`` is unaffected),
      and a name the trainer itself uses (``model_final``, ``model_0000123``) is refused in a training folder.
    * Non-finite statistics are refused (an error naming the layers), never written silently.
    * Written atomically (a crash leaves the old file or none, never a truncated one).
    """
    from .checkpoint import TRAINING_CHECKPOINT_NAME, write_checkpoint

    if TRAINING_CHECKPOINT_NAME.match(name) and os.path.exists(os.path.join(output_dir, "last_checkpoint")):
        raise ToolError(f"--output-name {name!r} is a name the trainer uses and {output_dir!r} is a training folder "
                        f"(it has a last_checkpoint): choose another name or --output-dir")
    data = {k: v for k, v in (source or {}).items() if k in ("iteration", "trainer")}
    if inference_only:
        data.pop("trainer", None)
        data["inference_only"] = inference_only
    data.update(extra)
    path = os.path.join(output_dir, f"{name}.pth")
    if is_main_process():
        write_checkpoint(model, path, on_nonfinite="error", **data)
    return path


def report_kept(kept: Dict[str, str], to: str) -> None:
    """Print the layers :func:`conversion_plan` keeps, one line per reason (with a count and an example)."""
    by_reason: Dict[str, List[str]] = {}
    for n, r in kept.items():
        if r != f"already {to}":
            by_reason.setdefault(r, []).append(n)
    for r, names in by_reason.items():
        print(f"kept as is: {len(names)} layer(s), e.g. {names[0]}: {r}", flush=True)


def _seed(seed: int) -> None:
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(seed)


def train_style_loader(cfg, dataset: str, batch_size: int, seed: int = 0) -> Iterable:
    """detectron2's training loader on ``dataset`` (training mapper: batches carry ``instances``), shuffled
    with ``seed``, ``batch_size`` images per rank, no worker processes (as the PreciseBN hook's loader)."""
    from .hooks import build_precise_bn_loader

    c = cfg.clone()
    c.defrost()
    c.DATASETS.TRAIN = (dataset,)
    c.D2NORM.PRECISE_BN.BATCH_SIZE = int(batch_size)
    _seed(seed)  # TrainingSampler draws its shared seed from numpy
    try:
        return build_precise_bn_loader(c)
    except (AssertionError, ValueError) as e:  # e.g. every image filtered out for lack of annotations
        raise ToolError(
            f"cannot build a training loader on {dataset!r} ({e}); a dataset without annotations can still be "
            f"used by a forward in inference mode (see --help)"
        ) from None


def test_loader(cfg, dataset: str) -> Iterable:
    """detectron2's test loader (one image per batch, no annotations needed, each image once)."""
    from detectron2.data import build_detection_test_loader

    c = cfg.clone()
    c.defrost()
    c.DATALOADER.NUM_WORKERS = 0
    with empty_dataset_is_a_tool_error(dataset):
        return build_detection_test_loader(c, dataset)


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as JSON (on the main process only, in a distributed run)."""
    from detectron2.utils import comm

    if not comm.is_main_process():
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


FORWARD_MODES = ("train", "inference")


@contextlib.contextmanager
def norm_layers_training(model: nn.Module):
    """Context: the model in eval mode except its layers with population statistics (those PreciseBN would
    recompute with the model in training mode), which stay in training mode. A forward is then detectron2's
    inference path (no annotations needed, no losses) while the norm layers' inputs are recorded: PreciseBN
    on an unlabeled target domain (rethinking §5.1 "Adaptive BN"). Flags are restored on exit."""
    from ..stats import population_stat_layers

    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        names = set(population_stat_layers(model))
        model.eval()
        for n, m in model.named_modules():
            if n in names:
                m.training = True
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def first(names: Sequence[str]) -> Optional[str]:
    return names[0] if len(names) else None
