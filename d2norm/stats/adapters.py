"""Which population statistics each normalization layer holds, and how to recompute and write them.

A :class:`StatsAdapter` wraps one layer for the duration of a population-statistics pass (PreciseBN,
rethinking §3.2; exact layer-wise estimation, A.3). While the pass runs, the layer's ``forward`` is replaced by
the adapter's, which **records the moments of the layer's input itself** (every call is one batch with its own
size, so a layer shared by several inputs — a RetinaNet head over 5 FPN levels — is handled), **normalizes
without touching any buffer** (no EMA, no ring buffer, no aux loss, no counter), and can run in three modes:

* ``"record"``: normalize with the statistics of the current call's input (the normalization batch is the
  forward batch B of the pass, rethinking §3.2 / Table 2) and record its moments;
* ``"batch"``: the same normalization, nothing recorded;
* ``"population"``: normalize with the population statistics estimated earlier in this pass (exactly the
  statistics a forward of the whole population as one batch would normalize with: mean and *biased*
  variance / E[x²]), for layer-wise estimation (A.3).

Statistics per layer type (the "rows" of a layer's :class:`~d2norm.stats.estimators.MomentAccumulator`); a
d2norm layer names its adapter itself (:meth:`~d2norm.layers.base.D2NormModule.stats_adapter`, defined in the
layer's own file), torch's and detectron2's BN family get :class:`BatchNormAdapter`:

* torch ``_BatchNorm`` family — ``nn.BatchNorm{1,2,3}d``, ``nn.SyncBatchNorm``, detectron2's
  ``NaiveSyncBatchNorm``, and d2norm's GhostBN, BatchStatsBN, ExampleWeightedBN (its m_x, m_{x²} are derived
  from these buffers, four-things eq 3), EvalNorm (μ_E, σ_E² of evalnorm eqs 5-6), AnySyncBN: per channel,
  ``running_mean`` ← μ_pop and ``running_var`` ← unbiased σ²_pop (torch's convention). ``num_batches_tracked``
  and every other buffer (EvalNorm's ``seen_batch_size``, ...) stay as they are.

  *GhostBN:* its population statistic is the same as BN's — the mean/variance of all samples (rethinking §3:
  the population is "the batch"; GhostBN's eval path is BN's). During the pass it normalizes over the whole
  forward batch B rather than per ghost sub-batch: B is the normalization batch of the pass, and Table 2
  shows that population statistics estimated with small B (≈ the ghost size) are worse. Sync layers normalize
  per rank during the pass (no collective inside the forward; only the final moment all-reduce is one).
* :class:`~d2norm.layers.batch_group_norm.BatchGroupNorm`: per channel group, ``running_mean`` ← E[x] and
  ``running_var`` ← E[x²] − E[x]² over all values of the group (the m_x, m_{x²} − m_x² of four-things eq 3).
* :class:`~d2norm.layers.mabn.MABN2d`: per channel, ``running_chi`` ← χ_pop = sqrt(E_pop[x²] + ε) (mabn eq 15
  with the population as the batch; inference is z = γ·x/χ̂ + β). The χ² / Ψ ring buffers and counters are
  training state and stay untouched. During the pass the layer normalizes with χ_B of the call (mabn eq 15,
  as in its warm-up), not with the moving averages.
* :class:`~d2norm.layers.domain_bn.DomainBatchNorm2d`: ``POP_STATS="per_domain"`` keeps one accumulator per
  domain (slot k ← the calls made for domain k) and writes row k of ``running_mean``/``running_var``;
  ``"shared"`` one accumulator for all calls. Only ``TRAIN_STATS="shared"`` with shared population
  statistics (Table 5 row 1) normalizes all domains with the statistics of their concatenation and records
  that concatenation as one batch; every other layout normalizes and records each domain on its own (the
  inference path: for row 2 the per-level statistics of the per-level model, as upstream's
  ``retinanet-eval-domain-specific.py`` computes them).

A layer gets an adapter only if it is in training mode and holds population statistics: layers frozen by
design (``FrozenBatchNorm2d``, layers put in eval mode, BN without running statistics) are never touched.

For the BN monitor every adapter also gives its EMA and an estimate in one convention
(:meth:`StatsAdapter.ema_stats`, :meth:`StatsAdapter.comparable_stats`: mean or ``None``, and σ).
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..moments import empty_passthrough, stat_dtype
from .estimators import MomentAccumulator, PopulationEstimate, batch_moments

__all__ = ["StatsAdapter", "PassState", "BatchNormAdapter", "reduce_dims", "MODES"]

MODES = ("record", "batch", "population")


def reduce_dims(x: torch.Tensor) -> List[int]:
    """Every dimension but the channel one (1)."""
    return [0] + list(range(2, x.dim()))


#: (mean or None, σ) in float64, the BN monitor's convention
MonitorStats = Tuple[Optional[torch.Tensor], torch.Tensor]


class PassState:
    """One statistics pass's bookkeeping for one adapted layer: created by :meth:`StatsAdapter.begin_pass`, owned
    and driven by the pass (PreciseBN, the BN monitor), released by :meth:`StatsAdapter.end_pass`, so nothing of
    one pass survives into the next. The adapter (the per-layer strategy: how a call is recorded, normalized and
    written) only reads ``mode`` and calls :meth:`record` / :meth:`population`.
    """

    def __init__(self, owner: str, rows: int, num_slots: int, num_groups: int, device=None):
        self.owner, self.rows, self.num_groups = owner, rows, num_groups
        self.mode = "record"
        self.accs: List[MomentAccumulator] = [MomentAccumulator(rows, device) for _ in range(num_slots)]
        self.estimates: List[Optional[PopulationEstimate]] = [None] * num_slots
        self.calls = 0
        #: exact layer-wise estimation (rethinking A.3) keeps moments per *call* of a forward: ``call_index`` is
        #: the index of the current call within the forward (set by :meth:`counted`), and ``unit_modes`` /
        #: ``unit_accs`` / ``unit_estimates`` map a call index to that call's mode and to one accumulator /
        #: estimate per normalization group. ``None``: one mode for every call (``mode``) and moments straight
        #: into the write slots (``accs``).
        self.call_index = 0
        #: calls of the layer in the current forward (set to 0 by the pass before each forward)
        self.forward_calls = 0
        #: when a list, every call appends ``(state, call_index)`` (call order for layer-wise estimation)
        self.call_seq: Optional[list] = None
        self.unit_modes: Optional[Dict[int, str]] = None
        self.unit_accs: Optional[Dict[int, List[MomentAccumulator]]] = None
        self.unit_estimates: Dict[int, List[Optional[PopulationEstimate]]] = {}
        #: set by the pass: ``current_batch()`` describes the batch being forwarded
        self.current_batch: Callable[[], str] = lambda: "?"
        # every recorded call: (description, device flag "moments finite"); the flags are read on the host in one
        # go when asked for (:attr:`nonfinite_batches`), never per call
        self._calls: List[Tuple[str, torch.Tensor]] = []
        self._flags: List[bool] = []
        #: set by the BN monitor to the layer protocol's ``training_sub_batches`` (a layer that trains on
        #: sub-batches of a call, e.g. GhostBN's ghost batches, four-things §3.2): the adapter then replays the
        #: layer's training forward -- each sub-batch normalized with its own moments, so the layers after it see
        #: what they see in training -- and keeps those moments ``(slot, n, mean, biased var)`` in
        #: ``sub_batch_moments``. PreciseBN leaves it unset: its target is the population forwarded as one
        #: batch (rethinking A.3), which the whole call's statistics approach, not the ghost batches'.
        self.sub_batches: Optional[Callable[[int], Optional[List[int]]]] = None
        self.sub_batch_moments: List[Tuple[int, int, torch.Tensor, torch.Tensor]] = []

    @property
    def mode(self) -> str:
        if self.unit_modes is not None:
            return self.unit_modes.get(self.call_index, "batch")
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        self.unit_modes = None

    def touch(self) -> None:
        """Count one call of the layer in this pass."""
        self.calls += 1

    def count_call(self) -> None:
        """Number a new call of the layer within the current forward (``call_index``)."""
        self.call_index = self.forward_calls
        self.forward_calls += 1
        if self.call_seq is not None:
            self.call_seq.append((self, self.call_index))

    def record(self, slot: int, n: int, mean: torch.Tensor, var: torch.Tensor, group: Optional[int] = None) -> None:
        """Moments of one normalization group (default: ``slot``) of the current call."""
        self.touch()
        if self.mode == "record" and n:
            # A NaN/Inf in one call would make the whole population estimate of its channel non-finite: such
            # a call is left out (weight 0 on the device: no host read per call) and reported; the pass decides
            # whether that is an error.
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            self._calls.append((self.current_batch(), ok))
            if self.unit_accs is not None:
                self.unit_accs[self.call_index][slot if group is None else group].add(n, mean, var, ok=ok)
            else:
                self.accs[slot].add(n, mean, var, ok=ok)

    @property
    def recorded_calls(self) -> int:
        """Calls recorded so far (a host-side count: a mark for :meth:`nonfinite_since`)."""
        return len(self._calls)

    def nonfinite_since(self, mark: int = 0) -> List[str]:
        """Descriptions of the recorded calls from number ``mark`` on whose moments were non-finite (left out of
        the estimate); the flags not read yet are read on the host here, all at once."""
        if len(self._flags) < len(self._calls):
            pending = [ok for _, ok in self._calls[len(self._flags):]]
            self._flags.extend(bool(f) for f in torch.stack(pending).cpu().tolist())
        return [d for (d, _), f in zip(self._calls[mark:], self._flags[mark:]) if not f]

    @property
    def nonfinite_batches(self) -> List[str]:
        """Every recorded call whose moments were non-finite (:meth:`nonfinite_since` 0)."""
        return self.nonfinite_since(0)

    def population(self, slot: int, dtype, group: Optional[int] = None):
        """(mean, biased var, E[x²]) to normalize with: in exact layer-wise estimation those of this call's
        own population (its normalization group, default ``slot``), else the write slot's."""
        if self.unit_modes is not None:
            est = self.unit_estimates.get(self.call_index, [None] * self.num_groups)[slot if group is None else group]
        else:
            est = self.estimates[slot]
        if est is None:
            raise RuntimeError(
                f"{self.owner}: population statistics requested before they were estimated "
                "(layer-wise PreciseBN order violated: a layer fed by a later-estimated layer)"
            )
        return est.mean.to(dtype), est.var_biased.to(dtype), est.sq_mean.to(dtype)


