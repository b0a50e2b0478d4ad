"""Plumbing shared by the population-statistics tools (``tools/recompute_bn_stats.py``, ``fit_evalnorm.py``,
``tune_example_weight.py``, ``analyze_bn.py``): cfg + checkpoint loading with clear errors, data loaders,
COCO evaluation, checkpoint / JSON writing, and the ``main(argv) -> exit code`` wrapper that turns expected
failures (missing config, checkpoint or dataset; bad option) into one ``error: ...`` line instead of a
traceback. The statistics math itself lives in :mod:`d2norm.stats`; a tool only wires it to files and flags.
"""
import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from torch import nn

__all__ = [
    "ToolError",
    "positive_int",
    "NumbersThenOverrides",
    "parse_tool_args",
    "run_tool",
    "launch_main",
    "training_parser",
    "base_parser",
    "load_cfg",
    "read_cfg",
    "prepare_dataset",
    "load_model",
    "load_weights",
    "save_checkpoint",
    "output_dir",
    "source_stem",
    "claim_outputs",
    "train_style_loader",
    "test_loader",
    "empty_dataset_is_a_tool_error",
    "evaluate",
    "main_metric",
    "convert_bn_layers",
    "conversion_plan",
    "registered_norm_names",
    "report_kept",
    "cfg_with_norm",
    "write_json",
    "format_table",
    "BN_NORM_NAMES",
    "NORM_KEYS",
    "is_main_process",
    "distributed_tool",
    "same_results",
    "FORWARD_MODES",
    "norm_layers_training",
    "first",
    "maybe_evaluate",
    "add_eval_args",
    "eval_dataset",
    "record_before_after",
]

logger = logging.getLogger("d2norm.tools")

#: detectron2 cfg keys that name a norm layer (any registered d2norm name works in each)
NORM_KEYS = (
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.RETINANET.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
)
#: detectron2's trainable BN names (FrozenBN is frozen by design: never converted by the tools)
BN_NORM_NAMES = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error, exit code 2)."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


class NumbersThenOverrides(argparse.Action):
    """``nargs="+"`` option of numbers followed by the trailing ``KEY VALUE`` overrides without a separator
    (``--alphas 0 0.5 MODEL.DEVICE cpu``): argparse gives the option every word up to the next flag, so the
    numbers are its leading words that parse as floats, the rest goes back in front of ``opts``. A word that is
    neither a number nor an override key (upper-case dotted) is a usage error naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        numbers, i = [], 0
        for i, v in enumerate(values):
            try:
                numbers.append(float(v))
            except ValueError:
                break
        else:
            i = len(values)
        rest = list(values[i:])
        if not numbers:
            parser.error(f"{option_string}: expected at least one number, got {values[0]!r}")
        if rest and not (rest[0].isupper() or "." in rest[0]):
            parser.error(f"{option_string}: invalid number {rest[0]!r} (numbers first, then KEY VALUE overrides)")
        setattr(namespace, self.dest, numbers)
        namespace._leading_opts = getattr(namespace, "_leading_opts", []) + rest


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the overrides in ``opts`` made whole: a ``--`` separator before them
    is dropped (``--alphas 0 0.5 -- KEY VALUE``), and words a :class:`NumbersThenOverrides` option did not take
    come first."""
    args = parser.parse_args(argv)
    if hasattr(args, "opts"):
        opts = list(args.opts or [])
        if opts[:1] == ["--"]:
            opts = opts[1:]
        args.opts = list(getattr(args, "_leading_opts", [])) + opts
    return args


class ToolError(Exception):
    """An expected failure of a tool (bad input): printed as ``error: <message>``, exit code 2."""


_EXPECTED_ERRORS = (ToolError, FileNotFoundError, KeyError, ValueError)


def _report(e: BaseException) -> None:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {msg}", file=sys.stderr, flush=True)


def is_main_process() -> bool:
    from detectron2.utils import comm

    return comm.is_main_process()


def distributed_tool(fn: Callable) -> Callable:
    """Mark a tool's ``run`` as safe to launch on several processes (``--num-gpus``): it writes outputs on the
    main process only and its statistics are all-reduced."""
    fn.distributed_ok = True
    return fn


def _distributed_entry(fn, args) -> None:
    from detectron2.utils import comm

    _setup_logging()
    if not comm.is_main_process():
        sys.stdout = open(os.devnull, "w")  # one copy of the progress/report, from rank 0
    try:
        fn(args)
    except _EXPECTED_ERRORS as e:
        if comm.is_main_process():
            _report(e)
        raise SystemExit(2)


