"""EvalNorm: evaluation-time normalization statistics that include the sample's own statistics.

evalnorm §3.2-3.4. In training a sample x_i is normalized with minibatch statistics that contain x_i itself
(eqs 3-4, with α = 1/B). BN's evaluation replaces them by the EMA (eq 2) and drops that dependency; EvalNorm
puts it back (eqs 5-6), per sample and per channel:

    μ̂  = α̂·μ_i + (1 − α̂)·μ_E                                                   (eq 5)
    σ̂² = β̂·σ_i² + (1 − β̂)·σ_E² + β̂(1 − β̂)(μ_i − μ_E)²                           (eq 6)

with μ_i, σ_i² the mean and (biased) variance of sample i's channel over its spatial positions, and μ_E, σ_E²
the EMA buffers ``running_mean`` / ``running_var``. α̂, β̂ come from the layer's mode:

* ``"online"``  (§3.4 "Online estimation"): learned during training by the stop-gradient L1 loss of eqs 7-9;
* ``"rule"``    (§3.3 / §4.1 rule of thumb): α̂ = β̂ = 1/B²;
* ``"offline"`` (§3.4 "Offline estimation"): fitted after training on a frozen model with
  :func:`d2norm.stats.evalnorm_fit.fit_evalnorm_offline`.

Training normalization is exactly ``nn.BatchNorm2d``'s; the auxiliary loss only ever moves α̂ and β̂.
"""
import logging
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import (OWN_STATS_NOTE, D2NormBatchNorm2d, NotAnAffine, autocast_off, empty_passthrough, skip_nonfinite_stats,
                   stat_dtype)
from .kernels import channel_affine, group_moments
from .native import mix_normalize, row_affine_l1
from ..options import Choice, Int, Number, Option
from .registry import register_norm

__all__ = [
    "EvalNorm2d",
    "EVALNORM_MODES",
    "evalnorm_modules",
    "evalnorm_aux_loss",
    "evalnorm_parameters",
    "evalnorm_alpha_beta",
]

logger = logging.getLogger(__name__)

EVALNORM_MODES = ("online", "rule", "offline")


#: elements per chunk of the torch route of :func:`_affine_l1_sums` (float32: 512 KiB): the chunk's temporaries
#: stay in cache and x is read from cache by the later reductions; large fresh temporaries would also page-fault
#: on every call
L1_CHUNK_ELEMENTS = 1 << 17


