"""FrozenBN: normalization layers turned into constant affine transforms (rethinking §4.3, Fig. 6; A.8).

rethinking §4.3: "FrozenBN is merely a constant affine transform y = (x − μ)/sqrt(σ² + ε), where μ, σ are fixed
population statistics computed ahead of time"; in the Fig. 6 experiment the last 20 of 100 epochs are trained
with every BN replaced by FrozenBN, the affine γ, β following it still being trained (it is "the subsequent
affine transform"; freezing it too is the fine-tuning variant of the §4.4 paragraph and footnote 4).

:func:`freeze_bn_layers` replaces, in place, each layer whose inference is a per-channel affine map by

* :class:`FrozenBatchNorm` with ``trainable_affine=True``: the statistics are buffers, γ/β stay
  ``nn.Parameter``s — **the very same Parameter objects** as in the replaced layer, so an optimizer that holds
  them (and its momentum state) stays valid;
* detectron2's ``FrozenBatchNorm2d`` (statistics *and* γ/β buffers) with ``trainable_affine=False`` for
  ``nn.BatchNorm2d``-derived layers (4-D inputs), :class:`FrozenBatchNorm` with buffer γ/β for the others
  (``BatchNorm1d/3d``, ``SyncBatchNorm`` and MABN accept other ranks).

Both have the state-dict keys ``weight, bias, running_mean, running_var`` (those of BN without
``num_batches_tracked``), so checkpoints of either variant load into the other.

What each layer type becomes (each d2norm layer answers in its own ``frozen_bn_state``; the mapping keeps the
layer's population statistics; nothing is re-estimated here: run PreciseBN first for exact population
statistics, rethinking §3.2):

* torch ``_BatchNorm`` family (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, detectron2's ``NaiveSyncBatchNorm``),
  d2norm GhostBN and AnySyncBN: μ = ``running_mean``, σ² = ``running_var``, same ε. Exactly the layer's eval
  output.
* DomainBN with shared population statistics and shared affine: as BN (its state is BN's). With per-domain
  statistics or affine there is no single constant affine map (the domain picks the row at call time):
  **left unchanged** and reported as skipped.
* MABN (mabn §4.2): its inference z = γ·x/χ̂ + β is already a constant affine map; exactly
  μ = 0, σ² = χ̂² − ε with the layer's ε, so sqrt(σ² + ε) = χ̂ (``running_chi``). Exactly its eval output.
* BatchStatsBN (rethinking §4.2), ExampleWeightedBN (four-things §3.1) and EvalNorm (evalnorm §3.3): they
  train as BN and keep BN's EMA; their *inference* uses each input's own statistics, which is not a constant
  map. FrozenBN uses their population statistics (μ_E, σ_E²): after the switch training and inference are the
  same constant map, so the train-test inconsistency those inference rules correct no longer exists
  (rethinking §4.3: FrozenBN "no longer introduces train-test inconsistency"). EvalNorm's α̂, β̂ are dropped.
  Output then equals plain-BN inference of the layer (α = 0), not its own eval output; logged.
* BGN (four-things §3.4): its statistics are per channel *group* and its inference mixes in the example's own
  group statistics (eq 3, α > 0); it is a batch-*group* norm, not BN family: **left unchanged**, reported.
* already frozen layers (detectron2 ``FrozenBatchNorm2d``, :class:`FrozenBatchNorm`), BN without running
  statistics (``track_running_stats=False``: no population statistics to freeze; skipped, reported), and
  batch-free norms (GN, LN, ...) are not touched.
"""
import logging
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.validation import check_int, check_number
from .base import (
    D2NormModule, FrozenBNState, NotAnAffine, affine_from_stats, check_input_channels, empty_passthrough,
)
from .report import ConversionReport

__all__ = ["FrozenBatchNorm", "freeze_bn_layers", "frozen_bn_source"]

logger = logging.getLogger(__name__)


