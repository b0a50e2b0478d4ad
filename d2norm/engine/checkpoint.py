"""Loading d2norm checkpoints for inference: a checkpoint written after the FrozenBN switch (rethinking §4.3)
holds FrozenBN layers, so the freshly built model is converted the same way before its weights are loaded."""
from detectron2.checkpoint import DetectionCheckpointer

from ..layers.frozen import freeze_bn_layers

__all__ = ["InferenceCheckpointer", "prepare_model_for_checkpoint"]

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