def training_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """``parser`` (default: detectron2's ``default_argument_parser()``) with ``--dist-url`` defaulting to
    ``"auto"``: detectron2's default is a fixed port per user, so two multi-process runs on one machine (e.g.
    two seeds of an experiment) would fail with EADDRINUSE; "auto" is ``launch()``'s free local port.
    Multi-machine jobs pass the URL, as with detectron2."""
    from detectron2.engine import default_argument_parser

    parser = parser or default_argument_parser()
    parser.set_defaults(dist_url="auto")
    if not any("--overwrite" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--overwrite", action="store_true",
            help="train from scratch in an OUTPUT_DIR that holds an earlier run's checkpoints, replacing them "
                 "(without it such a launch is refused: use --resume to continue that run)")
    return parser


def launch_main(main: Callable[[argparse.Namespace], Any], argv=None, parser=None,
                check_config: Optional[Callable[[str, Sequence[str]], Any]] = None,
                preflight: Optional[Callable[[Any, argparse.Namespace], Any]] = None) -> None:
    """detectron2's training-tool entry point (tools/train_net.py, tools/lazyconfig_train_net.py): parse
    detectron2's ``default_argument_parser`` (or ``parser``, e.g. one extended with a tool's own flags), check the
    config and its overrides with ``check_config(config_file, opts)`` (default: the yacs :func:`read_cfg`; it
    raises :class:`ToolError`), then ``preflight(cfg, args)`` (the launch's checks: norm choices, hook options,
    the run folder; ValueError), and run ``main(args)`` on ``--num-gpus`` processes per machine through
    detectron2's ``launch`` (gloo on CPU). A failed check is one ``error:`` line and exit code 2, before any
    process starts or any file is written."""
    from detectron2.engine import launch

    args = training_parser(parser).parse_args(argv)
    print("Command Line Args:", args)
    try:
        cfg = (check_config or read_cfg)(args.config_file, args.opts)
        if preflight is not None:
            preflight(cfg, args)
    except (ToolError, ValueError) as e:
        _report(e)
        raise SystemExit(2)
    from ..config import resolve_config_file

    args.config_file = resolve_config_file(args.config_file)
    try:
        launch(_training_entry, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(main, args))
    except Exception as e:  # a rank exited with code 2 after rank 0 printed its error line
        if "exit code 2" in str(e) or "exitcode 2" in str(e).replace(" ", ""):
            raise SystemExit(2)
        raise


def _training_entry(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace):
    """``main(args)`` where a :class:`ToolError` (bad input met after the launch: a missing or unreadable
    checkpoint, an empty dataset, a checkpoint of another model to resume from) is one ``error:`` line (from
    the main process) and exit code 2. Other exceptions keep their traceback: they are bugs to report."""
    try:
        return main(args)
    except ToolError as e:
        if is_main_process():
            _report(e)
        raise SystemExit(2)


def run_tool(fn: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run ``fn(args)`` (on ``--num-gpus`` processes through detectron2's ``launch``, gloo
    on CPU); :class:`ToolError` (and the ValueError / KeyError / FileNotFoundError of bad options) become one
    line on stderr and exit code 2."""
    args = parse_tool_args(parser, argv)
    _setup_logging()
    world = getattr(args, "num_gpus", 1) * getattr(args, "num_machines", 1)
    if world > 1:
        if not getattr(fn, "distributed_ok", False):
            _report(ToolError(f"this tool runs in one process; got --num-gpus {args.num_gpus} "
                              f"--num-machines {args.num_machines}"))
            return 2
        from detectron2.engine import launch

        try:
            launch(_distributed_entry, args.num_gpus, num_machines=args.num_machines,
                   machine_rank=args.machine_rank, dist_url=args.dist_url, args=(fn, args))
        except Exception as e:  # a rank exited (its error was printed by rank 0) or crashed
            if "exit code 2" in str(e) or "exitcode 2" in str(e).replace(" ", ""):
                return 2
            raise
        return 0
    try:
        fn(args)
    except _EXPECTED_ERRORS as e:
        _report(e)
        return 2
    return 0


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (tools run in-process, e.g. under pytest's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """INFO logs of detectron2 / d2norm on stdout (progress), unless the process already configured them."""
    fmt = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    for name in ("detectron2", "d2norm"):
        lg = logging.getLogger(name)
        if lg.handlers:
            continue
        h = _CurrentStdout()
        h.setFormatter(fmt)
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def base_parser(description: str, multi_weights: bool = False) -> argparse.ArgumentParser:
    """``--config-file``, ``--weights`` (one or several), ``--output-dir``, ``--seed`` and trailing
    ``KEY VALUE`` cfg overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="the model's yaml config")
    if multi_weights:
        p.add_argument("--weights", nargs="+", required=True, metavar="CKPT",
                       help="checkpoints (DetectionCheckpointer .pth/.pkl), in training order")
    else:
        p.add_argument("--weights", metavar="CKPT", help="checkpoint to load (default: MODEL.WEIGHTS of the cfg)")
    p.add_argument("--output-dir", metavar="DIR", help="where outputs go (default: a folder named after the tool "
                   "inside the cfg's OUTPUT_DIR, so a training run's own checkpoints are never touched)")
    p.add_argument("--overwrite", action="store_true", help="replace this tool's outputs of the same name (by "
                   "default an existing output is an error, checked before any work)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (gloo on CPU, NCCL on CUDA); "
                   "only tools that compute statistics support more than one")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="init URL of the process group (default: a free local port)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="cfg overrides, e.g. MODEL.DEVICE cpu D2NORM.DATA.SYNTHETIC_ROOT /tmp/data")
    return p


