"""One report type for everything that converts norm layers or loads a checkpoint into them: what changed, what
was left, and which state could not be carried (nothing is silently lost)."""
from dataclasses import dataclass, field
from typing import Dict, List

__all__ = ["ConversionReport"]


@dataclass
class ConversionReport:
    """What a conversion or a checkpoint load did to a model's norm layers, per module name.

    Produced by :func:`d2norm.layers.convert_norm`, :func:`d2norm.layers.frozen.freeze_bn_layers` (the FrozenBN
    switch), the EvalNorm-aware meta-architectures' ``load_state_dict`` (``model.evalnorm_load_report``) and the
    XBNBlock backbones' loads (:func:`d2norm.modeling.backbone.xbn_resnet.xbn_load_report`).
    """

    #: what the layers became / were loaded into (a registered norm name, ``"FrozenBN"``, ...)
    target: str
    #: module name -> class name of the module it replaced (conversions only)
    converted: Dict[str, str] = field(default_factory=dict)
    #: module name -> why it was left unchanged
    skipped: Dict[str, str] = field(default_factory=dict)
    #: module name -> a behaviour difference of the result worth knowing
    notes: Dict[str, str] = field(default_factory=dict)
    #: module name -> entries of the source state that the target could not take (name or shape differs)
    unmapped_source: Dict[str, List[str]] = field(default_factory=dict)
    #: module name -> entries of the target that the source did not provide (left at the target's init)
    uninitialized_target: Dict[str, List[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """Multi-line text for the log: counts, then every key kind with the modules it concerns."""
        lines = [f"{self.target}: {len(self.converted)} module(s) converted"]
        reasons: Dict[str, int] = {}
        for r in self.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines += [f"  left unchanged ({n}x): {r}" for r, n in sorted(reasons.items())]
        for kind, d in (("not mapped from source", self.unmapped_source), ("left at init", self.uninitialized_target)):
            keys = sorted({k for v in d.values() for k in v})
            if keys:
                lines.append(f"  {kind} in {len(d)} module(s): {', '.join(keys)}")
        return "\n".join(lines)