class StatsAdapter:
    """Base class of the per-layer strategy of a statistics pass: how a call of the layer is recorded or
    normalized (:meth:`forward`), how estimates are written (:meth:`write`) and read for the monitor. Subclasses
    define ``rows``, ``num_slots``, :meth:`forward` and :meth:`write`. A pass's bookkeeping is a
    :class:`PassState` (:attr:`state`, between :meth:`begin_pass` and :meth:`end_pass`)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.state: Optional[PassState] = None

    def begin_pass(self, device=None) -> PassState:
        """A fresh :class:`PassState` for a pass over this layer (mode ``"record"``, empty accumulators)."""
        self.state = PassState(type(self.module).__name__, self.rows, self.num_slots, self.num_groups, device)
        return self.state

    def end_pass(self) -> None:
        self.state = None

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        return True

    num_slots = 1

    @property
    def num_groups(self) -> int:
        """Parts of one call normalized with statistics of their own (DomainBN: the domains); 1 for BN."""
        return 1

    def group_slot(self, group: int) -> int:
        """The write slot a normalization group's moments belong to."""
        return group

    @property
    def rows(self) -> int:
        raise NotImplementedError

    def counted(self, fn: Callable) -> Callable:
        """``fn`` (this adapter's ``forward`` / ``forward_domains``) numbering the layer's calls per forward in
        the pass state current at call time."""

        def call(*args, **kwargs):
            self.state.count_call()
            return fn(*args, **kwargs)

        return call

    # ---- what a subclass's forward uses: the current pass's mode, recording and population statistics ----------
    @property
    def mode(self) -> str:
        return self.state.mode

    def _touch(self) -> None:
        self.state.touch()

    def record(self, slot: int, n: int, mean: torch.Tensor, var: torch.Tensor, group: Optional[int] = None) -> None:
        self.state.record(slot, n, mean, var, group)

    def population(self, slot: int, dtype, group: Optional[int] = None):
        return self.state.population(slot, dtype, group)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    @torch.no_grad()
    def write(self, slot: int, est: PopulationEstimate) -> None:
        raise NotImplementedError

    def ema_stats(self, slot: int) -> MonitorStats:
        """(EMA mean or ``None``, EMA σ) of one slot, float64, in the convention the layer's EMA estimates."""
        raise NotImplementedError

    def comparable_stats(self, est: PopulationEstimate) -> MonitorStats:
        """(mean or ``None``, σ) of an estimate of this layer's input, comparable with :meth:`ema_stats`."""
        raise NotImplementedError

    def training_moving_stats(self, slot: int) -> Optional[MonitorStats]:
        """(mean or ``None``, σ), float64, of the moving statistics the layer's *training* forward normalizes
        with besides the batch's own (MABN: the simple moving average of its last m batches, mabn eq 19), in
        the convention of :meth:`ema_stats`; ``None`` for a layer that trains on the batch's own statistics."""
        return None


