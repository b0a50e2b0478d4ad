"""Loading d2norm checkpoints for inference: a checkpoint written after the FrozenBN switch (rethinking §4.3)
holds FrozenBN layers, so the freshly built model is converted the same way before its weights are loaded."""
import logging
import os
import tempfile
from typing import IO, Callable, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..layers.base import nonfinite_statistics

from ..layers.frozen import freeze_bn_layers

__all__ = ["InferenceCheckpointer", "prepare_model_for_checkpoint", "atomic_write", "write_checkpoint",
           "NonFiniteCheckpointError"]

logger = logging.getLogger(__name__)

_SWITCH_HOOK = "FrozenBNSwitchHook"


def prepare_model_for_checkpoint(model, checkpoint) -> bool:
    """Convert ``model`` the way the training run had converted it when ``checkpoint`` was written.

    Returns True when a conversion was applied (the checkpoint's FrozenBN-switch hook state says so).
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("trainer"), dict):
        return False
    state = checkpoint["trainer"].get("hooks", {}).get(_SWITCH_HOOK)
    if not state or not state.get("switched"):
        return False
    freeze_bn_layers(model, bool(state.get("trainable_affine", True)), names=state.get("layers") or [])
    return True


class InferenceCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that first applies :func:`prepare_model_for_checkpoint`."""

    def _load_model(self, checkpoint):
        prepare_model_for_checkpoint(self.model, checkpoint)
        return super()._load_model(checkpoint)


# ---- writing -------------------------------------------------------------------------------------------------
# What fvcore's Checkpointer lacks: its save() and tag_last_checkpoint() open the target file itself for
# writing, so a crash, a kill or a full disk mid-write leaves a truncated .pth or an empty last_checkpoint
# behind, on which --resume then stops. Here every file is written to a temporary name in the same folder,
# flushed to disk and renamed over the target (os.replace is atomic on POSIX and Windows).
def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temporary file next to ``path``, then rename it to ``path`` (local paths)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class NonFiniteCheckpointError(ValueError):
    """A checkpoint would be written with non-finite (NaN/Inf) statistics and the policy is ``"error"``."""


def write_checkpoint(model: nn.Module, path: str, *, on_nonfinite: str = "warn", **extra) -> Dict[str, List[str]]:
    """Write ``{"model": model.state_dict(), **extra}`` to ``path`` atomically (:func:`atomic_write`).

    A model whose buffers (the normalization statistics) hold a NaN/Inf is never written silently:
    ``on_nonfinite="error"`` refuses (:class:`NonFiniteCheckpointError` naming the layers); ``"warn"`` writes it
    with a warning naming the layers and records them under ``"nonfinite_statistics"`` in the checkpoint (a
    training run keeps its checkpoint, to be inspected or resumed). Returns the non-finite buffers found.
    """
    if on_nonfinite not in ("error", "warn"):
        raise ValueError(f"on_nonfinite must be 'error' or 'warn', got {on_nonfinite!r}")
    bad = nonfinite_statistics(model)
    data = {"model": model.state_dict(), **extra}
    if bad:
        what = (f"non-finite (NaN/Inf) statistics in {len(bad)} module(s): "
                + "; ".join(f"{n}: {', '.join(b)}" for n, b in list(bad.items())[:5])
                + (" ..." if len(bad) > 5 else ""))
        if on_nonfinite == "error":
            raise NonFiniteCheckpointError(f"refusing to write {path}: {what}")
        logger.warning("Checkpoint %s is written with %s (recorded under 'nonfinite_statistics')", path, what)
        data["nonfinite_statistics"] = bad
    atomic_write(path, lambda f: torch.save(data, f))
    return bad
