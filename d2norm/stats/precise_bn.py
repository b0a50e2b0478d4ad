"""PreciseBN: recompute population statistics of a fixed model (rethinking §3.2, A.2, A.3, A.10).

:func:`recompute_population_stats` is the one implementation used by the training hook
(:class:`d2norm.engine.hooks.PreciseBNHook`) and the tools. Compared with fvcore's ``update_bn_stats`` /
detectron2's ``hooks.PreciseBN``:

* eq 2 with per-batch sizes (the population variance of all samples) by default, eq 3 as an option
  (:mod:`d2norm.stats.estimators`); merged in float64 without E[x²] − μ² cancellation;
* N (samples, i.e. images) and the forward batch B are set here, independently of the training loader: batches
  are re-chunked to exactly B samples (the last one smaller) until this rank's share of N is used;
* distributed: rank r forwards ⌊N/W⌋ (+1 for the first N mod W ranks) samples; the moments are all-reduced
  weighted by counts (two collectives in all) so every rank writes identical statistics; no collective runs
  inside the forward, so ranks may call layers different numbers of times;
* every layer type with population statistics has an adapter (:mod:`d2norm.stats.adapters`): BN family,
  GhostBN, EvalNorm, example weighing, BGN, MABN's χ̂, DomainBN's per-domain rows; a layer called several
  times per forward contributes one batch per call; frozen layers are not touched;
* nothing else changes (A.10 "unintended updates"): adapted layers normalize without writing anything; all
  other buffers and plain module attributes (RetinaNet's ``loss_normalizer``, ``CycleBatchNormList._pos``, ...)
  are restored (:mod:`d2norm.stats.state`); event-storage writes go to a discarded storage; the torch /
  numpy / python RNG streams of the caller are restored afterwards, so training continues as if the pass had not
  happened (apart from the data the pass consumed from its own loader);
* ``exact_layerwise`` (A.3): the calls of the layers are estimated in call order, each in a pass in which all
  earlier calls normalize with their exact population statistics (a layer called several times per forward:
  each call with its own population, the written statistics pooled over its calls), which equals forwarding
  the whole population as one batch; forwards calling a layer a different number of times are refused (on every
  rank, with the same error).
"""
import itertools
import logging
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from ..utils.validation import check_bool, check_choice, check_int
from ..layers.protocol import get_stats_adapter
from .adapters import StatsAdapter
from .estimators import PopulationEstimate, all_reduce_accumulators_, check_estimator
from .passes import (
    batch_length,
    discarded_event_storage,
    isolated_rng,
    rebatch,
    routed_to_adapters,
    set_torch_rng_state,
    torch_rng_state,
    unwrap_model,
)
from .state import capture_state, restore_state

__all__ = [
    "recompute_population_stats",
    "population_stat_layers",
    "rank_share",
    "NONFINITE_POLICIES",
    "NonFiniteStatsError",
    "PreciseBNResults",
]

#: what a pass does with a batch whose statistics are non-finite in some layer
NONFINITE_POLICIES = ("error", "skip")


class NonFiniteStatsError(ValueError):
    """A population-statistics pass met non-finite (NaN/Inf) batch statistics (policy ``"error"``)."""


class PreciseBNResults(dict):
    """``{layer name: [estimate per slot]}``; ``nonfinite`` maps each layer that met non-finite batch
    statistics to the batches left out of its estimate (policy ``"skip"``)."""

    nonfinite: Dict[str, List[str]] = {}

logger = logging.getLogger(__name__)


def population_stat_layers(model: nn.Module) -> Dict[str, StatsAdapter]:
    """``{module name: adapter}`` for every layer whose population statistics would be recomputed."""
    out = {}
    for name, m in unwrap_model(model).named_modules():
        a = get_stats_adapter(m)
        if a is not None:
            out[name] = a
    return out


def rank_share(num_samples: int, rank: int, world: int) -> int:
    """Samples rank ``rank`` forwards: ⌊N/W⌋, plus one for the first N mod W ranks."""
    return num_samples // world + (1 if rank < num_samples % world else 0)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm.tqdm(iterable, total=total, desc=desc, leave=False)