class BatchNormAdapter(StatsAdapter):
    """torch's BN family and every d2norm layer derived from ``nn.BatchNorm2d`` (see module docstring)."""

    @classmethod
    def applies(cls, module) -> bool:
        return module.track_running_stats and module.running_mean is not None and module.running_var is not None

    @property
    def rows(self) -> int:
        return self.module.num_features

    def _affine(self, slot):
        m = self.module
        return m.weight, m.bias

    def _normalize(self, x, mean, var, w, b):
        sd = mean.dtype
        w = w.to(sd) if w is not None else None
        b = b.to(sd) if b is not None else None
        # one fused normalize with supplied statistics; fp16/bf16 input with float32 statistics is supported
        return F.batch_norm(x, mean, var, w, b, False, 0.0, self.module.eps)

    def _empty(self, x, w, b):
        return empty_passthrough(x, w, b)

    def _one(self, x, slot):
        w, b = self._affine(slot)
        if x.numel() == 0:
            return self._empty(x, w, b)
        if self.mode == "population":
            mean, var, _ = self.population(slot, stat_dtype(x.dtype))
            self._touch()
            return self._normalize(x, mean, var, w, b)
        n, mean, var = batch_moments(x, reduce_dims(x))
        self.record(slot, n, mean, var)
        sizes = self.state.sub_batches(x.shape[0]) if self.state.sub_batches is not None else None
        if not sizes or len(sizes) == 1:
            return self._normalize(x, mean, var, w, b)
        # the layer's training forward (GhostBN: each ghost batch by its own statistics); the population
        # takes the whole call (recorded above)
        out = []
        for part in x.split(sizes):
            pn, pmean, pvar = batch_moments(part, reduce_dims(part))
            self.state.sub_batch_moments.append((slot, pn, pmean, pvar))
            out.append(self._normalize(part, pmean, pvar, w, b))
        return torch.cat(out)

    def forward(self, x, *args, **kwargs):
        return self._one(x, 0)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_mean.copy_(est.mean.to(m.running_mean.dtype))
        m.running_var.copy_(est.var.to(m.running_var.dtype))

    def ema_stats(self, slot):
        """σ = sqrt(unbiased variance), torch's ``running_var`` convention."""
        m = self.module
        return m.running_mean.detach().double(), m.running_var.detach().double().clamp(min=0).sqrt()

    def comparable_stats(self, est):
        return est.mean, est.var.clamp(min=0).sqrt()