# ---- cfg, datasets, model ---------------------------------------------------------------------------------
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


def registered_norm_names(model: nn.Module, names: Sequence[str]) -> List[str]:
    """The ``NORM`` names (registry keys) of the d2norm layers ``names`` of ``model`` (e.g. ``["GhostBN"]``)."""
    from ..layers.registry import NORM_REGISTRY

    by_class = {cls: n for n, cls in NORM_REGISTRY}
    wanted = set(names)
    return sorted({by_class[type(m)] for n, m in model.named_modules() if n in wanted and type(m) in by_class})


def cfg_with_norm(cfg, to: str, weights: str, sources: Sequence[str] = (), **overrides):
    """A copy of ``cfg`` whose BN norm keys (:data:`BN_NORM_NAMES`, and keys naming one of ``sources``, the
    converted d2norm norms) name ``to``, whose MODEL.WEIGHTS is ``weights`` and whose OUTPUT_DIR is the folder of
    ``weights`` (a config written next to a converted checkpoint evaluates into its own folder, never over the
    training run's ``config.yaml`` and ``inference/``); extra ``{"D2NORM.X.Y": value}`` overrides are applied
    too. Returns ``(cfg, keys left unchanged)``: ``MODEL.RETINANET.NORM`` "BN"/"SyncBN"
    (detectron2's per-level head BN) cannot be named by a registered norm without changing the layout."""
    c = cfg.clone()
    c.defrost()
    opts, kept = [], []
    for key in NORM_KEYS:
        node, leaf = c, key.split(".")
        for part in leaf[:-1]:
            node = node.get(part) if node is not None else None
        if node is not None and node.get(leaf[-1]) in tuple(BN_NORM_NAMES) + tuple(sources):
            if key == "MODEL.RETINANET.NORM":
                # detectron2 builds "BN"/"SyncBN" heads as per-level CycleBatchNormList; a registered name
                # would build one shared layer with other state-dict keys, so the name stays
                kept.append(key)
                continue
            opts += [key, to]
    opts += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.dirname(os.path.abspath(weights))]
    for k, v in overrides.items():
        opts += [k, v]
    c.merge_from_list(opts)
    return c, kept


def conversion_plan(model: nn.Module, to: str, bn_inference_only: bool = False):
    """Which norm layers of ``model`` the tools convert to ``to`` (``"EvalNorm"`` / ``"ExampleWeightedBN"``),
    decided before any work: ``(convert, keep)``, module names to convert and ``{name: reason}`` of the norm
    layers left as they are.

    * converted: torch's / detectron2's trainable BN (BN, SyncBN, NaiveSyncBN) and every d2norm layer whose
      :meth:`~d2norm.layers.base.D2NormModule.sample_stats_inference_unsupported` is ``None`` (BN-derived: GhostBN,
      AnySyncBN, BatchStatsBN, ExampleWeightedBN / EvalNorm (into the other), DomainBN with one set);
    * kept: layers already of type ``to`` (used as they are); detectron2's ``FrozenBatchNorm2d`` (frozen in
      training: no batch statistics, so no train/test discrepancy to correct); MABN, BGN, per-domain DomainBN
      (the reason each gives);
    * with ``bn_inference_only`` (``tune_example_weight``, whose α = 0 must reproduce the model's own
      inference) also layers whose current inference is not BN's fixed affine map (EvalNorm's eqs 5-6,
      BatchStatsBN's batch statistics, ExampleWeightedBN with α > 0).
    """
    from detectron2.layers import FrozenBatchNorm2d

    from ..layers.base import D2NormModule, NotAnAffine
    from ..layers.convert import SOURCE_TYPES
    from ..layers.registry import NORM_REGISTRY

    target = NORM_REGISTRY.get(to)
    convert, keep = [], {}
    for name, m in model.named_modules():
        if isinstance(m, target):
            keep[name] = f"already {to}"
        elif isinstance(m, FrozenBatchNorm2d):
            keep[name] = "FrozenBN: frozen in training, no batch statistics (no train/test discrepancy to correct)"
        elif isinstance(m, D2NormModule):
            reason = m.sample_stats_inference_unsupported()
            if reason is None and bn_inference_only:
                try:
                    m.inference_affine()
                except NotAnAffine as e:
                    reason = f"its inference is not BN's ({e}); alpha = 0 would change it"
            if reason is None:
                convert.append(name)
            else:
                keep[name] = reason
        elif isinstance(m, SOURCE_TYPES):
            convert.append(name)
    return convert, keep


