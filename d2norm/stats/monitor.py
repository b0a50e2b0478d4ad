"""BN-statistics monitor: how far each layer's EMA is from the current model's statistics.

rethinking §3.1, Fig. 2: during training the EMA μ_EMA lags behind, and often falls outside the cloud of, the
mini-batch statistics μ_B that the *current* model produces; the population statistics of the current model are
approximated from a few batches. estimation-shift Def. 2: the estimation shift magnitude is the L2 norm of the
difference between the estimated (here: EMA) and the expected (here: the current model's population, on training
data) statistics, ESM_μ = ||μ̂ − μ̃||₂, ESM_σ = ||sqrt(σ̂²) − sqrt(σ̃²)||₂.

:func:`bn_statistics_gaps` forwards ``num_batches`` batches through the model in training mode with the
population-statistics adapters of :mod:`.adapters` (each layer normalizes with the statistics of the call's own
input, i.e. the current model's batch statistics, and writes nothing), restoring every buffer, module attribute
and RNG stream afterwards (the same isolation as PreciseBN, rethinking A.10). Per layer (all rows of the layer:
channels; channel groups for BGN; every domain's row for a per-domain DomainBN, concatenated):

* ``mean_gap``  = ||μ_EMA − μ_pop||₂                   (ESM_μ of Def. 2)
* ``std_gap``   = ||σ_EMA − σ_pop||₂                   (ESM_σ of Def. 2)
* ``batch_mean_gap`` = mean_b ||μ_EMA − μ_b||₂,  ``batch_std_gap`` = mean_b ||σ_EMA − σ_b||₂
  (EMA vs the current model's mini-batch statistics, Fig. 2 red vs blue);
* ``batch_mean_spread`` = mean_b ||μ_b − μ_pop||₂, ``batch_std_spread`` = mean_b ||σ_b − σ_pop||₂ (the spread
  of the mini-batch statistics themselves: an EMA gap far above it is the "EMA falls out of the distribution
  of mini-batch statistics" of Fig. 2);
* ``moving_std_gap``, only for a layer whose training forward normalizes with moving statistics (MABN, mabn
  eq 19: the SMA of its last m batches' χ²; the adapter's ``training_moving_stats``): ||σ_moving − σ_pop||₂ --
  how far the statistics it *trains* with lag the current model's population (an SMA of m batches of the
  current model would be ~``batch_std_spread``/√m from it).

μ_pop, σ²_pop: eq 2 over the monitored batches (all ranks' batches, all-reduced, when distributed), μ_b, σ²_b:
the moments of everything one forward fed the layer (a layer called several times per forward, e.g. a shared
head, pools its calls, count-weighted) -- except for a layer that trains on fixed sub-batches (the layer
protocol's ``training_sub_batches``: GhostBN's ghost batches of G examples, four-things §3.2): the pass replays
its training forward (each sub-batch normalized by its own statistics, so later layers see what they see in
training, and μ_pop is the population of the training forward, which the layer's EMA estimates) and b runs over
the sub-batches of each call (``normalization_batch`` = G in its result).

Which σ each layer type compares, matching what its EMA estimates:

* BN family (GhostBN, EvalNorm, AnySyncBN, DomainBN, ...): σ = sqrt(unbiased variance) (torch's
  ``running_var``);
* BGN: σ = sqrt(E[x²] − E[x]²) per channel group (its ``running_var``);
* MABN: no mean (``mean_*`` not reported); σ is χ = sqrt(E[x²] + ε) (``running_chi``, mabn eq 15).
"""
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..layers.protocol import norm_protocol
from ..utils.validation import check_int
from .estimators import MomentAccumulator, all_reduce_accumulators_
from .passes import discarded_event_storage, isolated_rng, routed_to_adapters, unwrap_model
from .precise_bn import population_stat_layers
from .state import capture_state, restore_state

__all__ = ["bn_statistics_gaps", "MONITOR_METRICS", "select_layers"]

MONITOR_METRICS = (
    "mean_gap", "std_gap", "batch_mean_gap", "batch_std_gap", "batch_mean_spread", "batch_std_spread",
)


def select_layers(names: Iterable[str], patterns: Sequence[str]) -> List[str]:
    """Names matching any regular expression in ``patterns`` (``re.search``); all names when empty."""
    names = list(names)
    if not patterns:
        return names
    compiled = [re.compile(p) for p in patterns]
    return [n for n in names if any(c.search(n) for c in compiled)]


def _norm(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat(a) - torch.cat(b)))


