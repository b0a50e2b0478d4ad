"""What every d2norm normalization layer shares."""
import contextlib
import functools
import logging
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..moments import empty_passthrough, stat_dtype
from ..options import Number, Option, bind_options, class_options, declare_node, options_from_config
from ..utils.validation import check_int

__all__ = [
    "D2NormModule",
    "D2NormBatchNorm2d",
    "FrozenBNState",
    "stat_dtype",
    "autocast_off",
    "empty_passthrough",
    "check_input_channels",
    "OWN_STATS_NOTE",
    "bn_frozen_state",
    "bn_estimated_stats",
    "NotAnAffine",
    "affine_from_stats",
    "bn_inference_affine",
    "BN_EPS",
    "BN_MOMENTUM",
    "fill_missing_num_batches_tracked",
    "skip_nonfinite_stats",
    "undo_nonfinite_update_",
    "nonfinite_skip_counts",
    "nonfinite_statistics",
    "NONFINITE_COUNTER",
]

logger = logging.getLogger(__name__)


#: BN's options shared by every BN-derived layer (same meaning as torch's BatchNorm2d arguments)
BN_EPS = Option("EPS", 1e-5, "eps added to the variance (torch's BatchNorm2d eps).", arg="eps",
                check=Number(0, low_open=True), node="BN")
BN_MOMENTUM = Option(
    "MOMENTUM", 0.1, "EMA momentum in torch's convention (running = (1 - m) * running + m * batch; None = "
    "cumulative average); detectron2's BN uses 0.1.", arg="momentum",
    check=Number(0, 1, allow_none=True, note=" (torch convention; None = cumulative average)"), node="BN")