def _affine_l1_sums(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Per (sample, channel) row of ``x`` (N, C, *) with ``t = x·a + b`` (a, b of shape (N, C)):
    ``(Σ|t| over all rows, S₁ = Σ sign(t), S₂ = Σ sign(t)·x)``. The L1 term of eq 9 and everything its gradient
    needs (∂ mean|t| / ∂a = S₂/n, ∂/∂b = S₁/n): one pass over x, nothing activation-sized is kept. CPU: the
    native one-pass kernel; elsewhere cache-sized chunks of torch ops. Not differentiable (:class:`_AuxLoss`
    supplies the gradient)."""
    x2 = x.contiguous().view(x.shape[0] * x.shape[1], -1)
    a1, b1 = a.reshape(-1, 1), b.reshape(-1, 1)
    fused = row_affine_l1(x2, a1, b1)
    if fused is not None:
        abs_sum, s1, s2 = fused
        return abs_sum.sum(), s1.view_as(a), s2.view_as(a)
    # CPU: cache-sized chunks; an accelerator: one chunk (a few fused kernels; a loop of small chunks there is tens
    # of thousands of kernel launches per iteration at detector feature-map sizes)
    chunk = L1_CHUNK_ELEMENTS if x2.device.type == "cpu" else x2.numel()
    rows = max(1, chunk // max(x2.shape[1], 1))
    loss = x2.new_zeros(())
    s1, s2 = torch.empty_like(a1[:, 0]), torch.empty_like(a1[:, 0])
    for r in range(0, x2.shape[0], rows):
        xc = x2[r : r + rows]
        t = torch.addcmul(b1[r : r + rows], xc, a1[r : r + rows])
        sg = torch.sign(t)
        loss += torch.linalg.vecdot(sg.view(-1), t.view(-1))  # Σ sign(t)·t = Σ |t|
        s1[r : r + rows] = sg.sum(1)
        s2[r : r + rows] = torch.linalg.vecdot(sg, xc)
    return loss, s1.view_as(a), s2.view_as(a)


class _AuxLoss(torch.autograd.Function):
    """Eqs 7-9 (element mean of |·|) and its gradient w.r.t. α̂, β̂ in closed form; every other argument is
    stop-gradient (evalnorm §3.4), so nothing else gets one.

    ``apply(x, μ_E, σ_E², α̂, β̂, eps)`` with x (N, C, *) detached, in the statistics dtype. With per-(sample,
    channel) μ_i, σ_i² and the minibatch μ_B, σ_B² pooled from them, d = μ_i − μ_E, r_B = (σ_B² + ε)^-½:

        μ̂ = μ_E + α̂·d,   σ̂² = σ_E² + β̂(σ_i² − σ_E²) + β̂(1 − β̂)·d²,   r̂ = (σ̂² + ε)^-½
        L = mean |x·a + b|,   a = r_B − r̂,   b = μ̂·r̂ − μ_B·r_B

    (eq 9: (x − μ_B)·r_B − (x − μ̂)·r̂ = x·a + b). With ∂L/∂a = S₂/n, ∂L/∂b = S₁/n (:func:`_affine_l1_sums`):
    ∂L/∂r̂ = μ̂·∂L/∂b − ∂L/∂a, ∂L/∂α̂ = Σ ∂L/∂b·r̂·d, ∂L/∂β̂ = Σ ∂L/∂r̂·(−½ r̂³)·(σ_i² − σ_E² + (1 − 2β̂)d²).
    One Function instead of ~25 autograd-recorded small ops per layer and call (their bookkeeping was most of
    EvalNorm's extra training cost at detector feature-map sizes)."""

    @staticmethod
    def forward(ctx, x, mu_e, var_e, alpha, beta, eps: float):
        mu_i, var_i = group_moments(x)  # (N, C)
        # minibatch statistics from the per-sample ones (combined-population formulas, cf. eqs 3-4)
        mu_b = mu_i.mean(0)
        var_b = var_i.mean(0) + (mu_i - mu_b).square().mean(0)
        r_b = torch.rsqrt(var_b + eps)
        d = mu_i - mu_e
        mu_hat = mu_e + alpha * d  # eq 7
        d2 = d.square()
        var_hat = var_e + beta * (var_i - var_e) + beta * (1 - beta) * d2  # eq 8
        r_hat = torch.rsqrt(var_hat + eps)
        abs_sum, s1, s2 = _affine_l1_sums(x, r_b - r_hat, mu_hat * r_hat - mu_b * r_b)  # eq 9
        n = x.numel()
        ctx.save_for_backward(s1, s2, d, r_hat, mu_hat, var_i - var_e + (1 - 2 * beta) * d2, alpha, beta)
        ctx.n = n
        return abs_sum / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s1, s2, d, r_hat, mu_hat, dvar_dbeta, alpha, beta = ctx.saved_tensors
        scale = grad / ctx.n
        g_a, g_b = s2 * scale, s1 * scale
        g_alpha = g_beta = None
        if ctx.needs_input_grad[3]:
            g_alpha = (g_b * r_hat * d).sum().view_as(alpha)
        if ctx.needs_input_grad[4]:
            g_rhat = mu_hat * g_b - g_a
            g_beta = (g_rhat * (-0.5) * r_hat.pow(3) * dvar_dbeta).sum().view_as(beta)
        return None, None, None, g_alpha, g_beta, None


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@register_norm("EvalNorm")
class EvalNorm2d(D2NormBatchNorm2d):
    """``nn.BatchNorm2d`` with EvalNorm's evaluation statistics (evalnorm §3.3-3.4, eqs 5-9).

    Training: output, gradients and EMA updates are those of ``nn.BatchNorm2d``. In ``"online"`` mode (and
    while :func:`~d2norm.stats.evalnorm_fit.fit_evalnorm_offline` runs) each training forward with grad
    enabled also computes the auxiliary loss of eqs 7-9,

        L_aux = mean | ⟨(x_i − μ_B)/σ_B⟩ − (⟨x_i⟩ − μ̂)/σ̂ |

    where every argument except α̂, β̂ is detached (μ_i, σ_i, μ_B, σ_B from the detached input; μ_E, σ_E²
    the EMA *before* this step's update, i.e. the estimate that does not yet contain the current batch), so
    it moves only α̂, β̂. The paper's ‖·‖₁ is a sum over the layer's activations; we divide it by their number
    so the loss scale does not depend on the feature-map size. A layer called several times per iteration
    (a RetinaNet head shared over FPN levels) keeps one term per call until :func:`evalnorm_aux_loss`
    collects them (at most :attr:`max_pending_aux`), and its loss is the L1 sum over the elements of *all*
    pending calls divided by their total number: the paper's L1 sum times a positive constant, so α̂, β̂ have
    the paper's minimizer (each layer's α̂, β̂ only see their own loss). A per-call mean summed over calls
    would weight a small level as much as a 64× larger one and move the minimizer. σ² always includes
    ``eps`` as in BN.

    Eval: eqs 5-6 with the sample's own statistics (float32 for fp16/bf16 input), then one fused
    ``x·scale + shift``. α̂, β̂ are detached here: only L_aux estimates them (§3.4: "the parameters used in
    EN are independent of the deep network").

    Parametrization: α̂ = sigmoid(``alpha_logit``), β̂ = sigmoid(``beta_logit``), two scalar parameters per
    layer, always in (0, 1), never stuck at a clamp bound, listed in :attr:`no_weight_decay`. They require
    grad only in ``"online"`` mode (so DDP does not see unused parameters in the other modes).

    Buffers: BN's ``running_mean``, ``running_var``, ``num_batches_tracked`` (updated exactly as BN) and
    ``seen_batch_size`` / ``seen_batches``: the mean number of examples N over this layer's non-empty training
    forwards and their count; ``"rule"`` mode uses B = ``seen_batch_size`` unless ``rule_batch_size > 0``.
    Eval never mutates a buffer.

    Loading a plain ``nn.BatchNorm2d`` / detectron2 ``FrozenBatchNorm2d`` state: the BN entries load; the
    EvalNorm entries are reported in ``missing_keys`` (and logged) and keep their initial values.
    """

    no_weight_decay = ("alpha_logit", "beta_logit")
    # a BN checkpoint has none: initial values (α̂, β̂ fitted later; 0 = no batch size recorded yet)
    optional_state = ("alpha_logit", "beta_logit", "seen_batch_size", "seen_batches")
    #: training-time aux-loss terms kept until :func:`evalnorm_aux_loss` collects them; beyond this the oldest
    #: is dropped (with a warning), so a model that never collects them does not hold its activations forever
    max_pending_aux = 32

    CFG_NODE = "EVALNORM"
    #: the eq-9 aux loss moves only α̂, β̂ (evalnorm §3.4, stop-gradient): the EvalNorm-aware meta-architectures
    #: add it under this key, and the trainer logs it apart from total_loss
    aux_loss_key = "loss_evalnorm"
    CFG_DOC = 'EvalNorm: evalnorm §3.3-3.4, eqs 5-9'
    OPTIONS = (
        Option("MODE", "online", "'online' (alpha/beta learned in training by the stop-gradient aux loss, eq 9), "
               "'rule' (alpha = beta = 1/B^2, §4.1 rule of thumb), 'offline' (fitted after training, §3.4).",
               arg="mode", check=Choice(*EVALNORM_MODES)),
        Option("RULE_BATCH_SIZE", 0, "B of the 'rule' mode; 0 = the normalization batch size the layer recorded "
               "in training (buffer seen_batch_size).", arg="rule_batch_size",
               check=Int(0, note=" (0 = use the recorded batch size)")),
        Option("INIT_ALPHA", 0.1, "Initial alpha-hat (eq 5), strictly inside (0, 1) (stored as a logit; §3.4 gives "
               "no value); also the value kept when a BN checkpoint without alpha is loaded.", arg="init_alpha",
               check=Number(0, 1, low_open=True, high_open=True)),
        Option("INIT_BETA", 0.1, "Initial beta-hat (eq 6), as INIT_ALPHA.", arg="init_beta",
               check=Number(0, 1, low_open=True, high_open=True)),
        Option("AUX_LOSS_WEIGHT", 1.0, "Weight of the aux loss term loss_evalnorm added by the EvalNorm-aware "
               "meta-architectures (the layers never apply it: evalnorm_aux_loss(model) is the unweighted sum).",
               check=Number(0)),
        Option("OFFLINE_ITERS", 200, "Offline estimation (§3.4): Adam iterations of the hooks/tools that fit "
               "alpha/beta on a frozen model.", check=Int(1)),
        Option("OFFLINE_LR", 0.05, "Offline estimation: Adam learning rate on the logits.",
               check=Number(0, low_open=True)),
    )

    def __init__(
        self,
        num_features: int,
        mode: str,
        rule_batch_size: int,
        init_alpha: float,
        init_beta: float,
        eps: float,
        momentum: Optional[float],
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        if not track_running_stats:
            raise ValueError("EvalNorm: track_running_stats must be True (eqs 5-6 need the EMA μ_E, σ_E²)")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, device=device, dtype=dtype)
        f = {"device": device, "dtype": torch.float32}
        self.alpha_logit = nn.Parameter(torch.tensor(_logit(float(init_alpha)), **f))
        self.beta_logit = nn.Parameter(torch.tensor(_logit(float(init_beta)), **f))
        self.register_buffer("seen_batch_size", torch.zeros((), **f))
        self.register_buffer("seen_batches", torch.zeros((), dtype=torch.long, device=device))
        self.init_alpha, self.init_beta = float(init_alpha), float(init_beta)
        self.rule_batch_size = int(rule_batch_size)
        self._fitting = False  # set by fit_evalnorm_offline: aux loss on, every buffer update off
        self._aux_terms: List[torch.Tensor] = []  # per pending call: element mean of |·| (eq 9 / count)
        self._aux_counts: List[int] = []  # per pending call: its number of elements
        self._warned_pending = False
        self._seen_version = 0  # bumped when seen_batch_size may change (training forward, checkpoint load)
        self._rule_cache = None  # ((rule_batch_size, _seen_version), 1/B²) of the "rule" mode's eval
        self.mode = mode

    def __getstate__(self):
        """Copies (``copy.deepcopy``: an EMA / SWA teacher) and pickles leave the pending aux-loss terms behind:
        they are this module's autograd graphs of the current iteration (deepcopy of a non-leaf tensor fails),
        collected by the next :func:`evalnorm_aux_loss` of the original only."""
        state = self.__dict__.copy()
        state["_aux_terms"], state["_aux_counts"] = [], []
        return state

    # ---- options ----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.OPTIONS[0].validate(value, "EVALNORM", "EvalNorm")
        self._mode = value
        self.alpha_logit.requires_grad_(value == "online")
        self.beta_logit.requires_grad_(value == "online")

    def extra_repr(self):
        return super().extra_repr() + f", mode={self._mode!r}, rule_batch_size={self.rule_batch_size}"

    @property
    def alpha_hat(self) -> torch.Tensor:
        """The learned α̂ ∈ (0, 1) (online/offline modes), with its graph."""
        return torch.sigmoid(self.alpha_logit)

    @property
    def beta_hat(self) -> torch.Tensor:
        """The learned β̂ ∈ (0, 1) (online/offline modes), with its graph."""
        return torch.sigmoid(self.beta_logit)

    def rule_batch_size_used(self) -> float:
        """B of the ``"rule"`` mode: ``rule_batch_size`` if > 0, else the recorded ``seen_batch_size``."""
        if self.rule_batch_size > 0:
            return float(self.rule_batch_size)
        if int(self.seen_batches) == 0:
            raise RuntimeError(
                "EvalNorm mode 'rule' needs the normalization batch size B (alpha = beta = 1/B^2), but this layer "
                "has not recorded one (no training forward and none in the checkpoint). Set "
                "D2NORM.EVALNORM.RULE_BATCH_SIZE > 0."
            )
        return float(self.seen_batch_size)

    def eval_alpha_beta(self):
        """(α̂, β̂) that eval uses in the current mode: Python floats 1/B² in ``"rule"`` mode (exact in any
        dtype, no host-to-device copy), else the detached scalar tensors sigmoid(logit). The recorded B is read on
        the host once and cached until the next training forward or checkpoint load (not once per eval call)."""
        if self._mode == "rule":
            key = (self.rule_batch_size, self._seen_version)
            if self._rule_cache is None or self._rule_cache[0] != key:
                self._rule_cache = (key, 1.0 / self.rule_batch_size_used() ** 2)
            v = self._rule_cache[1]
            return v, v
        return self.alpha_hat.detach(), self.beta_hat.detach()

    # ---- aux loss ---------------------------------------------------------------------------------------
    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Eq 9 over the training forwards since the last collection: Σ over every pending call's elements of
        |·|, divided by their total number (class docstring); None when nothing is pending."""
        if not self._aux_terms:
            return None
        # counts are Python ints: scalar multipliers, no host-to-device copy of a count vector
        total = sum(t * c for t, c in zip(self._aux_terms, self._aux_counts))
        return total / max(sum(self._aux_counts), 1)

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        loss = self.aux_loss
        self.clear_aux()
        return loss

    def clear_aux(self) -> None:
        """Drop the pending aux-loss terms."""
        self._aux_terms.clear()
        self._aux_counts.clear()

    def _push_aux(self, term: torch.Tensor, count: int) -> None:
        if len(self._aux_terms) >= self.max_pending_aux:
            if not self._warned_pending:
                logger.warning(
                    "EvalNorm: %d aux-loss terms were never collected; dropping the oldest. Add "
                    "evalnorm_aux_loss(model) to the loss every iteration (mode 'online').",
                    len(self._aux_terms),
                )
                self._warned_pending = True
            self._aux_terms.pop(0)
            self._aux_counts.pop(0)
        self._aux_terms.append(term)
        self._aux_counts.append(count)

    def _aux_loss(self, x: torch.Tensor, mu_e: torch.Tensor, var_e: torch.Tensor) -> torch.Tensor:
        """Eqs 7-9 on the detached input ``x`` (N > 0) and the pre-update EMA ``mu_e``, ``var_e`` (C,)
        (:class:`_AuxLoss`)."""
        sd = stat_dtype(x.dtype)
        # in the statistics dtype with autocast off: under AMP fp16 autocast would run the row sums of eq 9 in
        # half precision (torch.linalg.vecdot), whose sums over a feature map overflow to inf
        with autocast_off(x.device):
            return _AuxLoss.apply(x.to(sd), mu_e.to(sd), var_e.to(sd), self.alpha_hat.to(sd), self.beta_hat.to(sd),
                                  self.eps)

    # ---- forward ----------------------------------------------------------------------------------------
    @property
    def fitting(self) -> bool:
        """True while :func:`~d2norm.stats.evalnorm_fit.fit_evalnorm_offline` is fitting this layer."""
        return self._fitting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"EvalNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if self.training:
            return self._train_forward(x)
        return self._eval_forward(x)

    @skip_nonfinite_stats
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        want_aux = (self._mode == "online" or self._fitting) and torch.is_grad_enabled()
        nonempty = x.numel() > 0
        if want_aux and nonempty:
            mu_e, var_e = self.running_mean.clone(), self.running_var.clone()
        if self._fitting:
            # batch statistics exactly as in training, but no buffer is touched (offline fit, §3.4)
            y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        else:
            y = super().forward(x)
            if nonempty:
                self._record_batch_size(x.shape[0])
        if want_aux:
            if nonempty:
                term = self._aux_loss(x.detach(), mu_e, var_e)
            else:
                # keeps α̂, β̂ in the graph (DDP) with a zero loss
                term = (self.alpha_logit + self.beta_logit) * 0.0
            self._push_aux(term, x.numel())
        return y

    @torch.no_grad()
    def _record_batch_size(self, n: int) -> None:
        self._seen_version += 1
        self.seen_batches.add_(1)
        self.seen_batch_size.add_((n - self.seen_batch_size) / self.seen_batches)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clear_aux()
        if x.numel() == 0:
            return empty_passthrough(x, self.weight, self.bias)
        alpha, beta = self.eval_alpha_beta()
        sd = stat_dtype(x.dtype)
        xs = x.to(sd)
        mu_e = self.running_mean.to(sd)
        var_e = self.running_var.to(sd)
        w, b = (self.weight.to(sd), self.bias.to(sd)) if self.affine else (None, None)
        fused = mix_normalize(xs, mu_e, var_e, w, b, alpha, beta, self.eps)  # CPU inference: one native pass
        if fused is not None:
            return fused.to(x.dtype)
        mu_i, var_i = group_moments(xs)  # (N, C), one vectorized pass
        if isinstance(alpha, torch.Tensor):
            alpha, beta = alpha.to(sd), beta.to(sd)
        d = mu_i - mu_e
        mu_hat = mu_e + alpha * d  # eq 5
        var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * d.square()  # eq 6
        scale = torch.rsqrt(var_hat + self.eps)
        if self.affine:
            scale = scale * self.weight.to(sd)
            shift = self.bias.to(sd) - mu_hat * scale
        else:
            shift = -mu_hat * scale
        return channel_affine(xs, scale, shift).to(x.dtype)

    def frozen_bn_state(self):
        """BN's population statistics (μ_E, σ_E²): after the switch training and inference are the same constant
        map, so the train-test inconsistency this inference corrects no longer exists (rethinking §4.3);
        α̂, β̂ are dropped."""
        return super().frozen_bn_state()._replace(note=OWN_STATS_NOTE)

    def inference_affine(self):
        raise NotAnAffine("EvalNorm: inference uses each sample's own statistics (evalnorm eqs 5-6)")

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._seen_version += 1
        absent = [k for k in ("alpha_logit", "beta_logit") if prefix + k not in state_dict]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:
            # e.g. a plain BN / FrozenBN checkpoint: reported through missing_keys (d2norm's checkpointer says it
            # once for all layers: ParameterLoadReport.optional); per layer only at DEBUG level
            logger.debug(
                "EvalNorm %s: checkpoint has no %s; keeping alpha=%.4g, beta=%.4g (mode=%r)",
                prefix.rstrip(".") or "<module>",
                ", ".join(absent),
                float(self.alpha_hat.detach()),
                float(self.beta_hat.detach()),
                self._mode,
            )


# ---- model-level helpers ------------------------------------------------------------------------------------
def evalnorm_modules(model: nn.Module) -> Dict[str, EvalNorm2d]:
    """Every :class:`EvalNorm2d` in ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EvalNorm2d)}