@torch.no_grad()
def bn_statistics_gaps(
    model: nn.Module,
    data: Iterable,
    num_batches: int,
    layers: Sequence[str] = (),
    group=None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> Dict[str, Dict[str, float]]:
    """``{layer name: {metric: value}}`` (metrics of the module docstring) for the layers with population
    statistics in training mode whose names match ``layers`` (regular expressions; all when empty).

    ``data`` is iterated for ``num_batches`` batches (pass a persistent iterator to see new data each time).
    Nothing in the model changes (buffers, attributes, RNG streams restored; event-storage writes discarded).
    Distributed: every rank must call it (the population moments are all-reduced: two collectives); the batch
    metrics average this rank's batches. Layers that saw no data are left out.
    """
    check_int("BN monitor: num_batches", num_batches, minimum=1)
    net = unwrap_model(model)
    forward_fn = forward_fn or (lambda m, b: m(b))
    every = population_stat_layers(net)
    names = select_layers(every.keys(), layers)
    adapters = {n: every[n] for n in names}
    if not adapters:
        return {}
    device = next(iter(net.parameters()), torch.zeros(())).device
    pops = {n: [MomentAccumulator(a.rows, device) for _ in range(a.num_slots)] for n, a in adapters.items()}
    batch_stats: Dict[str, List[List[Optional[tuple]]]] = {n: [] for n in adapters}

    protocols = {n: norm_protocol(a.module) for n, a in adapters.items()}
    snap = capture_state(net)
    it = iter(data)
    try:
        with isolated_rng(), discarded_event_storage(), routed_to_adapters(adapters):
            for _ in range(num_batches):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                for n, a in adapters.items():
                    a.begin_pass(device)  # one pass per batch: its own statistics
                    a.state.sub_batches = protocols[n].training_sub_batches
                forward_fn(net, batch)
                for n, a in adapters.items():
                    per_slot = []
                    for slot, acc in enumerate(a.state.accs):
                        est = acc.estimate("population")
                        per_slot.append(None if est is None else a.comparable_stats(est))
                        if est is not None:  # merge the whole forward as one batch (exact, Chan)
                            pops[n][slot].add(int(est.count), est.mean, est.var_biased)
                    if a.state.sub_batch_moments:  # each sub-batch the layer trains on is one batch b
                        batch_stats[n].extend(_sub_batch_stats(a, device))
                    else:
                        batch_stats[n].append(per_slot)
    finally:
        restore_state(net, snap)
        for a in adapters.values():
            a.end_pass()

    all_reduce_accumulators_([acc for n in adapters for acc in pops[n]], group)
    result_extra = {n: {"normalization_batch": p.training_normalization_batch()} for n, p in protocols.items()
                    if p.training_normalization_batch() is not None}
    out = {}
    for n, a in adapters.items():
        slots = [s for s, acc in enumerate(pops[n]) if acc.count > 0]
        if not slots:
            continue
        ema = [a.ema_stats(s) for s in slots]
        pop = [a.comparable_stats(pops[n][s].estimate("population")) for s in slots]
        has_mean = ema[0][0] is not None
        res = {"std_gap": _norm([e[1] for e in ema], [p[1] for p in pop])}
        if has_mean:
            res["mean_gap"] = _norm([e[0] for e in ema], [p[0] for p in pop])
        gaps = {k: [] for k in MONITOR_METRICS[2:]}
        for per_slot in batch_stats[n]:
            idx = [i for i, s in enumerate(slots) if per_slot[s] is not None]
            if not idx:
                continue
            bs = [per_slot[slots[i]] for i in idx]
            gaps["batch_std_gap"].append(_norm([ema[i][1] for i in idx], [b[1] for b in bs]))
            gaps["batch_std_spread"].append(_norm([b[1] for b in bs], [pop[i][1] for i in idx]))
            if has_mean:
                gaps["batch_mean_gap"].append(_norm([ema[i][0] for i in idx], [b[0] for b in bs]))
                gaps["batch_mean_spread"].append(_norm([b[0] for b in bs], [pop[i][0] for i in idx]))
        for k, v in gaps.items():
            if v:
                res[k] = sum(v) / len(v)
        moving = [a.training_moving_stats(s) for s in slots]
        if all(mv is not None for mv in moving):  # what the training forward normalizes with (MABN's SMA)
            res["moving_std_gap"] = _norm([mv[1] for mv in moving], [p[1] for p in pop])
        res.update(result_extra.get(n, {}))
        out[n] = res
    return out


def _sub_batch_stats(adapter, device) -> List[List[Optional[tuple]]]:
    """One ``per_slot`` entry (the monitor's comparable statistics of each slot) per recorded sub-batch."""
    out = []
    for slot, n, mean, var in adapter.state.sub_batch_moments:
        acc = MomentAccumulator(adapter.rows, device)
        acc.add(n, mean, var)
        per_slot: List[Optional[tuple]] = [None] * adapter.num_slots
        per_slot[slot] = adapter.comparable_stats(acc.estimate("population"))
        out.append(per_slot)
    return out
