"""A training run's folder is its record: checkpoints, ``last_checkpoint``, ``config.yaml``, ``inference/``.
detectron2 overwrites all of them without a word — a fresh start (no ``--resume``) in a folder of a finished run
rewrites ``model_0000005.pth`` / ``model_final.pth`` from iteration 0, and every launch (also a failed one, or an
``--eval-only`` with another config) replaces ``config.yaml``. The two rules here close those paths:

* :func:`check_fresh_start`: a training launched without ``--resume`` into a folder that holds training
  checkpoints (``model_final.pth``, ``model_NNNNNNN.pth``) is refused, naming them and the three ways on:
  ``--resume`` (continue), another ``OUTPUT_DIR``, or ``--overwrite`` (start over, replacing them);
* :func:`keep_previous_config`: a launch that would write a ``config.yaml`` different from the one in the folder
  first keeps the old one as ``config.<k>.yaml`` (the lowest free k), so the record of what trained the
  checkpoints is never lost (e.g. ``--resume`` with a longer schedule, ``--eval-only`` with a converted config).

Both run after the cfg was validated and before anything is written (``d2norm.engine.setup_cfg``, the LazyConfig
tool). A folder given as a URL (``scheme://``) is not checked.
"""
import contextlib
import logging
import os
import shutil
from typing import List, Optional

from .checkpoint import is_remote, training_checkpoints

__all__ = ["check_fresh_start", "keep_previous_config", "RunFolderError"]

logger = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """A launch would overwrite the checkpoints of an earlier run in its OUTPUT_DIR."""


def check_fresh_start(output_dir: str, *, resume: bool, eval_only: bool, overwrite: bool,
                      key: str = "OUTPUT_DIR") -> None:
    """Refuse (:class:`RunFolderError`) a training from scratch (not ``resume``, not ``eval_only``) into a
    folder that holds training checkpoints, unless ``overwrite``. ``key``: how the folder is named in the
    message (``OUTPUT_DIR``, ``train.output_dir``)."""
    if resume or eval_only:
        return
    found = training_checkpoints(output_dir)
    if not found:
        return
    if overwrite:
        logger.warning("--overwrite: starting over in %s; its checkpoints (%s) will be replaced", output_dir,
                       ", ".join(found))
        return
    shown = ", ".join(found[-4:]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise RunFolderError(
        f"{key} {output_dir!r} holds the checkpoints of an earlier run ({shown}); a training without --resume "
        f"would start at iteration 0 and overwrite them. Pass --resume to continue that run, set {key} to a new "
        f"folder, or pass --overwrite to start over and replace them."
    )


def _free_name(folder: str) -> str:
    k = 1
    while os.path.exists(os.path.join(folder, f"config.{k}.yaml")):
        k += 1
    return os.path.join(folder, f"config.{k}.yaml")


@contextlib.contextmanager
def keep_previous_config(output_dir: str, main_process: bool = True):
    """Context around the write of ``output_dir/config.yaml`` (detectron2's ``default_setup``): a folder's
    ``config.yaml`` is first copied to ``config.<k>.yaml`` (so a crash in between loses nothing); the copy is
    removed again when the new ``config.yaml`` is byte-identical, kept (with a warning) when it differs."""
    path = os.path.join(output_dir or "", "config.yaml")
    kept: Optional[str] = None
    if main_process and output_dir and not is_remote(output_dir) and os.path.isfile(path):
        kept = _free_name(output_dir)
        shutil.copy2(path, kept)
    try:
        yield
    finally:
        if kept is not None:
            if _same_file(path, kept):
                os.remove(kept)
            else:
                logger.warning("%s was replaced by this launch's config; the previous one is kept as %s", path,
                               kept)


def _same_file(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False