class D2NormModule:
    """The protocol of d2norm normalization layers: everything other modules need to know about a layer is
    asked of the layer, and each layer answers in its own file.

    * Their affine parameters (γ, β) are norm parameters: ``SOLVER.WEIGHT_DECAY_NORM`` applies to them
      (four-things §3.3; see :func:`d2norm.solver.get_optimizer_params`), even for layers that are not
      subclasses of torch's norm classes.
    * Parameters named in :attr:`no_weight_decay` (e.g. EvalNorm's α̂, β̂) get no weight decay at all.
    * :meth:`from_config` (registry), :meth:`stats_adapter` (PreciseBN, BN monitor), :meth:`estimated_stats` and
      :meth:`stats_slot` (statistics probes), :meth:`frozen_bn_state` (FrozenBN switch), :meth:`inference_affine`
      (folding), :attr:`bn_state_keys` (``convert_norm``), :meth:`training_normalization_batch` (EvalNorm's 1/B²
      rule), :attr:`batch_statistics` / :meth:`cfg_normalization_images` (the BN doctor). Modules that are not
      d2norm layers (torch's and detectron2's norms) are handled by each consumer's default for them.
    """

    #: names of direct parameters of this module that must never be weight-decayed
    no_weight_decay: Tuple[str, ...] = ()
    #: names of direct parameters / buffers a checkpoint may lack because their initial value is meaningful (e.g.
    #: EvalNorm's α̂, β̂ when a BN checkpoint is loaded); checkpoint-fit checks do not count them as missing and
    #: d2norm's checkpointer reports them in one line for all layers
    optional_state: Tuple[str, ...] = ()
    #: state-dict keys of a torch BN / detectron2 FrozenBN that mean the same in this layer: what ``convert_norm``
    #: carries over (a per-channel tensor is repeated over a leading per-domain dimension); the rest is reported
    bn_state_keys: Tuple[str, ...] = ("weight", "bias")
    #: the loss key under which a model adds this layer's auxiliary loss (a loss that trains only the layer's own
    #: estimator parameters, e.g. EvalNorm's eq 9), or ``None``; the trainer logs such terms apart from
    #: ``total_loss`` (:func:`d2norm.layers.protocol.aux_loss_keys`)
    aux_loss_key: Optional[str] = None
    #: the methods through which a model feeds this layer, with their calling convention: ``"input"`` =
    #: ``f(x, *args, **kwargs)``, ``"inputs_by_domain"`` = ``f(xs, domains=None)`` (DomainBN's
    #: ``forward_domains``). Statistics passes (PreciseBN, probes, the BN monitor) intercept exactly these.
    routed_calls: Tuple[Tuple[str, str], ...] = (("forward", "input"),)
    #: how the layer groups the examples of its training batch statistics: ``"process"`` (the images of one
    #: process, or a part of them), ``"synced"`` (those of several processes), or ``None`` (no batch statistics
    #: in training, or statistics built for small batches: MABN's moving averages, BRN's renormalization, BGN's
    #: example groups). The BN doctor's small-normalization-batch and head checks read it (rethinking §4, §5.2, §6).
    batch_statistics: Optional[str] = None

    #: the layer's cfg node ``cfg.D2NORM.<CFG_NODE>`` (its options without a ``node`` of their own live there)
    CFG_NODE: Optional[str] = None
    #: the layer's options (:class:`d2norm.options.Option`), declared once: the cfg node and its defaults,
    #: :meth:`from_config`, the constructor defaults and the constructor checks all come from here. Inherited
    #: (``D2NormBatchNorm2d`` declares BN's ``eps``/``momentum``); a subclass re-declaring an argument wins.
    OPTIONS: Tuple[Option, ...] = ()
    #: one line on the node for the generated option reference (the layer's name and paper sections)
    CFG_DOC: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("OPTIONS", ())
        by_node: Dict[str, list] = {}
        for o in own:
            node = o.node or cls.__dict__.get("CFG_NODE")
            if node is None:
                raise TypeError(f"{cls.__qualname__}: option {o.key} has no node (set CFG_NODE or Option.node)")
            by_node.setdefault(node, []).append(o)
        if "CFG_NODE" in cls.__dict__ and cls.CFG_NODE not in by_node:
            by_node[cls.CFG_NODE] = []
        for node, opts in by_node.items():
            declare_node(node, opts, doc=cls.__dict__.get("CFG_DOC", "") if node == cls.__dict__.get("CFG_NODE") else "",
                         owner=cls.__name__)
        bind_options(cls)

    @classmethod
    def from_config(cls, cfg, channels: int) -> dict:
        """Constructor keyword arguments (the channel count included) read from ``cfg.D2NORM``: one per declared
        option with a constructor argument (:attr:`OPTIONS`)."""
        if not any(o.arg for _, o in class_options(cls).values()):
            raise NotImplementedError(f"{cls.__qualname__} has no cfg options (not a registered norm)")
        return options_from_config(cls, cfg, channels)

    @classmethod
    def check_cfg_use(cls, cfg, keys: List[str], world: int) -> None:
        """This layer's setup rule, run by :func:`d2norm.layers.cfg_checks.check_norm_cfg` before anything is built
        when the layer's name is in the ``NORM`` keys ``keys`` of ``cfg`` (a training of ``world`` processes):
        a ValueError naming the keys for a use that cannot work, :func:`~d2norm.layers.cfg_checks.warn_once` for
        one that silently does not do what the name says. Default: nothing to check."""

    def stats_adapter(self):
        """The :class:`~d2norm.stats.adapters.StatsAdapter` that recomputes this layer's population statistics
        (PreciseBN, rethinking §3.2) and reads them for the BN monitor, or ``None`` when the layer holds none
        to recompute. Asked only of layers in training mode."""
        return None

    def estimated_stats(self) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """The layer's estimated population (mean, variance in ``running_var``'s convention) per slot, float64
        copies, or ``None`` when it holds no such pair (statistics probes, estimation-shift Def. 1)."""
        return None

    def stats_slot(self, *args, **kwargs) -> int:
        """The slot of :meth:`estimated_stats` that a ``forward(x, *args, **kwargs)`` call addresses."""
        return 0

    def frozen_bn_state(self) -> Optional["FrozenBNState"]:
        """The FrozenBN (rethinking §4.3) that replaces this layer in the FrozenBN switch; ``None`` when the
        layer is a constant map already; :class:`NotAnAffine` with the reason when it has none."""
        raise NotAnAffine(f"{type(self).__name__} has no FrozenBN equivalent")

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        """``None`` when this layer's inference can be replaced by one that mixes each sample's own statistics
        with the population statistics: four-things §3.1 eq 3 (``ExampleWeightedBN``) and evalnorm eqs 5-6
        (``EvalNorm``), which ``tools/tune_example_weight.py`` and ``tools/fit_evalnorm.py`` convert it to. That
        needs a layer trained with per-channel batch statistics whose inference is BN with per-channel population
        statistics (its BN state carries over). Otherwise the reason it cannot be converted."""
        return f"{type(self).__name__} has no per-channel BN population statistics to mix sample statistics with"

    @classmethod
    def cfg_normalization_images(cls, cfg, images_per_process: int, world: int) -> Optional[int]:
        """Images one training normalization group of this layer holds for ``cfg`` in a run of ``world``
        processes with ``images_per_process`` each (``None`` when :attr:`batch_statistics` is ``None``); layers
        with sub-batches or sync groups override it (GhostBN, AnySyncBN)."""
        return normalization_images(cls.batch_statistics, images_per_process, world)

    def training_normalization_batch(self) -> Optional[int]:
        """The number of examples one training statistic of this layer is computed over when the layer fixes
        it (GhostBN: its ghost size, four-things eq 4), or ``None`` when it is the per-process training batch.
        The B of EvalNorm's 1/B² rule (evalnorm §3.3) and of its offline fit batch (§3.4)."""
        return None

    def training_sub_batches(self, n: int) -> Optional[List[int]]:
        """The sizes of the contiguous sub-batches a training call on ``n`` examples normalizes separately
        (GhostBN: its ghost batches), or ``None`` when one call is one normalization batch. The BN monitor and
        the BN doctor take a layer's batch statistics over these (what the layer trains with)."""
        return None

    def inference_affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)``, float tensors of shape (C,), such that the eval-mode forward of this layer is
        ``x * scale[None, :, None, None] + shift[None, :, None, None]`` for every input, or raise
        :class:`NotAnAffine` saying why not (e.g. inference uses the input's own statistics).

        Used to fold the layer into the preceding convolution for deployment (:mod:`d2norm.deploy`). Each layer
        overrides it; the default says the layer has not declared its inference to be an affine map. Computed
        from the current buffers/parameters (detached); the float dtype of the layer's statistics.
        """
        raise NotAnAffine(f"{type(self).__name__} does not declare its inference as a fixed affine map")


class NotAnAffine(Exception):
    """Raised by ``inference_affine()`` of a layer whose inference is not a fixed per-channel affine map; the
    message says why (e.g. "inference uses each sample's own statistics")."""


class FrozenBNState(NamedTuple):
    """What a FrozenBN ``y = (x − μ)/sqrt(σ² + ε)·γ + β`` takes from a layer (rethinking §4.3). ``weight`` and
    ``bias`` are the layer's own ``nn.Parameter`` objects where it has per-channel ones (so an optimizer holding
    them stays valid), ``None`` without affine. ``note`` says how the FrozenBN's output differs from the layer's
    eval output ("" when equal)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    note: str = ""


