"""Observe the inputs of a model's BN layers without changing the model: the data behind rethinking Fig. 2 and
the expected population statistics of estimation-shift Def. 1.

* :func:`expected_population_stats` — estimation-shift §4.1, Def. 1: the *expected* population statistics
  {μ̃, σ̃²} of a BN layer are the mean and variance of its input X = F̃^pre(S') when the trained model runs on
  the test set S' **as it is used at test time** (every earlier BN normalizing with its estimated statistics,
  so an estimation shift in a lower layer changes the input of the upper ones: the accumulation of §4.2.1).
  The model is forwarded in eval mode; each layer's per-channel moments are merged over all calls with eq 2
  (:class:`~d2norm.stats.estimators.MomentAccumulator`, float64).
* :func:`batch_statistics` — rethinking §3.1, Fig. 2: a checkpoint is forwarded "under training mode" on
  ``num_batches`` mini-batches; per layer, the mean/variance of the layer's input in each mini-batch (the batch
  statistics the checkpoint's BN would normalize with), next to its EMA (``running_mean``/``running_var``).
  The Fig. 2 "population mean" is the simple average of the batch means (the caption's approximation); the
  eq-2 statistics of all batches are returned too. Nothing in the model changes (rethinking A.10: buffers and
  module attributes restored, RNG streams isolated, event-storage writes discarded).

Layers observed (:func:`probed_layers`): every module holding ``running_mean``/``running_var`` — torch's BN
family and every BN-derived d2norm layer (GhostBN, BatchStatsBN, ExampleWeightedBN, EvalNorm, AnySyncBN, ...),
d2norm's DomainBN (one *slot* per domain when its population statistics are per domain: the RetinaNet
per-level layout of rethinking Table 5 rows 2, 4, 6) and detectron2's ``FrozenBatchNorm2d`` (fixed, e.g.
pre-trained, statistics). Layers without a (mean, variance) pair (MABN's χ̂, BGN's per-group moments) are not
observed. A layer called several times per forward (a shared head over FPN levels) contributes every call; in
:func:`batch_statistics` the calls of one forward are merged into that forward's batch statistics.
"""
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.protocol import norm_protocol
from ..utils.comm import local_only
from ..utils.validation import check_int
from .estimators import MomentAccumulator, PopulationEstimate, batch_moments
from .state import patched_instance_attrs
from .passes import discarded_event_storage, isolated_rng, rebatch, unwrap_model
from .state import capture_state, restore_state

__all__ = [
    "probed_layers",
    "num_slots",
    "estimated_stats",
    "ExpectedStats",
    "expected_population_stats",
    "BatchStats",
    "batch_statistics",
]


def _estimated(m: nn.Module) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """(μ̂, σ̂²) per slot of a layer, or None (protocol dispatch: d2norm layers answer themselves)."""
    view = norm_protocol(m)
    return None if view is None else view.estimated_stats()


def probed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every layer with a (running_mean, running_var) pair, in module order."""
    return {name: m for name, m in unwrap_model(model).named_modules() if _estimated(m) is not None}


def num_slots(m: nn.Module) -> int:
    """Sets of population statistics the layer holds (K for a per-domain DomainBN, else 1)."""
    return len(_estimated(m))


@torch.no_grad()
def estimated_stats(m: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The layer's estimated population statistics {μ̂, σ̂²} per slot, float64 (σ̂² = ``running_var``, the
    unbiased convention of torch's EMA)."""
    return _estimated(m)


def _slot(m: nn.Module, *args, **kwargs) -> int:
    return norm_protocol(m).stats_slot(*args, **kwargs)