class FrozenBatchNorm(nn.Module, D2NormModule):
    """Constant per-channel affine map ``y = (x − μ)/sqrt(σ² + ε)·γ + β`` over inputs ``(N, C, *)``
    (rethinking §4.3).

    μ, σ² (``running_mean``, ``running_var``) are registered buffers that nothing updates. γ, β (``weight``,
    ``bias``) are ``nn.Parameter``s when ``trainable_affine`` (the §4.3 setting: FrozenBN followed by a
    trainable affine layer), else buffers (detectron2's ``FrozenBatchNorm2d`` semantics for any rank). Forward
    and eval are identical (``F.batch_norm`` with ``training=False``: exactly BN's eval output, one fused op);
    statistics stay float32 for fp16/bf16 inputs, output has the input dtype; zero-size input gives a
    zero-size output. A :class:`D2NormModule`, so ``SOLVER.WEIGHT_DECAY_NORM`` applies to trainable γ/β as it
    did to the BN they come from.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, trainable_affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_features = check_int("FrozenBatchNorm: num_features", num_features, minimum=1)
        self.eps = check_number("FrozenBatchNorm: eps", eps, low=0)
        self.trainable_affine = bool(trainable_affine)
        f = {"device": device, "dtype": dtype}
        if self.trainable_affine:
            self.weight = nn.Parameter(torch.ones(num_features, **f))
            self.bias = nn.Parameter(torch.zeros(num_features, **f))
        else:
            self.register_buffer("weight", torch.ones(num_features, **f))
            self.register_buffer("bias", torch.zeros(num_features, **f))
        self.register_buffer("running_mean", torch.zeros(num_features, **f))
        self.register_buffer("running_var", torch.ones(num_features, **f))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, trainable_affine={self.trainable_affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("FrozenBatchNorm", x, self.num_features)
        if x.numel() == 0:
            return empty_passthrough(x, self.weight, self.bias)
        sd = self.running_mean.dtype
        w, b = self.weight.to(sd), self.bias.to(sd)
        # training=False: supplied statistics, never updated; gradients flow to x, γ and β
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, False, 0.0, self.eps)

    def frozen_bn_state(self):
        return None  # frozen already

    def inference_affine(self):
        """A constant affine map by construction (rethinking §4.3)."""
        return affine_from_stats(self.running_mean, self.running_var, self.eps, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a BN checkpoint (same keys + num_batches_tracked) loads: the counter has no meaning here
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# ---- mapping -----------------------------------------------------------------------------------------------
def frozen_bn_source(m: nn.Module) -> Tuple[Optional[FrozenBNState], str]:
    """``(state, reason)``: the FrozenBN that replaces ``m`` (its protocol's ``frozen_bn_state``: a d2norm layer's
    own answer; torch's BN family: its population statistics), or ``(None, reason)`` when ``m`` is not converted
    (reason ``""`` for modules that are not normalization layers or are constant maps already)."""
    from .protocol import norm_protocol

    view = norm_protocol(m)
    if view is None:
        return None, ""
    try:
        return view.frozen_bn_state(), ""
    except NotAnAffine as e:
        return None, str(e)


def _make_frozen(m: nn.Module, mapping: FrozenBNState, trainable_affine: bool) -> nn.Module:
    from detectron2.layers import FrozenBatchNorm2d

    rm, rv, eps, w, b, _ = mapping
    c = rm.numel()
    ref = rm
    if trainable_affine and w is not None:
        new = FrozenBatchNorm(c, eps=eps, trainable_affine=True)
        # the same Parameter objects: optimizer references and momentum state stay valid
        new.weight, new.bias = w, b
    elif isinstance(m, nn.BatchNorm2d):
        new = FrozenBatchNorm2d(c, eps=eps)
    else:
        new = FrozenBatchNorm(c, eps=eps, trainable_affine=False)
    new.to(device=ref.device)
    with torch.no_grad():
        sd = rm.dtype if rm.is_floating_point() else torch.float32
        for name, val in (("running_mean", rm), ("running_var", rv)):
            setattr(new, name, val.detach().clone().to(sd))
        if not (trainable_affine and w is not None):
            new.weight = (w.detach().clone() if w is not None else torch.ones(c, device=ref.device)).to(sd)
            new.bias = (b.detach().clone() if b is not None else torch.zeros(c, device=ref.device)).to(sd)
    new.train(m.training)
    return new


def freeze_bn_layers(
    model: nn.Module,
    trainable_affine: bool = True,
    names: Optional[Iterable[str]] = None,
    name_filter: Optional[Callable[[str], bool]] = None,
) -> ConversionReport:
    """Replace every BN-family layer of ``model`` (in place) by its FrozenBN (module docstring).

    Args:
        model: the model (not a DDP wrapper: pass ``ddp.module``).
        trainable_affine: keep γ/β as the layer's own ``nn.Parameter`` objects (rethinking §4.3), else freeze
            them into buffers (detectron2 ``FrozenBatchNorm2d``).
        names: convert exactly these module names (e.g. a checkpoint's record of a previous switch); a name that
            is not a convertible layer raises ``ValueError``.
        name_filter: convert only names for which it returns True.

    Returns:
        a :class:`~d2norm.layers.report.ConversionReport` (``converted``: name -> former class, ``skipped``:
        name -> reason, ``notes``: layers whose eval behaviour differs from FrozenBN's). A module reachable under several names (shared) is converted once and replaced
        everywhere it is referenced.
    """
    wanted = None if names is None else set(names)
    report = ConversionReport(target="FrozenBN")
    replaced: Dict[int, nn.Module] = {}
    todo = []
    for name, m in model.named_modules(remove_duplicate=False):
        if name == "":
            continue
        if id(m) in replaced:
            continue
        if wanted is not None and name not in wanted:
            continue
        if name_filter is not None and not name_filter(name):
            continue
        mapping, reason = frozen_bn_source(m)
        if mapping is None:
            if reason:
                report.skipped[name] = reason
            continue
        new = _make_frozen(m, mapping, trainable_affine)
        replaced[id(m)] = new
        report.converted[name] = type(m).__name__
        if mapping.note:
            report.notes[name] = mapping.note
        todo.append(m)
    if wanted is not None:
        bad = sorted(wanted - set(report.converted))
        if bad:
            raise ValueError(f"freeze_bn_layers: cannot convert {bad} (not convertible BN-family layers of the model)")
    # replace every reference (shared modules: all parents)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[key] = replaced[id(child)]
    for name, reason in report.skipped.items():
        logger.warning("FrozenBN switch: %s left unchanged: %s", name, reason)
    if report.notes:
        logger.warning("FrozenBN switch: %d layers (%s, ...) change their eval behaviour: %s", len(report.notes),
                       next(iter(report.notes)), next(iter(report.notes.values())))
    return report
