"""Population statistics from per-batch moments (rethinking §3.2 "Aggregation of per-batch statistics", A.2).

Notation (rethinking A.2): k batches, batch i holds n_i values of a channel (n_i = examples·H·W of that call),
with mean μ_i and biased variance σ_i². N = Σ n_i.

* ``"population"`` (default, eq 2 generalized to per-batch sizes): the mean and variance of all N values, as if
  the population were one batch,

      μ_pop = Σ n_i μ_i / N,    σ²_pop = N/(N−1) · [ Σ n_i (σ_i² + μ_i²) / N − μ_pop² ]            (eq 2)

  With equal n_i = B this is literally eq 2; with uneven batches each value is weighted equally (not each
  batch), which is what "population statistics" means (§3.2: "all samples are equally weighted").
* ``"mean_of_batch_var"`` (eq 3, the estimator of the original BN paper, fvcore's
  ``_MeanOfBatchVarianceEstimator``): every batch weighted equally,

      μ = Σ μ_i / k,    σ² = Σ n_i/(n_i−1) σ_i² / k                                              (eq 3)

  Batches with n_i = 1 have no unbiased variance and are left out of the variance average (not of the mean).

Numerics: moments are merged with Chan et al.'s pairwise update in float64 (count, mean, M2 = Σ(x − μ)²), so
σ²_pop never suffers the cancellation of E[x²] − E[x]² even when |μ| ≫ σ. The distributed merge
(:meth:`MomentAccumulator.all_reduce_`) is exact too: one all-reduce of (N_r, N_r·μ_r) gives the global mean μ,
a second one of M2_r + N_r(μ_r − μ)² the global M2.

Besides mean and (unbiased) variance, every estimate carries the raw second moment E[x²] that MABN's χ̂
(mabn eq 15) stores and BGN's m_{x²} (four-things §3.1 eq 3) is written in.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..moments import batch_moments, pooled_moments  # noqa: F401  (batch_moments: re-exported)
from ..utils.validation import check_choice

__all__ = [
    "ESTIMATORS",
    "PopulationEstimate",
    "check_estimator",
    "batch_moments",
    "population_estimate",
    "mean_of_batch_var_estimate",
    "MomentAccumulator",
    "all_reduce_accumulators_",
]

ESTIMATORS = ("population", "mean_of_batch_var")
_ACC = torch.float64


def check_estimator(estimator) -> str:
    return check_choice("PreciseBN estimator", estimator, ESTIMATORS, note=" (D2NORM.PRECISE_BN.ESTIMATOR)")


@dataclass
class PopulationEstimate:
    """Per-row population statistics (rows = channels, channel groups, ...), float64.

    ``var`` is the unbiased variance (torch's ``running_var`` convention), ``var_biased`` the biased one and
    ``sq_mean`` the second moment E[x²]. ``count`` = number of values N, ``num_batches`` = k.
    """

    mean: torch.Tensor
    var: torch.Tensor
    var_biased: torch.Tensor
    sq_mean: torch.Tensor
    count: float
    num_batches: int


def _rows(t) -> torch.Tensor:
    if isinstance(t, (list, tuple)):
        return torch.stack([torch.as_tensor(e, dtype=_ACC).reshape(-1) for e in t])
    return torch.as_tensor(t, dtype=_ACC)


def population_estimate(counts, means, vars_biased) -> PopulationEstimate:
    """Eq 2 over batches with sizes ``counts`` (k,), means and biased variances (k, R): a float64 reference
    form of what :class:`MomentAccumulator` computes incrementally."""
    n = torch.as_tensor(counts, dtype=_ACC).reshape(-1, 1)
    total, mean, var = pooled_moments(n, _rows(means), _rows(vars_biased))  # Chan's merge, cancellation-free
    return _finish_population(float(total), mean, var * total, int(n.numel()))


def _merge_m2(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """``(n, mean, M2)`` of two parts given as (count, mean, M2 = count·biased variance): Chan's merge, through
    :func:`d2norm.moments.pooled_moments` (its one home); a part with count 0 contributes nothing."""
    counts = torch.stack([n_a, n_b]).reshape(2, 1)
    var = torch.stack([m2_a / n_a.clamp(min=1), m2_b / n_b.clamp(min=1)])
    total, mean, var = pooled_moments(counts, torch.stack([mean_a, mean_b]), var)
    return total.reshape(()), mean, var * total


def mean_of_batch_var_estimate(counts, means, vars_biased) -> PopulationEstimate:
    """Eq 3 (every batch weighted equally; per-batch Bessel correction n_i/(n_i−1))."""
    n = torch.as_tensor(counts, dtype=_ACC).reshape(-1, 1)
    m, v = _rows(means), _rows(vars_biased)
    ok = (n > 1).to(_ACC)
    k = int(n.numel())
    return _finish_batch_mean(
        float(n.sum()), k, m.sum(0), (v * n / (n - 1).clamp(min=1) * ok).sum(0), float(ok.sum()), (v + m * m).sum(0)
    )


def _finish_population(N: float, mean, m2, k: int) -> PopulationEstimate:
    var_b = m2 / N if N > 0 else torch.zeros_like(m2)
    var_u = m2 / (N - 1) if N > 1 else var_b
    return PopulationEstimate(mean, var_u, var_b, var_b + mean * mean, N, k)


def _finish_batch_mean(N: float, k: int, sum_mean, sum_var_u, k_var: float, sum_sq) -> PopulationEstimate:
    kk = max(k, 1)
    mean = sum_mean / kk
    var_u = sum_var_u / k_var if k_var > 0 else torch.zeros_like(sum_mean)
    sq = sum_sq / kk
    # the biased counterpart (only reported): E_batches[σ_i²] ≈ var_u for large n_i
    return PopulationEstimate(mean, var_u, var_u, sq, N, k)


class MomentAccumulator:
    """Running moments of ``rows`` statistics over batches, for both estimators at once (float64).

    ``add(n, mean, var_biased)`` merges one batch (one call of a layer); batches with ``n == 0`` are ignored.
    Holds O(rows) numbers whatever the number of batches.
    """

    def __init__(self, rows: int, device=None):
        z = lambda: torch.zeros(rows, dtype=_ACC, device=device)  # noqa: E731
        self.rows = rows
        # eq 2: Chan's parallel merge
        self.n = torch.zeros((), dtype=_ACC, device=device)
        self.mean, self.m2 = z(), z()
        # eq 3: sums over batches
        self.k = torch.zeros((), dtype=_ACC, device=device)
        self.k_var = torch.zeros((), dtype=_ACC, device=device)
        self.sum_mean, self.sum_var_u, self.sum_sq = z(), z(), z()

    @torch.no_grad()
    def add(self, n: int, mean: torch.Tensor, var_biased: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """Merge one batch of ``n`` values. ``ok``: a 0-dim bool tensor on the device; where it is False the batch
        is left out (weight 0, its values replaced by 0) without reading the flag on the host, so a pass decides
        what to do with non-finite batches after the forwards (no host sync per layer call)."""
        if n == 0:
            return
        mean = mean.detach().to(device=self.mean.device, dtype=_ACC).reshape(-1)
        var = var_biased.detach().to(device=self.mean.device, dtype=_ACC).reshape(-1)
        if mean.numel() != self.rows:
            raise ValueError(f"MomentAccumulator expects {self.rows} rows, got {mean.numel()}")
        if ok is None:
            w, one = float(n), 1.0
        else:
            ok = ok.to(self.mean.device)
            mean, var = torch.where(ok, mean, 0.0), torch.where(ok, var, 0.0)
            one = ok.to(_ACC)
            w = one * n
        w = torch.as_tensor(w, dtype=_ACC, device=self.mean.device)
        self.n, self.mean, self.m2 = _merge_m2(self.n, self.mean, self.m2, w, mean, var * w)
        self.k += one
        self.sum_mean += mean
        self.sum_sq += var + mean * mean
        if n > 1:
            self.k_var += one
            self.sum_var_u += var * (n / (n - 1))

    @torch.no_grad()
    def merge_(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Add ``other``'s batches to this accumulator (Chan's merge for eq 2, sums for eq 3), in place."""
        self.n, self.mean, self.m2 = _merge_m2(self.n, self.mean, self.m2, other.n, other.mean.to(self.mean.device),
                                               other.m2.to(self.mean.device))
        self.k = self.k + other.k
        self.k_var = self.k_var + other.k_var
        self.sum_mean = self.sum_mean + other.sum_mean
        self.sum_var_u = self.sum_var_u + other.sum_var_u
        self.sum_sq = self.sum_sq + other.sum_sq
        return self

    @property
    def count(self) -> float:
        return float(self.n)

    def estimate(self, estimator: str = "population") -> Optional[PopulationEstimate]:
        """The population statistics, or ``None`` when no value was seen."""
        check_estimator(estimator)
        if float(self.n) == 0:
            return None
        if estimator == "population":
            return _finish_population(float(self.n), self.mean.clone(), self.m2.clone(), int(self.k))
        return _finish_batch_mean(
            float(self.n), int(self.k), self.sum_mean, self.sum_var_u, float(self.k_var), self.sum_sq
        )

    # ---- distributed ------------------------------------------------------------------------------------
    def _pack_first(self) -> torch.Tensor:
        return torch.cat([self.n.view(1), self.mean * self.n, self.k.view(1), self.k_var.view(1),
                          self.sum_mean, self.sum_var_u, self.sum_sq])

    def _unpack_first(self, t: torch.Tensor) -> None:
        R = self.rows
        self.n = t[0].clone()
        self.mean_global = t[1 : 1 + R] / self.n.clamp(min=1)
        self.k, self.k_var = t[1 + R].clone(), t[2 + R].clone()
        o = 3 + R
        self.sum_mean, self.sum_var_u, self.sum_sq = t[o : o + R], t[o + R : o + 2 * R], t[o + 2 * R : o + 3 * R]


def all_reduce_accumulators_(accs: List[MomentAccumulator], group=None) -> None:
    """Merge every rank's accumulators in place (sum over ranks, weighted by counts): afterwards each rank
    holds the statistics of the union of all ranks' batches, bit-identical on every rank.

    Every rank must pass accumulators of the same rows in the same order. Two collectives in all, whatever the
    number of accumulators (rethinking §3.2: "each rank forwards its share").
    """
    from ..utils.comm import all_reduce_sum_detached, group_world_size

    if group_world_size(group) == 1 or not accs:
        return
    first = torch.cat([a._pack_first() for a in accs])
    first = all_reduce_sum_detached(first, group)
    off = 0
    for a in accs:
        size = 4 * a.rows + 3
        local_n, local_mean, local_m2 = a.n, a.mean, a.m2
        a._unpack_first(first[off : off + size])
        off += size
        a._local = (local_n, local_mean, local_m2)
    # M2 of the union: Σ_r [M2_r + N_r (μ_r − μ)²] (exact parallel merge, no E[x²] − μ² cancellation)
    second = torch.cat([a._local[2] + a._local[0] * (a._local[1] - a.mean_global) ** 2 for a in accs])
    second = all_reduce_sum_detached(second, group)
    off = 0
    for a in accs:
        a.m2 = second[off : off + a.rows].clone()
        a.mean = a.mean_global.clone()
        off += a.rows
        del a._local, a.mean_global