# ---- call interception ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _intercept(layers: Dict[str, nn.Module], on_input: Callable[[str, int, torch.Tensor], None]):
    """Call ``on_input(name, slot, x)`` for every input of every layer (the calls its protocol declares,
    ``routed_calls``: ``forward``, DomainBN's ``forward_domains``), then run the layer unchanged. A layer's calls nested in its own call (e.g. a
    ``forward_domains`` implemented through ``forward``) are not counted twice."""
    active = set()

    def wrap_forward(name, m, orig):
        def forward(x, *args, **kwargs):
            if id(m) not in active:
                on_input(name, _slot(m, *args, **kwargs), x)
            active.add(id(m))
            try:
                return orig(x, *args, **kwargs)
            finally:
                active.discard(id(m))

        return forward

    def wrap_domains(name, m, orig):
        def forward_domains(xs, domains=None):
            xs = list(xs)
            if id(m) not in active:
                ks = list(domains) if domains is not None else list(range(len(xs)))
                for x, k in zip(xs, ks):
                    on_input(name, _slot(m, k), x)
            active.add(id(m))
            try:
                return orig(xs, domains)
            finally:
                active.discard(id(m))

        return forward_domains

    wraps = {"input": wrap_forward, "inputs_by_domain": wrap_domains}
    patches = [
        (m, attr, wraps[convention](name, m, getattr(m, attr)))
        for name, m in layers.items()
        for attr, convention in norm_protocol(m).routed_calls
        if hasattr(m, attr)
    ]
    with patched_instance_attrs(patches):
        yield


def _moments(x: torch.Tensor):
    return batch_moments(x, [0] + list(range(2, x.dim())))


@contextlib.contextmanager
def _flags(model: nn.Module, training: bool):
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers())).device


# ---- estimation-shift Def. 1 ------------------------------------------------------------------------------
@dataclass
class ExpectedStats:
    """Result of :func:`expected_population_stats`."""

    #: layer names in the order of their first call (depth order for a feed-forward model)
    order: List[str]
    #: ``{name: [estimate per slot]}`` (``None`` for a slot that saw no data)
    estimates: Dict[str, List[Optional[PopulationEstimate]]]
    num_samples: int = 0


@torch.no_grad()
def _select_layers(net: nn.Module, layers: Optional[Sequence[str]]) -> Dict[str, nn.Module]:
    """:func:`probed_layers` of ``net``, restricted to ``layers`` (ValueError naming unknown names)."""
    all_layers = probed_layers(net)
    if layers is None:
        return all_layers
    unknown = [n for n in layers if n not in all_layers]
    if unknown:
        raise ValueError(f"not BN layers with population statistics: {unknown}; valid: {list(all_layers)}")
    return {n: all_layers[n] for n in layers}


def expected_population_stats(
    model: nn.Module,
    data: Iterable,
    num_samples: Optional[int] = None,
    forward_fn: Optional[Callable] = None,
    layers: Optional[Sequence[str]] = None,
) -> ExpectedStats:
    """estimation-shift Def. 1: mean/variance of every observed layer's input over ``data`` (the test set S'),
    the model forwarded in eval mode (its train/eval flags are restored afterwards; eval never mutates state).

    Args:
        data: batches (list of samples, e.g. a detectron2 test loader, or a tensor batch); iterated once.
        num_samples: use the first ``num_samples`` samples; ``None`` = all of ``data``.
        layers: restrict to these layer names (default: :func:`probed_layers`).
    """
    net = unwrap_model(model)
    all_layers = _select_layers(net, layers)
    device = _device(net)
    accs = {n: [MomentAccumulator(m.num_features, device) for _ in range(num_slots(m))] for n, m in all_layers.items()}
    order: List[str] = []

    def on_input(name, slot, x):
        if name not in order:
            order.append(name)
        if x.numel():
            n, mean, var = _moments(x)
            accs[name][slot].add(n, mean, var)

    forward_fn = forward_fn or (lambda m, b: m(b))
    total = num_samples if num_samples is not None else float("inf")
    seen = 0
    with _flags(net, False), _intercept(all_layers, on_input):
        for batch in rebatch(iter(data), total, None) if num_samples is not None else data:
            forward_fn(net, batch)
            seen += len(batch)
    order += [n for n in all_layers if n not in order]
    return ExpectedStats(order, {n: [a.estimate("population") for a in accs[n]] for n in all_layers}, seen)


