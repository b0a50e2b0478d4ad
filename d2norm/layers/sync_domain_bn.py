"""DomainBN synchronized across processes: the RetinaNet head of rethinking Table 5 with "SyncBN" (A.6, A.10).

:class:`SyncDomainBatchNorm2d` is :class:`~d2norm.layers.domain_bn.DomainBatchNorm2d` (per-domain / shared
training and population statistics, rethinking §5.2, Alg. 1) whose training statistics are those of every
rank's batch together (CPU/gloo and CUDA/NCCL), built on :func:`d2norm.utils.comm.all_gather_rows`; same state
dict as DomainBatchNorm2d.
"""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..utils.comm import all_gather_rows, group_world_size, sync_subgroup
from ..utils.validation import check_int
from .base import skip_nonfinite_stats, stat_dtype
from .domain_bn import DomainBatchNorm2d
from ..moments import pooled_moments

__all__ = ["SyncDomainBatchNorm2d"]

_DIMS = (0, 2, 3)


class SyncDomainBatchNorm2d(DomainBatchNorm2d):
    """:class:`DomainBatchNorm2d` whose training statistics span every rank of a sync group (rethinking Table 5
    "SyncBN", A.6; empty inputs A.10).

    Training with more than one rank in the group: each rank computes, per domain input, its element count
    c, mean m and biased variance v (one fused pass); the (c, m, v) of every rank and domain are exchanged
    with **one** differentiable all-gather (:func:`all_gather_rows` of each rank's (domains, 2C + 1) tensor; each
    rank sends only its own row) and combined exactly, weighted by element count
    (:func:`d2norm.moments.pooled_moments`; never E[x²] − E[x]², which cancels in float32 when
    |μ| ≫ σ, rethinking A.10):

        M = Σ c,   μ = Σ c·m / M,   σ² = Σ c·(v + (m − μ)²) / M

    over (ranks) for ``train_stats="per_domain"`` (per domain k) or over (ranks, domains) for ``"shared"``.
    Every input is normalized as y = x·s + t with s = γ/√(σ² + ε), t = β − μ·s, so forward and backward
    (autograd through the all-gather: its backward sums every rank's gradient of each row) equal the non-synchronized
    layer on the concatenation of every rank's batch. The EMA rules are DomainBatchNorm2d's, with the global
    statistics (unbiased σ²·M/(M − 1)); a domain whose global count M is < 2 updates no EMA (and is not counted
    in ``num_batches_tracked``). The masks are computed on the device: no host synchronization.

    A rank whose input is empty contributes c = 0 and still joins the all-gather, forward and backward.
    Contract (as any SyncBN): every rank of the group calls the layer the same number of times, in the same
    order, with the same domains, and runs backward through its outputs.

    One rank (or ``sync_group_size`` 1), or eval: exactly :class:`DomainBatchNorm2d`.
    """

    batch_statistics = "synced"

    def __init__(self, num_features: int, *args, sync_group_size: int = 0, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.sync_group_size = check_int("SYNC_GROUP_SIZE", sync_group_size, minimum=0, note=" (0 = all ranks)")

    def extra_repr(self):
        return super().extra_repr() + f", sync_group_size={self.sync_group_size}"

    def _group(self):
        """(group, world size of the group); world 1 when not distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = sync_subgroup(self.sync_group_size)
        return group, group_world_size(group)

    @skip_nonfinite_stats
    def forward(self, x: Tensor, domain: Optional[int] = None) -> Tensor:
        if not self.training:
            return super().forward(x, domain)
        group, world = self._group()
        if world == 1 or (self.train_stats == "shared" and self.num_domains > 1):
            return super().forward(x, domain)  # plain layer, or the documented ValueError
        self._check_input(x)
        k = self._resolve_domain(domain)
        return self._train_sync([x], [0 if k is None else k], group)[0]

    @skip_nonfinite_stats
    def forward_domains(self, xs: Sequence[Tensor], domains: Optional[Sequence[int]] = None) -> List[Tensor]:
        if not self.training:
            return super().forward_domains(xs, domains)
        group, world = self._group()
        if world == 1:
            return super().forward_domains(xs, domains)
        xs, ks = self._domain_inputs(xs, domains)
        return self._train_sync(xs, ks, group)

    def _train_sync(self, xs: List[Tensor], ks: List[int], group) -> List[Tensor]:
        C, D = self.num_features, len(xs)
        sd = stat_dtype(xs[0].dtype)
        rows = []
        for x in xs:
            n = x.numel() // C
            if n > 0:
                var, mean = torch.var_mean(x.to(sd), dim=_DIMS, correction=0)
            else:  # zeros that stay in the graph, so this rank's backward joins the collective too
                mean = var = x.to(sd).sum(dim=_DIMS)
            rows.append(torch.cat([mean, var, mean.new_full((1,), float(n))]))
        allstats = all_gather_rows(torch.stack(rows), group)  # (world, D, 2C + 1): every rank's (m, v, c)
        m_rd, v_rd, c_rd = allstats[..., :C], allstats[..., C : 2 * C], allstats[..., 2 * C :]
        # per domain input over ranks, then (shared) over domains: exact two-level pooling
        c_d, m_d, v_d = pooled_moments(c_rd, m_rd, v_rd)  # (D, 1), (D, C), (D, C)
        if self.train_stats == "per_domain":
            stats = [(m_d[i], v_d[i]) for i in range(D)]
        else:
            M, mean, var = pooled_moments(c_d, m_d, v_d)
            M = M.reshape(())
            stats = [(mean, var)] * D

        outs = []
        for x, k, (mu, sig2) in zip(xs, ks, stats):
            w, b = self._affine(k)
            scale = torch.rsqrt(sig2 + self.eps) * w.to(sd)
            shift = b.to(sd) - mu * scale
            outs.append(torch.addcmul(shift.view(1, -1, 1, 1), x.to(sd), scale.view(1, -1, 1, 1)).to(x.dtype))

        with torch.no_grad():
            if self.train_stats == "shared" and self.pop_stats == "shared":
                self._masked_ema(None, mean.detach(), var.detach(), M.detach())
            else:  # per-domain statistics feed row k, or (shared pop) the one set once per domain call
                for i, k in enumerate(ks):
                    kk = k if self.pop_stats == "per_domain" else None
                    self._masked_ema(kk, m_d[i].detach(), v_d[i].detach(), c_d[i, 0].detach())
        return outs

    @torch.no_grad()
    def _masked_ema(self, k: Optional[int], mean: Tensor, biased_var: Tensor, count: Tensor) -> None:
        """EMA update (torch convention) with global statistics, skipped on the device when count < 2."""
        valid = count > 1
        counter = self.num_batches_tracked[k] if k is not None else self.num_batches_tracked
        counter.add_(valid.to(counter.dtype))
        if self.momentum is None:
            f = torch.where(valid, 1.0 / counter.clamp(min=1).to(mean.dtype), torch.zeros_like(count))
        else:
            f = valid.to(mean.dtype) * self.momentum
        unbiased = biased_var * count / (count - 1).clamp(min=1)
        rm, rv = self._pop(k)
        rm.add_((mean.to(rm.dtype) - rm) * f.to(rm.dtype))
        rv.add_((unbiased.to(rv.dtype) - rv) * f.to(rv.dtype))