#: FrozenBN note of the layers whose inference uses each input's own statistics
OWN_STATS_NOTE = (
    "inference used the input's own statistics; FrozenBN uses its population statistics (plain BN inference)"
)


def bn_frozen_state(m: nn.Module) -> FrozenBNState:
    """:class:`FrozenBNState` of a torch-``_BatchNorm``-like layer: μ = ``running_mean``, σ² = ``running_var``,
    same ε, γ, β; :class:`NotAnAffine` without population statistics."""
    if not getattr(m, "track_running_stats", True) or m.running_mean is None or m.running_var is None:
        raise NotAnAffine("no population statistics (track_running_stats=False)")
    return FrozenBNState(m.running_mean.detach(), m.running_var.detach(), m.eps, m.weight, m.bias)


def bn_estimated_stats(m: nn.Module) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """``[(running_mean, running_var)]`` (float64 copies) of a BN-like layer, ``None`` when it keeps none."""
    if not getattr(m, "track_running_stats", True) or getattr(m, "running_mean", None) is None:
        return None
    return [(m.running_mean.detach().double().clone(), m.running_var.detach().double().clone())]


def affine_from_stats(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalization with fixed statistics as an affine map: ``scale = γ / sqrt(σ² + ε)``,
    ``shift = β − μ·scale`` (rethinking §4.3: with population statistics BN "is merely a constant affine
    transform"). ``weight``/``bias`` None = no affine (γ = 1, β = 0). Detached, in the statistics' float dtype
    (float32 at least)."""
    sd = stat_dtype(var.dtype) if var.is_floating_point() else torch.float32
    scale = torch.rsqrt(var.detach().to(sd) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(sd)
    shift = -mean.detach().to(sd) * scale
    if bias is not None:
        shift = shift + bias.detach().to(sd)
    return scale, shift


def bn_inference_affine(m: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``inference_affine`` of a torch-``_BatchNorm``-like layer whose eval uses its population statistics
    ``running_mean``/``running_var``; :class:`NotAnAffine` when it keeps none (``track_running_stats=False``:
    eval then normalizes with the batch's statistics)."""
    if not getattr(m, "track_running_stats", True) or m.running_mean is None or m.running_var is None:
        raise NotAnAffine(
            f"{type(m).__name__}: no population statistics (track_running_stats=False), eval uses batch statistics"
        )
    return affine_from_stats(m.running_mean, m.running_var, m.eps, m.weight, m.bias)


def normalization_images(batch_statistics: Optional[str], images_per_process: int, world: int) -> Optional[int]:
    """Images per training normalization group of a layer whose batch statistics are grouped as
    ``batch_statistics`` (:attr:`D2NormModule.batch_statistics`)."""
    if batch_statistics not in (None, "process", "synced"):
        raise ValueError(f"batch_statistics must be 'process', 'synced' or None, got {batch_statistics!r}")
    if batch_statistics is None:
        return None
    return images_per_process * (world if batch_statistics == "synced" else 1)


class D2NormBatchNorm2d(nn.BatchNorm2d, D2NormModule):
    """Base of the d2norm layers derived from ``nn.BatchNorm2d`` (GhostBN, BatchStatsBN, ExampleWeightedBN,
    EvalNorm, DomainBN, AnySyncBN): what they share with BN lives here once.

    * Options: torch's (``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``),
      ``eps``/``momentum`` declared once as ``D2NORM.BN.{EPS, MOMENTUM}`` (:data:`BN_EPS`, :data:`BN_MOMENTUM`).
    * Checkpoints: BN's state dict; a detectron2 ``FrozenBatchNorm2d`` state (no ``num_batches_tracked``) loads
      strictly (:func:`fill_missing_num_batches_tracked`).
    * Inference: population statistics ``running_mean``/``running_var`` (subclasses whose eval differs
      override :meth:`inference_affine`).
    """

    CFG_NODE = "BN"
    CFG_DOC = "Shared by every BN-derived layer (same meaning as torch's BatchNorm2d eps / momentum)"
    batch_statistics = "process"
    OPTIONS = (BN_EPS, BN_MOMENTUM)

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: Optional[float],
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        check_int(f"{type(self).__name__}: num_features", num_features, minimum=1)
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            device=device, dtype=dtype,
        )

    bn_state_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0 and self.training:
            # An empty batch has no statistics: zero-size output, buffers untouched and the batch not counted.
            # torch's BatchNorm2d counts it in num_batches_tracked, which with momentum=None (cumulative average)
            # then weighs the later batches as if it had been one; every d2norm layer leaves it out.
            return empty_passthrough(x, self.weight, self.bias)
        return super().forward(x)

    def inference_affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval with the population statistics (= BN inference, rethinking §4.3): a fixed affine map."""
        return bn_inference_affine(self)

    def stats_adapter(self):
        """BN's population statistics (mean, unbiased variance per channel): torch's BN adapter."""
        from ..stats.adapters import BatchNormAdapter

        return BatchNormAdapter(self) if BatchNormAdapter.applies(self) else None

    def estimated_stats(self):
        return bn_estimated_stats(self)

    def frozen_bn_state(self) -> FrozenBNState:
        return bn_frozen_state(self)

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        """BN-derived: trained with batch statistics (GhostBN's ghost batches, AnySyncBN's synced batches,
        ...), inference with BN's population statistics: convertible (``None``)."""
        if not self.track_running_stats:
            return f"{type(self).__name__} without running statistics (track_running_stats=False)"
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fill_missing_num_batches_tracked(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def autocast_off(device: torch.device):
    """A context with autocast disabled for ``device``'s type, for statistics computed in :func:`stat_dtype`
    under AMP (autocast would run some reductions, e.g. ``torch.linalg.vecdot``, in half precision); a no-op for
    device types without autocast (``meta``)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def check_input_channels(layer: str, x: torch.Tensor, channels: int) -> None:
    """ValueError unless ``x`` is ``(N, channels, *)``."""
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(f"{layer} expects input (N, {channels}, *), got shape {tuple(x.shape)}")


def fill_missing_num_batches_tracked(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Let a checkpoint without ``num_batches_tracked`` (detectron2's ``FrozenBatchNorm2d``) load strictly.

    ``FrozenBatchNorm2d`` stores weight, bias, running_mean and running_var only, with state-dict version 3,
    so torch's BN loader (which fills the counter only for versions < 2) would report it missing. The counter
    cannot be mapped from such a checkpoint: we keep the module's current value and say so with a warning. It
    only matters with ``momentum=None`` (cumulative average), where it weights the next EMA update.
    Only acts when the checkpoint holds this module's ``running_mean`` (a partial checkpoint that lacks the
    module entirely is still reported as missing by torch).
    """
    key = prefix + "num_batches_tracked"
    nbt = getattr(module, "num_batches_tracked", None)
    if nbt is None or key in state_dict or (prefix + "running_mean") not in state_dict:
        return
    state_dict[key] = nbt.detach().clone()
    logger.warning(
        "%s: checkpoint has no %r (e.g. a FrozenBatchNorm2d checkpoint); keeping the current value %s. "
        "It only affects EMA updates when momentum is None.",
        type(module).__name__,
        key,
        nbt.tolist(),
    )


# ---- non-finite batch statistics -----------------------------------------------------------------------------
#: attribute (a 0-dim long tensor, not in the state dict) counting the training updates a layer skipped
NONFINITE_COUNTER = "nonfinite_skips"


@torch.no_grad()
def undo_nonfinite_update_(new: Sequence[torch.Tensor], old: Sequence[torch.Tensor]) -> torch.Tensor:
    """Undo an in-place update of the tensors ``new`` (whose values before it were ``old``) when it turned a
    finite floating value non-finite; returns that decision as a 0-dim bool tensor on their device.

    The rule of every d2norm layer: a batch whose statistics contain a NaN/Inf (one bad element is enough)
    would leave the moving statistics of that channel non-finite for good (an EMA never forgets a NaN, even
    with momentum 0, since NaN·0 = NaN). Such an update is skipped as a whole — every tensor of the layer's
    state, counters included, keeps its old value, so the layer ends exactly as if the batch had not been
    seen. Values that were already non-finite before (e.g. a bad checkpoint) do not block later updates.
    On an accelerator the decision stays on the device (``torch.where``, no host synchronization); on the
    CPU, where reading it is free, the restore only runs when needed.
    """
    floats = [(n, o) for n, o in zip(new, old) if n.is_floating_point()]
    if not floats:
        return torch.zeros((), dtype=torch.bool)
    if all(n.device.type == "cpu" for n, _ in floats):
        # CPU fast path (per-layer overhead of every training forward): a float64 sum of the new values is
        # finite iff all of them are (a NaN/Inf element makes it NaN/Inf; float32 values cannot overflow it),
        # one reduction per tensor instead of two isfinite masks. A non-finite sum (also an overflow of float64
        # values ~1e308) falls through to the exact rule below.
        if math.isfinite(sum(float(n.sum(dtype=torch.float64)) for n, _ in floats)):
            return torch.zeros((), dtype=torch.bool)
    if len(floats) == 1:
        fn, fo = floats[0]
    else:  # one check for all statistics of the layer
        fn = torch.cat([n.reshape(-1) for n, _ in floats])
        fo = torch.cat([o.reshape(-1) for _, o in floats])
    bad = (torch.isfinite(fo) > torch.isfinite(fn)).any()  # finite before, not after
    if bad.device.type == "cpu" and not bool(bad):
        return bad
    for n, o in zip(new, old):
        # Through .data: the version counter stays. torch's BN kernels hand the running buffers to their
        # backward (which reads them only in eval mode), so a version bump would fail autograd's check.
        n.data.copy_(torch.where(bad, o, n) if bad.device.type != "cpu" else o)
    return bad


def _state_buffers(module: nn.Module):
    return [b for b in module.buffers(recurse=False) if b is not None]


def _count_skip(module: nn.Module, bad: torch.Tensor) -> None:
    # A plain tensor attribute, not a buffer: the state dict and the buffer set stay those of the layer.
    # It follows the statistics' device (moved here once when the model was moved).
    counter = getattr(module, NONFINITE_COUNTER, None)
    if counter is None or counter.device != bad.device:
        counter = torch.zeros((), dtype=torch.long, device=bad.device) if counter is None else counter.to(bad.device)
        setattr(module, NONFINITE_COUNTER, counter)
    if bad.device.type != "cpu" or bool(bad):  # on CPU reading it is free: no add for a clean step
        counter.add_(bad.to(counter.dtype))
    # The warning needs the decision on the host: free on CPU; on an accelerator it would stall every layer's
    # forward, so there the count is reported by nonfinite_skip_counts() (the trainer does it each iteration).
    if bad.device.type == "cpu" and bool(bad):
        logger.warning(
            "%s: non-finite batch statistics (NaN/Inf in its training input); this update of its moving "
            "statistics was skipped (%d skipped so far)",
            _describe(module),
            int(counter),
        )


def _describe(module: nn.Module) -> str:
    name = getattr(module, "_d2norm_name", None)
    return f"{type(module).__name__} {name!r}" if name else f"{type(module).__name__}({module.extra_repr()})"


def skip_nonfinite_stats(method):
    """Decorator for the training forward of a normalization layer: when the call would make the layer's
    moving statistics non-finite, every buffer of the layer keeps its value (:func:`undo_nonfinite_update_`),
    the layer's ``nonfinite_skips`` counter (a 0-dim tensor attribute) is incremented and a warning names the
    layer. Eval calls and calls nested inside an already guarded call of the same layer pass straight through."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.training or getattr(self, "_d2norm_guarded", False):
            return method(self, *args, **kwargs)
        bufs = _state_buffers(self)
        old = [b.detach().clone() for b in bufs]
        self._d2norm_guarded = True
        try:
            out = method(self, *args, **kwargs)
        finally:
            self._d2norm_guarded = False
        if bufs:
            _count_skip(self, undo_nonfinite_update_(bufs, old))
        return out

    return wrapper


def nonfinite_skip_counts(model: nn.Module) -> Dict[str, int]:
    """``{module name: skipped updates}`` of every layer of ``model`` that skipped at least one update because
    of non-finite batch statistics (one host synchronization for the whole model)."""
    named = [(n, getattr(m, NONFINITE_COUNTER)) for n, m in model.named_modules()
             if isinstance(getattr(m, NONFINITE_COUNTER, None), torch.Tensor)]
    if not named:
        return {}
    counts = torch.stack([c.to(named[0][1].device) for _, c in named]).tolist()
    return {n: int(c) for (n, _), c in zip(named, counts) if c}


@torch.no_grad()
def nonfinite_statistics(model: nn.Module) -> Dict[str, List[str]]:
    """``{module name: [buffer names]}`` of every floating buffer of ``model`` (its normalization statistics,
    e.g. ``running_var``, MABN's ``running_chi``) that holds a NaN/Inf; ``{}`` when all are finite."""
    bad: Dict[str, List[str]] = {}
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and not bool(torch.isfinite(b).all()):
                bad.setdefault(mname or "<model>", []).append(bname)
    return bad