# ---- rethinking Fig. 2 ------------------------------------------------------------------------------------
@dataclass
class BatchStats:
    """Per layer: the statistics of ``num_batches`` training-mode mini-batches and the EMA, float64.

    Shapes: ``batch_means`` / ``batch_vars`` (num_batches, slots, C) (biased batch variance, BN's training
    normalization), ``ema_mean`` / ``ema_var`` (slots, C). Slots that saw no data in a batch hold NaN.
    """

    batch_means: torch.Tensor
    batch_vars: torch.Tensor
    ema_mean: torch.Tensor
    ema_var: torch.Tensor
    #: eq 2 over all batches (the PreciseBN population statistics of these batches), per slot
    population: List[Optional[PopulationEstimate]] = field(default_factory=list)

    @property
    def mean_of_batch_means(self) -> torch.Tensor:
        """rethinking Fig. 2: "population mean is approximated by a simple average of 100 batch means"."""
        return torch.nanmean(self.batch_means, dim=0)


@torch.no_grad()
def batch_statistics(
    model: nn.Module,
    data: Iterable,
    num_batches: int,
    batch_size: Optional[int] = None,
    layers: Optional[Sequence[str]] = None,
    forward_fn: Optional[Callable] = None,
) -> Dict[str, BatchStats]:
    """rethinking Fig. 2 data: forward ``num_batches`` mini-batches of ``batch_size`` samples (``None``: the
    loader's batches) in training mode and record each observed layer's batch mean/variance per batch.

    The model is not changed: its EMA updates, counters and attributes are restored (A.10), as are its
    train/eval flags and the caller's RNG streams. For a detectron2 meta-architecture the batches need
    ``instances`` (a training loader).
    """
    check_int("num_batches", num_batches, minimum=1)
    net = unwrap_model(model)
    all_layers = _select_layers(net, layers)
    device = _device(net)
    ema = {n: estimated_stats(m) for n, m in all_layers.items()}
    pop = {n: [MomentAccumulator(m.num_features, device) for _ in range(num_slots(m))] for n, m in all_layers.items()}
    means = {n: [] for n in all_layers}
    var_s = {n: [] for n in all_layers}
    current: Dict[str, List[MomentAccumulator]] = {}

    def on_input(name, slot, x):
        if x.numel():
            n, mean, var = _moments(x)
            current[name][slot].add(n, mean, var)
            pop[name][slot].add(n, mean, var)

    forward_fn = forward_fn or (lambda m, b: m(b))
    snap = capture_state(net)
    done = 0
    try:
        with _flags(net, True), isolated_rng(), discarded_event_storage(), local_only(), \
                _intercept(all_layers, on_input):
            it = iter(data)
            total = num_batches * batch_size if batch_size else float("inf")
            for batch in rebatch(it, total, batch_size):
                if done == num_batches:
                    break
                for n, m in all_layers.items():
                    current[n] = [MomentAccumulator(m.num_features, device) for _ in range(num_slots(m))]
                forward_fn(net, batch)
                for n, m in all_layers.items():
                    ests = [a.estimate("population") for a in current[n]]
                    nan = torch.full((m.num_features,), float("nan"), dtype=torch.float64, device=device)
                    means[n].append(torch.stack([e.mean if e is not None else nan for e in ests]))
                    var_s[n].append(torch.stack([e.var_biased if e is not None else nan for e in ests]))
                done += 1
    finally:
        restore_state(net, snap)
    if done < num_batches:
        raise ValueError(f"batch_statistics: the data ran out after {done} of {num_batches} batches")
    out = {}
    for n in all_layers:
        out[n] = BatchStats(
            torch.stack(means[n]).cpu(), torch.stack(var_s[n]).cpu(),
            torch.stack([s[0] for s in ema[n]]).cpu(), torch.stack([s[1] for s in ema[n]]).cpu(),
            [a.estimate("population") for a in pop[n]],
        )
    return out
