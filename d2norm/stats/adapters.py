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

Statistics per layer type (the "rows" of a layer's :class:`~d2norm.stats.estimators.MomentAccumulator`):

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
  ``"shared"`` one accumulator for all calls. ``TRAIN_STATS="shared"`` (``forward_domains``) normalizes all
  domains with the statistics of their concatenation and records that concatenation as one batch (shared
  population) or each domain's own moments (per-domain population, Table 5 row 2).

Adapters are found through the class hierarchy (:func:`register_stats_adapter`, most specific class first).
A layer gets an adapter only if it is in training mode and holds population statistics: layers frozen by
design (``FrozenBatchNorm2d``, layers put in eval mode, BN without running statistics) are never touched.
"""
from typing import Callable, Dict, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .estimators import MomentAccumulator, PopulationEstimate, batch_moments

__all__ = ["StatsAdapter", "register_stats_adapter", "get_stats_adapter", "MODES"]

MODES = ("record", "batch", "population")
_ADAPTERS: Dict[type, Type["StatsAdapter"]] = {}


def register_stats_adapter(layer_cls: type) -> Callable:
    """Class decorator: use this adapter for ``layer_cls`` and its subclasses (unless a subclass has its own)."""

    def deco(adapter_cls):
        _ADAPTERS[layer_cls] = adapter_cls
        return adapter_cls

    return deco


def get_stats_adapter(module: nn.Module) -> Optional["StatsAdapter"]:
    """The adapter for ``module``, or ``None`` when it has no population statistics to recompute (no
    registered type, frozen / eval mode, no running statistics)."""
    if not module.training:
        return None
    for cls in type(module).__mro__:
        adapter_cls = _ADAPTERS.get(cls)
        if adapter_cls is not None:
            return adapter_cls(module) if adapter_cls.applies(module) else None
    return None


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _dims(x: torch.Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


class StatsAdapter:
    """Base class. Subclasses define ``rows``, ``num_slots``, :meth:`forward` and :meth:`write`."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.mode = "record"
        self.accs: List[MomentAccumulator] = []
        self.estimates: List[Optional[PopulationEstimate]] = []
        self.calls = 0
        #: when a list, the adapter appends itself on its first call (call order for layer-wise estimation)
        self.call_log: Optional[list] = None
        #: set by the pass: ``current_batch()`` describes the batch being forwarded
        self.current_batch: Callable[[], str] = lambda: "?"
        #: descriptions of the recorded calls whose moments were non-finite (left out of the estimate)
        self.nonfinite_batches: List[str] = []

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        return True

    num_slots = 1

    @property
    def rows(self) -> int:
        raise NotImplementedError

    def reset(self, device) -> None:
        self.accs = [MomentAccumulator(self.rows, device) for _ in range(self.num_slots)]
        self.estimates = [None] * self.num_slots

    def _touch(self) -> None:
        if self.calls == 0 and self.call_log is not None:
            self.call_log.append(self)
        self.calls += 1

    def record(self, slot: int, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        self._touch()
        if self.mode == "record":
            # A NaN/Inf in one call would make the whole population estimate of its channel non-finite: such
            # a call is left out and reported; the pass decides whether that is an error.
            if n and not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
                self.nonfinite_batches.append(self.current_batch())
                return
            self.accs[slot].add(n, mean, var)

    def population(self, slot: int, dtype):
        est = self.estimates[slot]
        if est is None:
            raise RuntimeError(
                f"{type(self.module).__name__}: population statistics requested before they were estimated "
                "(layer-wise PreciseBN order violated: a layer fed by a later-estimated layer)"
            )
        return est.mean.to(dtype), est.var_biased.to(dtype), est.sq_mean.to(dtype)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    @torch.no_grad()
    def write(self, slot: int, est: PopulationEstimate) -> None:
        raise NotImplementedError


@register_stats_adapter(_BatchNorm)
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
        if w is None:
            return x.clone()
        view = [1, -1] + [1] * (x.dim() - 2)
        return x * w.view(view) + b.view(view)

    def _one(self, x, slot):
        w, b = self._affine(slot)
        if x.numel() == 0:
            return self._empty(x, w, b)
        if self.mode == "population":
            mean, var, _ = self.population(slot, _stat_dtype(x))
            self._touch()
            return self._normalize(x, mean, var, w, b)
        n, mean, var = batch_moments(x, _dims(x))
        self.record(slot, n, mean, var)
        return self._normalize(x, mean, var, w, b)

    def forward(self, x, *args, **kwargs):
        return self._one(x, 0)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_mean.copy_(est.mean.to(m.running_mean.dtype))
        m.running_var.copy_(est.var.to(m.running_var.dtype))


def _domain_bn_cls():
    from ..layers.domain_bn import DomainBatchNorm2d

    return DomainBatchNorm2d


class DomainBNAdapter(BatchNormAdapter):
    """:class:`~d2norm.layers.domain_bn.DomainBatchNorm2d`: one slot per domain when population statistics are
    per domain (rethinking §5.2, Table 5)."""

    @property
    def num_slots(self) -> int:
        return self.module.num_domains if self.module.pop_stats == "per_domain" else 1

    def _slot(self, k) -> int:
        return k if (self.module.pop_stats == "per_domain" and k is not None) else 0

    def _affine(self, k):
        return self.module._affine(k)

    def _one_domain(self, x, k):
        w, b = self._affine(k)
        slot = self._slot(k)
        if x.numel() == 0:
            return self._empty(x, w, b)
        if self.mode == "population":
            mean, var, _ = self.population(slot, _stat_dtype(x))
            self._touch()
            return self._normalize(x, mean, var, w, b)
        n, mean, var = batch_moments(x, _dims(x))
        self.record(slot, n, mean, var)
        return self._normalize(x, mean, var, w, b)

    def forward(self, x, domain=None):
        m = self.module
        m._check_input(x)
        k = m._resolve_domain(domain)
        if m.train_stats == "shared" and m.num_domains > 1:
            raise ValueError(
                "DomainBatchNorm2d with TRAIN_STATS='shared' normalizes all domains together in training: "
                "call forward_domains(xs) with every domain's input (or set TRAIN_STATS='per_domain')"
            )
        return self._one_domain(x, k)

    def forward_domains(self, xs, domains=None):
        m = self.module
        xs = list(xs)
        if domains is None:
            if len(xs) != m.num_domains:
                raise ValueError(f"forward_domains got {len(xs)} inputs but NUM_DOMAINS={m.num_domains}")
            ks = list(range(len(xs)))
        else:
            ks = [m._check_domain(d) for d in domains]
        for x in xs:
            m._check_input(x)
        if m.train_stats == "per_domain" or self.mode == "population" and m.pop_stats == "per_domain":
            return [self._one_domain(x, k) for x, k in zip(xs, ks)]
        live = [(x, k) for x, k in zip(xs, ks) if x.numel() > 0]
        if not live:
            return [self._empty(x, *self._affine(k)) for x, k in zip(xs, ks)]
        sd = _stat_dtype(live[0][0])
        if self.mode == "population":
            mean, var, _ = self.population(0, sd)
            self._touch()
        else:
            # statistics of the concatenation (rethinking Fig. 7b), from per-domain moments
            acc = MomentAccumulator(m.num_features, live[0][0].device)
            parts = []
            for x, k in live:
                n, mu, v = batch_moments(x, _dims(x))
                acc.add(n, mu, v)
                parts.append((k, n, mu, v))
            est = acc.estimate("population")
            mean, var = est.mean.to(sd), est.var_biased.to(sd)
            if m.pop_stats == "shared":
                self.record(0, int(est.count), est.mean, est.var_biased)
            else:  # Table 5 row 2: each domain's EMA row from its own statistics
                for k, n, mu, v in parts:
                    self.record(self._slot(k), n, mu, v)
        out = []
        for x, k in zip(xs, ks):
            w, b = self._affine(k)
            out.append(self._empty(x, w, b) if x.numel() == 0 else self._normalize(x, mean, var, w, b))
        return out

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        if m.pop_stats == "per_domain":
            m.running_mean[slot].copy_(est.mean.to(m.running_mean.dtype))
            m.running_var[slot].copy_(est.var.to(m.running_var.dtype))
        else:
            super().write(slot, est)


class BGNAdapter(StatsAdapter):
    """:class:`~d2norm.layers.batch_group_norm.BatchGroupNorm`: per channel group E[x], E[x²]."""

    @property
    def rows(self) -> int:
        return self.module.num_groups

    def forward(self, x):
        m = self.module
        if x.dim() < 2 or x.shape[1] != m.num_channels:
            raise ValueError(f"BatchGroupNorm expects input (N, {m.num_channels}, *), got shape {tuple(x.shape)}")
        sd = _stat_dtype(x)
        if x.numel() == 0:
            return m._normalize(x, x.new_zeros((), dtype=torch.float32), x.new_ones((), dtype=torch.float32))
        xs = x.to(sd)
        if self.mode == "population":
            mean, var, _ = self.population(0, sd)
            self._touch()
        else:
            g = xs.unflatten(1, (m.num_groups, -1))
            n, mean, var = batch_moments(g, [0] + list(range(2, g.dim())))
            self.record(0, n, mean, var)
        return m._normalize(x, mean.unsqueeze(0), var.unsqueeze(0), xs)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_mean.copy_(est.mean.to(m.running_mean.dtype))
        # m_{x²} − m_x² in float64 (the estimate's E[x²] is float64: no float32 cancellation)
        m.running_var.copy_((est.sq_mean - est.mean * est.mean).clamp(min=0).to(m.running_var.dtype))


class MABNAdapter(StatsAdapter):
    """:class:`~d2norm.layers.mabn.MABN2d`: per channel χ = sqrt(E[x²] + ε) (mabn eq 15)."""

    @property
    def rows(self) -> int:
        return self.module.num_features

    def forward(self, x):
        m = self.module
        if x.dim() < 2 or x.shape[1] != m.num_features:
            raise ValueError(f"MABN2d({m.num_features}) expects (N, {m.num_features}, *) input, got {tuple(x.shape)}")
        sd = _stat_dtype(x)
        xs = x.to(sd)
        if x.numel() == 0:
            chi = m.running_chi.to(sd)
        elif self.mode == "population":
            _, _, sq = self.population(0, sd)
            self._touch()
            chi = (sq + m.eps).sqrt()
        else:
            n, mean, var = batch_moments(x, _dims(x))
            self.record(0, n, mean, var)
            chi = (var + mean * mean + m.eps).sqrt()  # χ_B of eq 15
        scale = m.weight.to(sd) / chi
        view = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(m.bias.to(sd).view(view), xs, scale.view(view)).to(x.dtype)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_chi.copy_((est.sq_mean + m.eps).sqrt().to(m.running_chi.dtype))


def _register_d2norm_adapters() -> None:
    from ..layers.batch_group_norm import BatchGroupNorm
    from ..layers.mabn import MABN2d

    register_stats_adapter(_domain_bn_cls())(DomainBNAdapter)
    register_stats_adapter(BatchGroupNorm)(BGNAdapter)
    register_stats_adapter(MABN2d)(MABNAdapter)


_register_d2norm_adapters()
