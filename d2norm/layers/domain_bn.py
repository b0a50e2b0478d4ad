"""BatchNorm with per-domain statistics (and optionally per-domain affine), for layers shared across domains.

rethinking §5.2, Table 5, Alg. 1 (A.9): a RetinaNet head is shared by the 5 FPN levels, so each of its BN
layers sees 5 domains. Three independent choices decide how it behaves:

* SGD-training statistics (``TRAIN_STATS``): each domain normalized by its own mini-batch statistics
  ("domain-specific", Fig. 7a), or all domains concatenated and normalized by one set ("shared", Fig. 7b);
* population statistics (``POP_STATS``): one EMA set per domain, or one EMA set for all domains;
* affine transform (``AFFINE_PER_DOMAIN``): one γ, β per domain, or one shared γ, β.

Table 5's finding: only layouts where population statistics are trained the way SGD normalizes work (rows 1, 4,
6); the straightforward implementation (row 3) loses 5 AP and row 2 collapses.
"""
import contextlib
import contextvars
import logging
import operator
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


from ..stats.adapters import BatchNormAdapter, reduce_dims
from ..moments import batch_moments
from ..stats.estimators import MomentAccumulator
from .base import (
    D2NormBatchNorm2d, FrozenBNState, NotAnAffine, affine_from_stats, empty_passthrough, skip_nonfinite_stats, stat_dtype,
)
from ..options import Bool, Choice, Int, Option
from .registry import register_norm

__all__ = ["DomainBatchNorm2d", "DomainBNAdapter", "domain_scope", "current_domain", "domain_bn_modules"]

logger = logging.getLogger(__name__)

_STATS_CHOICES = ("per_domain", "shared")
_CURRENT_DOMAIN: contextvars.ContextVar = contextvars.ContextVar("d2norm_current_domain", default=None)


def _as_index(domain) -> int:
    if isinstance(domain, bool):
        raise ValueError(f"domain index must be a non-negative integer, got {domain!r}")
    try:
        k = operator.index(domain)
    except TypeError:
        raise ValueError(f"domain index must be a non-negative integer, got {domain!r}") from None
    if k < 0:
        raise ValueError(f"domain index must be a non-negative integer, got {domain!r}")
    return k


@contextlib.contextmanager
def domain_scope(domain: int) -> Iterator[None]:
    """Select ``domain`` for every :class:`DomainBatchNorm2d` called inside (without an explicit ``domain=``).

    Lets a model route a whole sub-network (e.g. the shared RetinaNet head applied to FPN level k) to domain k
    without changing call signatures. Backed by a ``ContextVar``: scopes nest, are per thread / task, and
    nothing outlives the ``with`` block. The index is checked against each layer's ``NUM_DOMAINS`` at call time.
    """
    token = _CURRENT_DOMAIN.set(_as_index(domain))
    try:
        yield
    finally:
        _CURRENT_DOMAIN.reset(token)


def current_domain() -> Optional[int]:
    """The domain selected by the innermost active :func:`domain_scope`, or ``None``."""
    return _CURRENT_DOMAIN.get()


