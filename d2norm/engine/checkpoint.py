"""d2norm's checkpointer, for training and for inference: detectron2's ``DetectionCheckpointer`` that, before it
loads a checkpoint's model state, converts the model the way the training run had converted it when the checkpoint
was written. The one such conversion is the FrozenBN switch (rethinking §4.3): a checkpoint written after it holds
FrozenBN layers, recorded in the switch hook's state (``checkpoint["trainer"]["hooks"]``, where detectron2 keys each
hook's state by its class's ``__qualname__``; :meth:`FrozenBNSwitchHook.state_in` reads it)."""
import logging
import os
import tempfile
from typing import IO, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..layers.base import nonfinite_statistics
from ..layers.frozen import freeze_bn_layers

__all__ = ["D2NormCheckpointer", "atomic_write", "write_checkpoint", "NonFiniteCheckpointError"]

logger = logging.getLogger(__name__)


class D2NormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts the model before loading a checkpoint written after the FrozenBN
    switch.

    * Inference (``--eval-only``, tools): the model's BN layers named in the checkpoint are frozen
      (:func:`d2norm.layers.frozen.freeze_bn_layers`, same affine choice) and the weights load into them.
    * Training (:class:`d2norm.engine.Trainer`'s checkpointer): the :class:`FrozenBNSwitchHook` attached with
      :meth:`attach_frozen_bn_switch` converts the running trainer instead (model, optimizer, scheduler, DDP), so a
      resumed run continues with the optimizer state of the converted model.

    A checkpoint written before the switch (or without it) loads unchanged.
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: Optional[bool] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self._switch_hook = None
        self._switch_trainer = None

    def attach_frozen_bn_switch(self, trainer, hook) -> None:
        """Let ``hook`` (a :class:`FrozenBNSwitchHook` of ``trainer``) convert ``trainer`` before a post-switch
        checkpoint loads (resume, or ``MODEL.WEIGHTS`` of such a checkpoint)."""
        self._switch_hook, self._switch_trainer = hook, trainer

    def frozen_bn_switch_state(self, checkpoint) -> Optional[dict]:
        """The switch hook's state in ``checkpoint`` if it was written after the switch, else ``None``."""
        from .hooks.frozen_bn_switch import FrozenBNSwitchHook

        cls = type(self._switch_hook) if self._switch_hook is not None else FrozenBNSwitchHook
        state = cls.state_in(checkpoint)
        return state if state and state.get("switched") else None

    def prepare_model(self, checkpoint) -> bool:
        """Convert the model as the run had when ``checkpoint`` was written; True when a conversion was applied."""
        state = self.frozen_bn_switch_state(checkpoint)
        if state is None:
            return False
        hook = self._switch_hook
        if hook is None:
            freeze_bn_layers(self.model, bool(state.get("trainable_affine", True)), names=state.get("layers") or [])
            return True
        if hook.switched:
            return False
        hook.convert_for_checkpoint(self._switch_trainer, state)
        return True

    def _load_model(self, checkpoint):  # fvcore's extension point, overridden by DetectionCheckpointer too
        self.prepare_model(checkpoint)
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