def evalnorm_aux_loss(model: nn.Module, clear: bool = True) -> torch.Tensor:
    """Sum of the pending aux losses (eq 9) of every EvalNorm layer in ``model`` (unweighted).

    Called once per iteration after the forward, it collects (and with ``clear``, forgets) the terms the
    training forwards stored. Returns a 0 tensor (on the model's device) when there are none.
    """
    total = None
    device = None
    for m in evalnorm_modules(model).values():
        device = m.alpha_logit.device
        loss = m.pop_aux_loss() if clear else m.aux_loss
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        total = torch.zeros((), device=device)
    return total


def evalnorm_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The α̂, β̂ logit parameters of every EvalNorm layer (alpha, beta, alpha, beta, ...)."""
    out = []
    for m in evalnorm_modules(model).values():
        out += [m.alpha_logit, m.beta_logit]
    return out


@torch.no_grad()
def evalnorm_alpha_beta(model: nn.Module, effective: bool = False) -> Dict[str, Dict[str, float]]:
    """``{module name: {"alpha": α̂, "beta": β̂}}`` for logging (e.g. to detectron2's event storage).

    By default the learned values sigmoid(logit); with ``effective=True`` the values eval uses in each
    layer's mode (1/B² in ``"rule"`` mode; raises if B is unknown there).
    """
    out = {}
    for name, m in evalnorm_modules(model).items():
        a, b = m.eval_alpha_beta() if effective else (m.alpha_hat.detach(), m.beta_hat.detach())
        out[name] = {"alpha": float(a), "beta": float(b)}
    return out