# ---- main entry -------------------------------------------------------------------------------------------
def recompute_population_stats(
    model: nn.Module,
    data_loader: Iterable,
    num_samples: int,
    batch_size: Optional[int] = None,
    estimator: str = "population",
    exact_layerwise: bool = False,
    progress: bool = True,
    group=None,
    forward_fn=None,
    nonfinite: str = "error",
) -> Dict[str, List[Optional[PopulationEstimate]]]:
    """Recompute the population statistics of every adapted layer of ``model`` and write them.

    Args:
        model: the model (DDP/DP wrappers are unwrapped). Its modes are not changed: layers in training mode
            with population statistics are recomputed; layers in eval mode (frozen by design) run their eval
            forward and are untouched. For a detectron2 meta-architecture in training mode the batches need
            ``instances`` (a training loader); its losses are computed and discarded.
        data_loader: iterable of batches (a list of samples, e.g. detectron2's list of dicts, or a tensor whose
            dim 0 is the sample); iterated once (``iter(data_loader)``), so pass a persistent iterator to
            continue where the previous call stopped.
        num_samples: N, the total number of samples over all ranks (rethinking §3.2: 10³–10⁴ images).
        batch_size: B, samples per forward on each rank (the normalization batch of the pass; rethinking Table 2:
            B ≥ 10² where memory allows). ``None``: the loader's batches.
        estimator: ``"population"`` (eq 2, default) or ``"mean_of_batch_var"`` (eq 3).
        exact_layerwise: A.3. The batches of this rank are kept in memory and forwarded once per layer
            (cost quadratic in depth). Layers are estimated in the order of their first call in a forward of
            the first batch (rank 0's order on every rank), a topological order for feed-forward models. The
            result equals the one-batch forward of the population with ``estimator="population"``; with eq 3
            layer k's statistics are still averaged over the B-sized batches of pass k.
        progress: show a progress bar (on the main process only).
        group: process group for the moment all-reduce (``None`` = all ranks).
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch)``.
        nonfinite: a layer call whose batch mean / variance holds a NaN/Inf (one bad pixel is enough) would
            make that channel's population statistics non-finite. ``"error"`` (default): after the pass (on
            every rank together), :class:`NonFiniteStatsError` names the layer and the batch; the model is left
            unchanged. ``"skip"``: such calls are left out of that layer's estimate, and a warning lists every
            layer and batch concerned (also in ``results.nonfinite``).

    Returns:
        :class:`PreciseBNResults`, ``{layer name: [estimate per slot]}`` (slots = domains of a per-domain
        DomainBN, else one; ``None`` where a slot saw no data, whose statistics are then left unchanged).
    """
    from detectron2.utils import comm

    check_estimator(estimator)
    check_choice("PreciseBN: nonfinite", nonfinite, NONFINITE_POLICIES)
    check_int("PreciseBN: num_samples (D2NORM.PRECISE_BN.NUM_SAMPLES)", num_samples, minimum=1)
    if batch_size is not None:
        check_int("PreciseBN: batch_size (D2NORM.PRECISE_BN.BATCH_SIZE)", batch_size, minimum=1)
    check_bool("PreciseBN: exact_layerwise", exact_layerwise)
    net = unwrap_model(model)
    forward_fn = forward_fn or (lambda m, b: m(b))
    adapters = population_stat_layers(net)
    if not adapters:
        logger.info("PreciseBN: no layer with population statistics in training mode; nothing to do")
        return PreciseBNResults()
    if group is None:
        world, rank = comm.get_world_size(), comm.get_rank()
    else:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
    share = rank_share(num_samples, rank, world)
    device = next(itertools.chain(net.parameters(), net.buffers())).device
    current = {"batch": "?"}
    for a in adapters.values():
        a.begin_pass(device).current_batch = lambda: current["batch"]
    show = progress and comm.is_main_process()
    start = time.perf_counter()

    snap = capture_state(net)
    data = iter(data_loader)
    try:
        with torch.no_grad(), isolated_rng(), discarded_event_storage(), routed_to_adapters(adapters):
            if not exact_layerwise:
                for a in adapters.values():
                    a.state.mode = "record"
                nb = -(-share // batch_size) if batch_size else None
                batches = _described(rebatch(data, share, batch_size), rank, current)
                for batch in _progress(batches, nb, "PreciseBN", show):
                    if not _forward_checked(net, batch, adapters, forward_fn, current) and nonfinite == "error":
                        break
                _reduce_and_estimate(list(adapters.values()), estimator, group)
            else:
                _exact_layerwise(net, adapters, data, share, batch_size, estimator, group, forward_fn, show,
                                 lambda b: _described(b, rank, current), current)
    finally:
        restore_state(net, snap)

    results = PreciseBNResults()
    try:
        results.nonfinite = _check_nonfinite(adapters, nonfinite, group)
        for name, a in adapters.items():
            for slot, est in enumerate(a.state.estimates):
                if est is not None:
                    a.write(slot, est)
            if all(e is None for e in a.state.estimates):
                logger.warning("PreciseBN: layer %s saw no data; its statistics are unchanged", name)
            results[name] = list(a.state.estimates)
    finally:
        for a in adapters.values():
            a.end_pass()
    logger.info(
        "PreciseBN: population statistics (%s%s) of %d layers from %d samples (B=%s per rank, %d ranks) in %.2fs",
        estimator, ", exact layer-wise" if exact_layerwise else "", len(adapters), num_samples,
        batch_size or "loader", world, time.perf_counter() - start,
    )
    return results


def _describe_batch(index: int, start: int, batch, rank: int) -> str:
    n = batch_length(batch)
    names = []
    if isinstance(batch, (list, tuple)):
        for s in batch[:3]:
            if isinstance(s, dict):
                names.append(str(s.get("file_name", s.get("image_id", "?"))))
    more = ", ..." if n > len(names) and names else ""
    what = f"; images {', '.join(names)}{more}" if names else ""
    return f"batch {index} of rank {rank} (its samples {start}..{start + n - 1}{what})"


def _described(batches: Iterable, rank: int, current: dict) -> Iterator:
    """``batches``, with ``current["batch"]`` describing the one being forwarded (for error messages)."""
    start = 0
    for i, b in enumerate(batches):
        current["batch"] = _describe_batch(i, start, b, rank)
        yield b
        start += batch_length(b)


def _check_nonfinite(adapters: Dict[str, StatsAdapter], policy: str, group) -> Dict[str, List[str]]:
    """Every rank's non-finite calls (gathered, so all ranks decide together); raises for ``"error"``."""
    from detectron2.utils import comm

    from ..utils.comm import group_world_size

    local = {n: list(dict.fromkeys(a.state.nonfinite_batches)) for n, a in adapters.items() if a.state.nonfinite_batches}
    merged: Dict[str, List[str]] = {}
    for part in (comm.all_gather(local, group=group) if group_world_size(group) > 1 else [local]):
        for n, batches in part.items():
            merged.setdefault(n, []).extend(batches)
    if not merged:
        return merged
    first = next(iter(merged))
    total = sum(len(v) for v in merged.values())
    summary = (f"non-finite (NaN/Inf) batch statistics in {len(merged)} layer(s), {total} layer call(s); first: "
               f"layer {first!r} in {merged[first][0]}")
    if policy == "error":
        raise NonFiniteStatsError(
            f"PreciseBN: {summary}. The statistics were not changed. Check the data (or the model) for NaN/Inf, "
            f"or leave such batches out with nonfinite='skip' (tools: --nonfinite skip)"
        )
    logger.warning("PreciseBN: %s; those calls were left out of the estimates: %s", summary,
                   "; ".join(f"{n}: {', '.join(b)}" for n, b in merged.items()))
    return merged


def _reduce_and_estimate(adapters: List[StatsAdapter], estimator: str, group) -> None:
    all_reduce_accumulators_([acc for a in adapters for acc in a.state.accs], group)
    for a in adapters:
        a.state.estimates = [acc.estimate(estimator) for acc in a.state.accs]


def _forward(net, batch, adapters, forward_fn) -> None:
    for a in adapters.values():
        a.state.forward_calls = 0
    forward_fn(net, batch)


def _forward_checked(net, batch, adapters, forward_fn, current) -> bool:
    """:func:`_forward` of a recorded batch; False when the forward raised after a layer had already met
    non-finite statistics in it (e.g. detectron2's RPN stops on NaN boxes: "Training has diverged"): the rest
    of that batch is left out and the non-finite report, not the model's own error, says what happened."""
    marks = {id(a): a.state.recorded_calls for a in adapters.values()}  # host-side counts: no read of a device flag
    try:
        _forward(net, batch, adapters, forward_fn)
        return True
    except Exception as e:
        if not any(a.state.nonfinite_since(marks[id(a)]) for a in adapters.values()):
            raise
        logger.warning("PreciseBN: the forward of %s failed after non-finite batch statistics (%s: %s); the rest "
                       "of that batch is left out", current["batch"], type(e).__name__, e)
        return False


def _exact_layerwise(net, adapters, data, share, batch_size, estimator, group, forward_fn, show, described,
                     current) -> None:
    """rethinking A.3: every call of every layer is estimated in a pass in which all calls before it normalize
    with their exact population statistics, which equals forwarding the whole population as one batch.

    A layer called several times per forward (a head shared by several inputs, weight sharing) is a sequence of
    calls: call j of a forward normalizes, as in a training forward of the population as one batch, with the
    population statistics of call j's own inputs (over all batches), and the layer's written statistics pool
    all its calls (each call is a batch, as its EMA has it). Passes run in call order, one per call (also for
    consecutive calls of one layer: the later one's input may depend on the earlier one's statistics).
    """
    from detectron2.utils import comm

    from ..utils.comm import group_world_size
    from .estimators import MomentAccumulator

    rng = torch_rng_state()
    batches = list(rebatch(data, share, batch_size))

    # Order = the calls in a forward of the first batch (a topological order for feed-forward models: a call's
    # input depends only on calls before it). Rank 0's order is used everywhere, so the per-pass collectives
    # match across ranks.
    seq: List[Any] = []
    for a in adapters.values():
        a.state.mode, a.state.call_seq = "batch", seq
    try:
        if batches:
            set_torch_rng_state(rng)
            _forward(net, batches[0], adapters, forward_fn)
    finally:
        for a in adapters.values():
            a.state.call_seq = None
    name_of = {id(a.state): n for n, a in adapters.items()}
    units = [(name_of[id(st)], j) for st, j in seq]
    units = comm.all_gather(units, group=group)[0] if group_world_size(group) > 1 else units
    calls = {n: 0 for n in adapters}
    passes: List[Any] = []
    for n, j in units:
        calls[n] = max(calls[n], j + 1)
        # One pass per call, also for consecutive calls of one layer: in conv → bn → conv → bn (the same bn
        # twice) the second call's input depends on the first call's statistics, so it can only be recorded once
        # the first call normalizes with its population statistics (recording both in one pass would give the
        # non-exact pass's statistics for the second call).
        passes.append((n, [j]))

    device = next(itertools.chain(net.parameters(), net.buffers())).device
    for n, a in adapters.items():
        a.state.unit_accs = {j: [MomentAccumulator(a.rows, device) for _ in range(a.num_groups)] for j in range(calls[n])}
        a.state.unit_estimates = {}
        a.state.unit_modes = {j: "batch" for j in range(calls[n])}
    try:
        for n, js in _progress(passes, len(passes), "PreciseBN layer-wise", show):
            a = adapters[n]
            for j in js:
                a.state.unit_modes[j] = "record"
            mismatch = None
            for b in described(batches):
                set_torch_rng_state(rng)  # same random choices (e.g. RoI sampling) in every pass
                if _forward_checked(net, b, adapters, forward_fn, current):
                    mismatch = _call_mismatch(adapters, calls)
                    if mismatch:
                        break
            # every rank learns of a mismatch on any rank before the collective below, so all raise the
            # same error instead of the others waiting in the all-reduce until it times out
            if group_world_size(group) > 1:
                mismatch = next((m for m in comm.all_gather(mismatch, group=group) if m), None)
            if mismatch:
                raise ValueError(mismatch)
            all_reduce_accumulators_([acc for j in js for acc in a.state.unit_accs[j]], group)
            for j in js:
                # later calls normalize call j with its population statistics (mean, biased variance), i.e.
                # exactly what a forward of the whole population as one batch normalizes it with
                a.state.unit_estimates[j] = [acc.estimate(estimator) for acc in a.state.unit_accs[j]]
                a.state.unit_modes[j] = "population"
        for a in adapters.values():  # written statistics: every slot pools its groups over all calls
            for accs in a.state.unit_accs.values():
                for g, acc in enumerate(accs):
                    a.state.accs[a.group_slot(g)].merge_(acc)
            a.state.estimates = [acc.estimate(estimator) for acc in a.state.accs]
    finally:
        for a in adapters.values():
            a.state.unit_modes = a.state.unit_accs = None
            a.state.unit_estimates = {}


def _call_mismatch(adapters, calls) -> Optional[str]:
    """The error message for the first layer called a different number of times than in the first batch's
    forward, or None."""
    for n, a in adapters.items():
        if a.state.forward_calls != calls[n]:
            return (
                f"PreciseBN exact layer-wise (D2NORM.PRECISE_BN.EXACT_LAYERWISE): layer {n!r} was called "
                f"{a.state.forward_calls} time(s) in the forward of {a.state.current_batch()} but {calls[n]} time(s) in the "
                f"first batch's forward; exact estimation pairs the j-th call of every forward (rethinking A.3) "
                f"and needs the same calls in every forward. Use the non-exact pass (EXACT_LAYERWISE False)."
            )
    return None