def report_kept(kept: Dict[str, str], to: str) -> None:
    """Print the layers :func:`conversion_plan` keeps, one line per reason (with a count and an example)."""
    by_reason: Dict[str, List[str]] = {}
    for n, r in kept.items():
        if r != f"already {to}":
            by_reason.setdefault(r, []).append(n)
    for r, names in by_reason.items():
        print(f"kept as is: {len(names)} layer(s), e.g. {names[0]}: {r}", flush=True)


def convert_bn_layers(model: nn.Module, to: str, cfg, names: Optional[Sequence[str]] = None) -> List[str]:
    """:func:`d2norm.layers.convert.convert_norm` on the layers :func:`conversion_plan` selects (or ``names``).
    Returns the converted module names."""
    from ..layers.convert import convert_norm

    if names is None:
        names, _ = conversion_plan(model, to)
    model, report = convert_norm(model, to, cfg, names=set(names))
    return list(report.converted)


# ---- data -----------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def empty_dataset_is_a_tool_error(dataset: str):
    """detectron2 asserts ``Dataset '<name>' is empty!`` when a loader is built on a dataset without images: a
    :class:`ToolError` naming it instead of a traceback."""
    try:
        yield
    except AssertionError as e:
        if "is empty" not in str(e):
            raise
        raise ToolError(f"dataset {dataset!r} has no images ({e}): register it with images, or choose another "
                        f"(DATASETS.TEST / --dataset)") from None


# ---- evaluation -----------------------------------------------------------------------------------------
def evaluate(cfg, model: nn.Module, dataset: str, output_dir: str) -> Dict[str, Dict[str, float]]:
    """COCO evaluation (detectron2's ``inference_on_dataset`` + d2norm's evaluator) of ``model`` on
    ``dataset``; the model's train/eval flags are restored afterwards."""
    from detectron2.evaluation import inference_on_dataset

    from .trainer import Trainer

    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder=output_dir)
    res = inference_on_dataset(model, test_loader(cfg, dataset), evaluator)
    return {k: {m: float(v) for m, v in d.items()} for k, d in (res or {}).items()}


def same_results(a: Dict[str, Dict[str, float]], b: Dict[str, Dict[str, float]]) -> bool:
    """Exact equality of two evaluation results, NaN (a metric without ground truth) equal to NaN."""
    if a.keys() != b.keys():
        return False
    for task in a:
        if a[task].keys() != b[task].keys():
            return False
        for k, v in a[task].items():
            w = b[task][k]
            if not (v == w or (v != v and w != w)):
                return False
    return True


def main_metric(results: Dict[str, Dict[str, float]]) -> float:
    """The first task's AP (``bbox`` for detectors), NaN when there is none."""
    for task in ("bbox", "segm", "keypoints"):
        if task in results and "AP" in results[task]:
            return results[task]["AP"]
    return float("nan")


# ---- output ---------------------------------------------------------------------------------------------
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


# ---- forward modes of a population-statistics pass ------------------------------------------------------
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


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``--eval`` (COCO AP before and after the tool's change) and ``--eval-dataset``."""
    p.add_argument("--eval", action="store_true", help="COCO AP before and after")
    p.add_argument("--eval-dataset", help="dataset for --eval (default: the cfg's first DATASETS.TEST)")


def eval_dataset(args, cfg) -> Optional[str]:
    """The prepared ``--eval-dataset`` (default: the cfg's first DATASETS.TEST) with ``--eval``, else None."""
    return prepare_dataset(cfg, args.eval_dataset or first(cfg.DATASETS.TEST)) if args.eval else None


def record_before_after(report: dict, dataset: Optional[str], before, after) -> None:
    """With ``--eval`` (``dataset`` given): the AP before/after into ``report`` and printed as a table."""
    if dataset is None:
        return
    report.update(eval_dataset=dataset, before=before, after=after)
    print(format_table(["", "AP"], [["before", main_metric(before)], ["after", main_metric(after)]]))


def maybe_evaluate(enabled: bool, cfg, model, dataset: Optional[str], output_dir: str, tag: str):
    """COCO evaluation under ``output_dir/inference/<tag>`` when ``enabled``; prints the AP."""
    if not enabled:
        return None
    res = evaluate(cfg, model, dataset, os.path.join(output_dir, "inference", tag))
    print(f"[{tag}] {dataset}: AP = {main_metric(res):.4f}", flush=True)
    return res
