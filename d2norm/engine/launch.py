"""Launching a tool or a training: argument parsing (``base_parser``, ``training_parser``, option types), the
``main(argv) -> exit code`` wrapper that turns expected failures into one ``error: ...`` line, detectron2's
``launch`` for several processes, and the console logging of a tool."""
import argparse
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from .errors import ToolError
from .log_output import setup_tool_logging
from .tool_io import is_main_process, read_cfg

__all__ = ["positive_int", "NumbersThenOverrides", "parse_tool_args", "is_main_process", "distributed_tool",
           "training_parser", "launch_main", "run_tool", "base_parser"]

logger = logging.getLogger("d2norm.tools")


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


_EXPECTED_ERRORS = (ToolError, FileNotFoundError, KeyError, ValueError)


def _report(e: BaseException) -> None:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {msg}", file=sys.stderr, flush=True)


def distributed_tool(fn: Callable) -> Callable:
    """Mark a tool's ``run`` as safe to launch on several processes (``--num-gpus``): it writes outputs on the
    main process only and its statistics are all-reduced."""
    fn.distributed_ok = True
    return fn


def _close_process_groups() -> None:
    """End a spawned rank that finished its work: wait for every rank (a barrier), then destroy the process groups
    (the world and detectron2's local group). detectron2's ``launch`` returns from ``main`` with the groups alive,
    so a rank that finishes first (rank 1 skips the COCO evaluation rank 0 still runs) exits with gloo's threads
    running and can die in their destructors ("terminate called without an active exception", SIGABRT), failing
    a run whose work was done. Only on success: after an error the other ranks may never reach the barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # one process: launch made none
        dist.barrier()
        dist.destroy_process_group()


def _distributed_entry(fn, args) -> None:
    from detectron2.utils import comm

    setup_tool_logging()
    if not comm.is_main_process():
        sys.stdout = open(os.devnull, "w")  # one copy of the progress/report, from rank 0
    try:
        fn(args)
    except _EXPECTED_ERRORS as e:
        if comm.is_main_process():
            _report(e)
        raise SystemExit(2)
    _close_process_groups()


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
        result = main(args)
    except ToolError as e:
        if is_main_process():
            _report(e)
        raise SystemExit(2)
    _close_process_groups()
    return result


def run_tool(fn: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run ``fn(args)`` (on ``--num-gpus`` processes through detectron2's ``launch``, gloo
    on CPU); :class:`ToolError` (and the ValueError / KeyError / FileNotFoundError of bad options) become one
    line on stderr and exit code 2."""
    args = parse_tool_args(parser, argv)
    setup_tool_logging()
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
