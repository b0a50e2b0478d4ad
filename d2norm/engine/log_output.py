"""What training and the tools print where: the console gets progress, ``OUTPUT_DIR/log.txt`` gets everything, without colour.

detectron2's ``default_setup`` logs the environment table, the config file and the full config dump (several hundred lines) and
the trainer logs the full model print; with a log file these go to the file only and the console says where
they are. detectron2 highlights the config with ANSI codes (``_highlight``) and colours some messages
(``colored`` in checkpoint reports) inside the message text, which its plain file formatter writes into
``log.txt`` verbatim; file handlers here strip them. detectron2 has neither option, hence this module.
"""
import logging
import re
import sys
import warnings

from detectron2.utils.logger import setup_logger

__all__ = ["FILE_ONLY", "setup_training_loggers", "route_log_handlers", "has_log_file", "quiet_known_warnings",
           "setup_tool_logging"]

#: ``logger.info(..., extra=FILE_ONLY)`` writes a record to the log file only (when there is one)
FILE_ONLY = {"d2norm_file_only": True}
#: detectron2 ``default_setup`` messages that go to the log file only
_FILE_ONLY_PREFIXES = ("Environment info:", "Contents of args.config_file", "Running with full config:")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LOGGERS = ("detectron2", "fvcore", "d2norm")


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _is_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not _is_console(handler)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "d2norm_file_only", False):
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(_FILE_ONLY_PREFIXES))


class _NoColourFormatter(logging.Formatter):
    """Wraps a handler's formatter and removes ANSI escape sequences from what it writes."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.inner.format(record))


def has_log_file(name: str = "detectron2") -> bool:
    return any(_is_file(h) for h in logging.getLogger(name).handlers)


def route_log_handlers(names=_LOGGERS) -> None:
    """Idempotent: file handlers of ``names`` write without colour codes; where a logger has a file handler,
    its console handlers drop the file-only records."""
    for name in names:
        lg = logging.getLogger(name)
        file_ok = has_log_file(name)
        for h in lg.handlers:
            if _is_file(h) and not isinstance(h.formatter, _NoColourFormatter):
                h.setFormatter(_NoColourFormatter(h.formatter or logging.Formatter()))
            if _is_console(h) and file_ok and not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())


def setup_training_loggers(output_dir: str, rank: int) -> None:
    """Create detectron2's "fvcore" and "detectron2" loggers exactly as ``default_setup`` will (its
    ``setup_logger`` is ``lru_cache``d, so default_setup then reuses them) and route their handlers, so the
    environment table and config dump that default_setup logs reach the log file only."""
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    route_log_handlers(("fvcore", "detectron2"))


def quiet_known_warnings() -> None:
    """Silence third-party warnings every training run printed that say nothing about the user's run (each
    raised inside detectron2 / fvcore / torch code the user does not call):

    * ``torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument``: detectron2's
      anchor generator calls ``torch.meshgrid`` without ``indexing``; the default it warns about ("ij") is the
      one detectron2 relies on;
    * ``TypedStorage is deprecated``: raised by torch's own serialization paths used by fvcore's checkpointer;
    * ``No CUDA runtime is found`` (logger ``torch.utils.cpp_extension``, on machines without CUDA): logged when
      detectron2's environment table imports ``CUDA_HOME``; d2norm's kernels are CPU kernels;
    * the ``FutureWarning`` that ``broadcast_buffers`` is deprecated (torch >= 2.13, in favour of
      ``forward_sync_buffers``): detectron2's ``create_ddp_model`` passes ``broadcast_buffers=False``, whose
      behaviour is unchanged.
    """
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*`?broadcast_buffers`? is deprecated", category=FutureWarning)
    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (tools run in-process, e.g. under pytest's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_tool_logging() -> None:
    """A tool's console: INFO logs of detectron2 / d2norm on stdout (progress), unless the process already
    configured them (a training configures them with :func:`setup_training_loggers`)."""
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