@register_norm("DomainBN")
class DomainBatchNorm2d(D2NormBatchNorm2d):
    """BatchNorm2d holding ``K = num_domains`` sets of population statistics and/or affine parameters.

    rethinking §5.2, Table 5, Alg. 1. Options and state:

    * ``pop_stats="per_domain"``: ``running_mean``/``running_var`` of shape (K, C) and ``num_batches_tracked``
      of shape (K,) (domains may be updated a different number of times); ``"shared"``: (C,), (C,), () —
      exactly ``BatchNorm2d``'s buffers.
    * ``affine_per_domain=True``: ``weight``/``bias`` of shape (K, C); ``False``: (C,) as in ``BatchNorm2d``.
    * ``train_stats``: how mini-batch statistics are formed in training (below).

    With ``pop_stats="shared"`` and ``affine_per_domain=False`` the state dict is identical to ``BatchNorm2d``'s.

    **Calls.** ``forward(x, domain=k)`` normalizes one domain's input; ``domain`` defaults to the innermost
    :func:`domain_scope`. ``forward_domains(xs, domains=None)`` takes every domain's input at once (``xs[i]`` is
    domain ``domains[i]``, default ``i``, and then ``len(xs)`` must equal K); the xs may differ in N, H, W.

    **Domain rule.** A given domain index must be an integer in [0, K) (ValueError otherwise). When no domain is
    given and no scope is active, the call raises a ValueError explaining how to select one — unless the output
    cannot depend on the domain (K = 1, or shared population statistics *and* shared affine). It never picks one.

    **Training** (EMA in torch's convention: ``running ← (1 − m)·running + m·batch``, unbiased variance in
    ``running_var``; ``momentum=None`` = cumulative average using the matching ``num_batches_tracked``):

    * ``train_stats="per_domain"`` (Fig. 7a): domain k is normalized by its own batch mean / biased variance
      (exactly ``nn.BatchNorm2d`` in train mode on that input). ``forward_domains(xs)`` is identical to calling
      ``forward(xs[i], domains[i])`` in order.

      - ``pop_stats="per_domain"``: domain k's EMA row is updated from domain k's statistics.
        Table 5 row 4 (affine shared) and row 6 (affine per domain) = Alg. 1 ``RetinaNetHead_Row6``.
      - ``pop_stats="shared"``: the single EMA set is updated once per domain call, in call order, from that
        domain's statistics — what one ``nn.BatchNorm2d`` applied separately to each level does.
        Table 5 row 3 (affine shared) = Alg. 1 ``RetinaNetHead_Row3``, and row 5 (affine per domain).
        (We deliberately do not substitute a single update with pooled statistics here: row 3 is defined as
        the standard implementation, whose EMA tracks per-level statistics.)

    * ``train_stats="shared"`` (Fig. 7b) needs ``forward_domains``: mean μ and biased variance σ² over the
      concatenation of all non-empty xs (every sample and position of every domain, i.e. weighted by element
      count — Alg. 1 ``RetinaNetHead_Row1``), and every domain is normalized with (μ, σ²) and its affine
      (gradients flow through the shared statistics into every domain). A single-domain ``forward`` in training
      raises a ValueError (there is nothing to share with) unless K = 1.

      - ``pop_stats="shared"``: one EMA update per ``forward_domains`` call with (μ, unbiased σ² over the
        concatenation). Table 5 row 1 (affine shared) = Alg. 1 ``RetinaNetHead_Row1``.
      - ``pop_stats="per_domain"``: each domain's EMA row is updated from that domain's own mean / unbiased
        variance, although SGD normalized with the shared ones. Table 5 row 2 (the inconsistent layout,
        2.1 AP) — expressible for reproduction, not recommended. This EMA is on the training path; the
        paper's row 2 statistics are recomputed on the per-domain inference path by a PreciseBN pass
        (:mod:`d2norm.stats.adapters`).
      - ``affine_per_domain=True`` combines with either (not a Table 5 row).

    * Empty inputs (rethinking A.10): a zero-size domain input gives a zero-size output, contributes nothing
      to shared statistics and does not update (or count towards) any EMA. With ``train_stats="shared"`` a
      domain with a single value per channel (N·H·W = 1) is normalized with the shared statistics but does
      not update its own EMA row (its unbiased variance is undefined); the per-domain path rejects such an
      input like ``nn.BatchNorm2d`` does.

    **Eval** (never writes a buffer): domain k uses its population statistics (row k, or the shared set) and its
    affine (row k, or shared): ``F.batch_norm`` with the selected statistics, whatever ``train_stats`` was.
    ``forward_domains`` in eval = ``forward`` per domain.

    **Checkpoints.** A plain ``BatchNorm2d`` / ``FrozenBatchNorm2d`` state (one set) loads into a per-domain
    layout by copying the single set into every domain (a warning names the mapped entries); a missing
    ``num_batches_tracked`` (FrozenBN) keeps the current value, with a warning. A per-domain state cannot load
    into a shared layout (torch reports the size mismatch). Note: fvcore's ``Checkpointer`` drops
    shape-mismatched keys *before* ``load_state_dict``, so BN → per-domain mapping through it needs the norm
    converter; and ``FrozenBatchNorm2d.convert_frozen_batchnorm`` / ``nn.SyncBatchNorm.convert_sync_batchnorm``
    do not understand per-domain state.
    """

    CFG_NODE = "DOMAIN_BN"
    routed_calls = (("forward", "input"), ("forward_domains", "inputs_by_domain"))
    CFG_DOC = 'DomainBN, per-domain statistics: rethinking §5.2, Table 5 (rows as (TRAIN_STATS, POP_STATS, AFFINE_PER_DOMAIN): 1 (shared, shared, False), 2 (shared, per_domain, False), 3 (per_domain, shared, False), 4 (per_domain, per_domain, False), 5 (per_domain, shared, True), 6 (per_domain, per_domain, True); default row 4)'
    OPTIONS = (
        Option("NUM_DOMAINS", 5, "K, e.g. the FPN levels P3-P7 of a RetinaNet head (rethinking §5.2).",
               arg="num_domains", check=Int(1)),
        Option("TRAIN_STATS", "per_domain", "Table 5 'SGD Training' (Fig. 7): 'per_domain' = each domain "
               "normalized by its own mini-batch statistics; 'shared' = by statistics of all domains concatenated "
               "(needs forward_domains).", arg="train_stats", check=Choice(*_STATS_CHOICES)),
        Option("POP_STATS", "per_domain", "Table 5 'Population Stats': 'per_domain' = one EMA set per domain; "
               "'shared' = one EMA set updated from all domains.", arg="pop_stats", check=Choice(*_STATS_CHOICES)),
        Option("AFFINE_PER_DOMAIN", False, "Table 5 'Affine Parameters': True = one (gamma, beta) per domain.",
               arg="affine_per_domain", check=Bool()),
    )

    @classmethod
    def check_cfg_use(cls, cfg, keys, world: int) -> None:
        """A ValueError for DomainBN with several domains in a stock meta-architecture: stock detectron2 modules
        call their norm without a domain, so the first forward would fail (rethinking §5.2: the domain is, e.g.,
        the FPN level of a shared head)."""
        from .cfg_checks import STOCK_META_ARCHS

        arch = cfg.MODEL.META_ARCHITECTURE
        if arch not in STOCK_META_ARCHS or not cls(**cls.from_config(cfg, 8)).needs_domain:
            return
        d = cfg.D2NORM.DOMAIN_BN
        raise ValueError(
            f"{', '.join(keys)} 'DomainBN' with D2NORM.DOMAIN_BN.NUM_DOMAINS {d.NUM_DOMAINS} (TRAIN_STATS "
            f"{d.TRAIN_STATS!r}, POP_STATS {d.POP_STATS!r}, AFFINE_PER_DOMAIN {d.AFFINE_PER_DOMAIN}) in "
            f"MODEL.META_ARCHITECTURE {arch!r}: stock detectron2 modules call their norm without a domain, so the "
            f"first forward would fail. DomainBN needs a model that passes the domain (rethinking §5.2): for "
            f"RetinaNet's per-level head use MODEL.META_ARCHITECTURE 'DomainBNRetinaNet' (options "
            f"D2NORM.RETINANET_HEAD.*, MODEL.RETINANET.NORM \"\"), or call the layer with domain=k / "
            f"domain_scope(k) in your own module; otherwise use another norm."
        )

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        train_stats: str,
        pop_stats: str,
        affine_per_domain: bool,
        eps: float,
        momentum,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True, device=device, dtype=dtype
        )
        self.num_domains = num_domains
        self.train_stats = train_stats
        self.pop_stats = pop_stats
        self.affine_per_domain = affine_per_domain
        K, C = num_domains, num_features
        f = {"device": device, "dtype": dtype}
        if pop_stats == "per_domain":
            self.register_buffer("running_mean", torch.zeros(K, C, **f))
            self.register_buffer("running_var", torch.ones(K, C, **f))
            self.register_buffer("num_batches_tracked", torch.zeros(K, dtype=torch.long, device=device))
        if affine_per_domain:
            self.weight = nn.Parameter(torch.ones(K, C, **f))
            self.bias = nn.Parameter(torch.zeros(K, C, **f))

    def extra_repr(self):
        return (
            super().extra_repr()
            + f", num_domains={self.num_domains}, train_stats={self.train_stats!r}, pop_stats={self.pop_stats!r}"
            + f", affine_per_domain={self.affine_per_domain}"
        )

    @property
    def needs_domain(self) -> bool:
        """True when a module that calls ``norm(x)`` without a domain (every stock detectron2 module) cannot use
        this layer: K > 1 and it has domain-specific state to select (per-domain statistics or affine) or it
        shares training statistics across domains (``forward_domains`` only)."""
        if self.num_domains == 1:
            return False
        return self.train_stats == "shared" or not (self.pop_stats == "shared" and not self.affine_per_domain)

    # ---- domain selection -------------------------------------------------------------------------------
    def _check_domain(self, domain) -> int:
        k = _as_index(domain)
        if k >= self.num_domains:
            raise ValueError(
                f"domain index {domain!r} out of range for DomainBatchNorm2d with NUM_DOMAINS={self.num_domains} "
                f"(valid: 0..{self.num_domains - 1})"
            )
        return k

    def _resolve_domain(self, domain) -> Optional[int]:
        if domain is None:
            domain = _CURRENT_DOMAIN.get()
        if domain is not None:
            return self._check_domain(domain)
        if self.num_domains == 1:
            return 0
        if self.pop_stats == "shared" and not self.affine_per_domain:
            return None  # nothing domain-specific to select
        raise ValueError(
            f"DomainBatchNorm2d with NUM_DOMAINS={self.num_domains} got no domain: call forward(x, domain=k), "
            f"wrap the call in `with d2norm.layers.domain_bn.domain_scope(k):`, or use forward_domains(xs)"
        )

    def _affine(self, k: Optional[int]):
        if self.affine_per_domain:
            return self.weight[k], self.bias[k]
        return self.weight, self.bias

    def _pop(self, k: Optional[int]):
        if self.pop_stats == "per_domain":
            return self.running_mean[k], self.running_var[k]
        return self.running_mean, self.running_var

    @torch.no_grad()
    def _ema_factor(self, k: Optional[int]) -> float:
        """Count one EMA update of domain k (or of the shared set) and return its momentum."""
        counter = self.num_batches_tracked[k] if self.pop_stats == "per_domain" else self.num_batches_tracked
        counter.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(counter)

    # ---- forward -----------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"DomainBatchNorm2d expects NCHW input with C={self.num_features}, got shape {tuple(x.shape)}"
            )

    def _eval_one(self, x: torch.Tensor, k: Optional[int]) -> torch.Tensor:
        rm, rv = self._pop(k)
        w, b = self._affine(k)
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, self.eps)

    def _train_one(self, x: torch.Tensor, k: Optional[int]) -> torch.Tensor:
        w, b = self._affine(k)
        if x.numel() == 0:  # no statistics: zero-size output, EMA untouched and not counted
            return empty_passthrough(x, w, b)
        if x.numel() == self.num_features:  # checked before counting the update (torch would raise later)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        rm, rv = self._pop(k)  # rows of the (K, C) buffers are contiguous views: updated in place
        return F.batch_norm(x, rm, rv, w, b, True, self._ema_factor(k), self.eps)

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor, domain: Optional[int] = None) -> torch.Tensor:
        self._check_input(x)
        k = self._resolve_domain(domain)
        if not self.training:
            return self._eval_one(x, k)
        self._refuse_single_domain_training()
        return self._train_one(x, k)

    def _refuse_single_domain_training(self) -> None:
        """Shared training statistics need every domain's input at once (rethinking Fig. 7b)."""
        if self.train_stats == "shared" and self.num_domains > 1:
            raise ValueError(
                "DomainBatchNorm2d with TRAIN_STATS='shared' normalizes all domains together in training: "
                "call forward_domains(xs) with every domain's input (or set TRAIN_STATS='per_domain')"
            )

    # ---- protocol (layers/base.py) -----------------------------------------------------------------------
    def stats_adapter(self):
        """One slot per domain when population statistics are per domain (:class:`DomainBNAdapter`)."""
        return DomainBNAdapter(self)

    def estimated_stats(self):
        rm, rv = self.running_mean.detach().double(), self.running_var.detach().double()
        if self.pop_stats == "per_domain":
            return [(rm[k].clone(), rv[k].clone()) for k in range(self.num_domains)]
        return [(rm.clone(), rv.clone())]

    def stats_slot(self, domain: Optional[int] = None) -> int:
        """Row of the population statistics a call for ``domain`` (or the active :func:`domain_scope`) uses."""
        if self.pop_stats != "per_domain":
            return 0
        k = self._resolve_domain(domain)
        return 0 if k is None else k

    def frozen_bn_state(self) -> FrozenBNState:
        """As BN when the domain cannot matter (one domain, or shared statistics and affine): row 0 of a
        per-domain layout; otherwise :class:`NotAnAffine` (the domain picks the row at call time)."""
        if self.num_domains > 1 and (self.pop_stats == "per_domain" or self.affine_per_domain):
            raise NotAnAffine("DomainBN with per-domain statistics/affine: no single constant affine map")
        rm, rv = self.running_mean.detach(), self.running_var.detach()
        if rm.dim() == 2:
            rm, rv = rm[0], rv[0]
        w, b = self.weight, self.bias
        if w.dim() == 2:  # one domain with a per-domain affine: its row, as new Parameters
            w = nn.Parameter(w.detach()[0].clone(), requires_grad=w.requires_grad)
            b = nn.Parameter(b.detach()[0].clone(), requires_grad=b.requires_grad)
        return FrozenBNState(rm, rv, self.eps, w, b)

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        """Convertible only when the domain cannot matter (one domain, or shared statistics and affine): a
        one-set layer would merge the domains' statistics (rethinking §5.2, Table 5)."""
        try:
            self.frozen_bn_state()
        except NotAnAffine:
            return ("DomainBN with per-domain statistics or affine: a one-set EvalNorm / ExampleWeightedBN would "
                    "merge the domains (rethinking §5.2, Table 5)")
        return None

    def inference_affine(self, domain: Optional[int] = None):
        """Eval of one domain is BN with that domain's population statistics and affine: a fixed affine map
        when the domain is static, i.e. given (``domain=`` or an active :func:`domain_scope`) or irrelevant
        (K = 1, or shared statistics and shared affine). Otherwise :class:`NotAnAffine` (the domain is chosen
        per call, e.g. per FPN level of a shared head)."""
        try:
            k = self._resolve_domain(domain)
        except ValueError as e:
            raise NotAnAffine(f"DomainBN: per-domain statistics/affine and no static domain ({e})") from None
        rm, rv = self._pop(k)
        w, b = self._affine(k)
        return affine_from_stats(rm, rv, self.eps, w, b)

    def _domain_inputs(self, xs: Sequence[torch.Tensor], domains: Optional[Sequence[int]]):
        """Validated ``(xs, domain indices)`` for :meth:`forward_domains` (also used by synced subclasses)."""
        xs = list(xs)
        if domains is None:
            if len(xs) != self.num_domains:
                raise ValueError(
                    f"forward_domains got {len(xs)} inputs but NUM_DOMAINS={self.num_domains}; pass one input "
                    f"per domain or give `domains`"
                )
            ks = list(range(len(xs)))
        else:
            ks = [self._check_domain(d) for d in domains]
            if len(ks) != len(xs) or len(set(ks)) != len(ks):
                raise ValueError(
                    f"domains must be distinct and one per input, got {list(domains)!r} for {len(xs)} inputs"
                )
        for x in xs:
            self._check_input(x)
        return xs, ks

    @skip_nonfinite_stats
    def forward_domains(
        self, xs: Sequence[torch.Tensor], domains: Optional[Sequence[int]] = None
    ) -> List[torch.Tensor]:
        """Normalize every domain's input; ``xs[i]`` belongs to domain ``domains[i]`` (default ``i``).

        Training with ``train_stats="shared"`` computes one set of statistics over all xs (rethinking Fig. 7b,
        Alg. 1 Row1); otherwise this is ``forward`` applied per domain, in order (see class docstring).
        """
        xs, ks = self._domain_inputs(xs, domains)
        if not self.training:
            return [self._eval_one(x, k) for x, k in zip(xs, ks)]
        if self.train_stats == "per_domain":
            return [self._train_one(x, k) for x, k in zip(xs, ks)]
        return self._train_shared(xs, ks)

    def _train_shared(self, xs: List[torch.Tensor], ks: List[int]) -> List[torch.Tensor]:
        C = self.num_features
        live = [i for i, x in enumerate(xs) if x.numel() > 0]
        if not live:
            return [self._train_one(x, k) for x, k in zip(xs, ks)]
        sd = stat_dtype(xs[live[0]].dtype)
        counts, means, vars_ = [], [], []
        for i in live:
            var_i, mean_i = torch.var_mean(xs[i].to(sd), dim=(0, 2, 3), correction=0)
            counts.append(xs[i].numel() // C)
            means.append(mean_i)
            vars_.append(var_i)
        n = sum(counts)
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel over all domains when training, got {n}")
        # Statistics of the concatenation from per-domain moments (no concatenated copy of the activations); the
        # counts are Python ints, used as scalar weights (no host-to-device copy of a count vector)
        mean = sum(m * (c / n) for c, m in zip(counts, means))
        var = sum((v + (m - mean).square()) * (c / n) for c, m, v in zip(counts, means, vars_))
        inv_std = torch.rsqrt(var + self.eps)

        outs = []
        for x, k in zip(xs, ks):
            w, b = self._affine(k)
            if x.numel() == 0:
                outs.append(empty_passthrough(x, w, b))
                continue
            scale = inv_std * w.to(sd)
            shift = b.to(sd) - mean * scale
            y = torch.addcmul(shift.view(1, -1, 1, 1), x.to(sd), scale.view(1, -1, 1, 1))
            outs.append(y.to(x.dtype))

        with torch.no_grad():
            if self.pop_stats == "shared":
                self._ema_update(None, mean, var * (n / (n - 1)))
            else:
                for i, c, m, v in zip(live, counts, means, vars_):
                    if c > 1:
                        self._ema_update(ks[i], m, v * (c / (c - 1)))
        return outs

    def _ema_update(self, k: Optional[int], mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        f = self._ema_factor(k)
        rm, rv = self._pop(k)
        rm.mul_(1 - f).add_(mean.detach().to(rm.dtype), alpha=f)
        rv.mul_(1 - f).add_(unbiased_var.detach().to(rv.dtype), alpha=f)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a single (BN) set is copied into every domain here; the base class then fills a missing counter
        mapped = []
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key, ours = prefix + name, getattr(self, name)
            src = state_dict.get(key)
            if src is None or ours is None or not isinstance(src, torch.Tensor):
                continue
            if ours.dim() == src.dim() + 1 and ours.shape[0] == self.num_domains and ours.shape[1:] == src.shape:
                state_dict[key] = src.unsqueeze(0).repeat(self.num_domains, *([1] * src.dim()))
                mapped.append(name)
        if mapped:
            logger.warning(
                "DomainBatchNorm2d %r: checkpoint holds a single set of %s; copied it into all %d domains.",
                prefix.rstrip("."),
                ", ".join(mapped),
                self.num_domains,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def domain_bn_modules(model: nn.Module) -> Dict[str, DomainBatchNorm2d]:
    """Every :class:`DomainBatchNorm2d` (synchronized ones included) in ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DomainBatchNorm2d)}


class DomainBNAdapter(BatchNormAdapter):
    """:class:`~d2norm.layers.domain_bn.DomainBatchNorm2d`: one slot per domain when population statistics are
    per domain (rethinking §5.2, Table 5).

    During a pass each domain is normalized the way the model normalizes at inference, with the statistics of
    the pass in place of the population statistics (rethinking Table 5, Alg. 1; upstream
    ``retinanet-eval-domain-specific.py`` runs PreciseBN on the per-level model): per domain when the
    population statistics are per domain (rows 2, 4, 6 — also row 2, whose SGD used shared statistics: its
    per-level statistics are those of the per-level inference path, not of the training path) or when SGD
    normalized per domain (rows 3, 5: one BN called per level); all domains together only when both are
    shared (row 1). So the non-exact pass over the whole population as one batch and the exact layer-wise
    pass (A.3) give the same statistics for every layout.
    """

    @property
    def num_slots(self) -> int:
        return self.module.num_domains if self.module.pop_stats == "per_domain" else 1

    @property
    def _per_domain(self) -> bool:
        m = self.module
        return m.pop_stats == "per_domain" or m.train_stats == "per_domain" or m.num_domains == 1

    @property
    def num_groups(self) -> int:
        return self.module.num_domains if self._per_domain else 1

    def group_slot(self, group: int) -> int:
        return group if self.module.pop_stats == "per_domain" else 0

    def _slot(self, k) -> int:
        return k if (self.module.pop_stats == "per_domain" and k is not None) else 0

    def _affine(self, k):
        return self.module._affine(k)

    def _one_domain(self, x, k):
        w, b = self._affine(k)
        slot = self._slot(k)
        group = (k or 0) if self._per_domain else 0
        if x.numel() == 0:
            return self._empty(x, w, b)
        if self.mode == "population":
            mean, var, _ = self.population(slot, stat_dtype(x.dtype), group)
            self._touch()
            return self._normalize(x, mean, var, w, b)
        n, mean, var = batch_moments(x, reduce_dims(x))
        self.record(slot, n, mean, var, group)
        return self._normalize(x, mean, var, w, b)

    def forward(self, x, domain=None):
        m = self.module
        m._check_input(x)
        k = m._resolve_domain(domain)
        m._refuse_single_domain_training()
        return self._one_domain(x, k)

    def forward_domains(self, xs, domains=None):
        m = self.module
        xs, ks = m._domain_inputs(xs, domains)
        if self._per_domain:
            return [self._one_domain(x, k) for x, k in zip(xs, ks)]
        live = [x for x in xs if x.numel() > 0]
        if not live:
            return [self._empty(x, *self._affine(k)) for x, k in zip(xs, ks)]
        sd = stat_dtype(live[0].dtype)
        if self.mode == "population":
            mean, var, _ = self.population(0, sd)
            self._touch()
        else:
            # statistics of the concatenation (rethinking Fig. 7b, Alg. 1 Row1), from per-domain moments
            acc = MomentAccumulator(m.num_features, live[0].device)
            for x in live:
                acc.add(*batch_moments(x, reduce_dims(x)))
            est = acc.estimate("population")
            mean, var = est.mean.to(sd), est.var_biased.to(sd)
            self.record(0, int(est.count), est.mean, est.var_biased)
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

    def ema_stats(self, slot):
        mean, sigma = super().ema_stats(slot)
        return (mean[slot], sigma[slot]) if mean.dim() == 2 else (mean, sigma)
