"""Moving Average Batch Normalization (MABN) and the weight-centralized convolution it is used with.

mabn §4 (eqs 12-20), Appendix B. MABN normalizes without mean centering (§4.2, eq 15), uses moving-average
statistics in the forward pass (the simple moving average χ̄² renormalized towards the EMA χ̂, eq 19) and the
simple moving average Ψ̄ of the gradient statistic Ψ_B in the backward pass (eq 20). The mean centering it drops
is compensated by centralizing the weights of the preceding convolution (eq 18, :class:`CenteredConv2d`).

Symbols (per channel; "batch" = all examples and spatial positions of one forward, as in BN):

* χ²_B = E_B[x²] + ε                 (eq 15; ε only guards all-zero channels, the paper has ε = 0)
* χ̄²_t = mean of the last m values of χ²_B, this step's included   (SMA, eq 19 / 13)
* χ̂_t  = α·χ̂_{t-1} + (1-α)·χ_B_t   (EMA of χ_B, not of χ²; mabn text below eq 20)
* r    = clip(χ̄_t / χ̂_t, 1/λ, λ)    (eq 19)
* forward:   Y = x / χ̄_t,  Ŷ = r·Y,  z = γ·Ŷ + β                                           (eqs 19, 15)
* backward:  ∂L/∂Y = r·∂L/∂Ŷ,  Ψ_B = mean_B(Y·∂L/∂Y),  Ψ̄_t = mean of the last m Ψ_B (this step's included),
             ∂L/∂x = (∂L/∂Y − Y·Ψ̄_t) / χ̄_t                                                 (eqs 20, 5, 13)
  Note Ψ_B = mean(Ŷ·∂L/∂Ŷ) as well, since Ŷ·∂L/∂Ŷ = (rY)·(∂L/∂Y / r).
* inference: z = γ·x / χ̂ + β (linear, foldable into the preceding convolution)
"""
from typing import Iterator, List, Optional, Tuple

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.autograd.function import once_differentiable

from ..stats.adapters import StatsAdapter, reduce_dims
from ..moments import batch_moments
from .base import (
    D2NormModule, FrozenBNState, check_input_channels, skip_nonfinite_stats, stat_dtype, undo_nonfinite_update_,
)
from ..options import Choice, Int, Number, Option
from ..utils.validation import check_int
from .kernels import channel_affine
from .native import native_for, row_center
from .registry import register_norm

__all__ = [
    "MABN2d",
    "MABNFunction",
    "WeightCentralized",
    "CenteredConv2d",
    "CenteredPlainConv2d",
    "effective_conv_weight",
    "centralize_mabn_convs",
    "check_mabn_wiring",
    "set_mabn_warmup",
    "set_mabn_calls_per_iteration",
]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _window_mean(ring: torch.Tensor, count: torch.Tensor, current: torch.Tensor):
    """SMA over the last ``min(count + 1, m)`` values once ``current`` is pushed into ``ring``.

    ``count`` values have been pushed so far (entry ``i`` of the ring holds the most recent push with index
    ``i mod m``; unfilled entries are 0, so summing all m entries sums exactly the filled ones). Device-side
    arithmetic only: no host synchronization. Returns ``(mean, pos)``; ``ring`` is not modified (the caller
    writes ``current`` at ``pos`` when the state is updated).
    """
    m = ring.shape[0]
    pos = torch.remainder(count, m).view(1)
    window = ring.to(current.dtype).index_copy(0, pos, current.view(1, -1))
    fill = torch.clamp(count + 1, max=m).to(current.dtype)
    return window.sum(0) / fill, pos


class MABNFunction(torch.autograd.Function):
    """One training step of MABN: forward eq 19, backward eq 20 (mabn §4.2).

    ``apply(x, weight, bias, chi_sq_ring, psi_ring, running_chi, num_batches_tracked, psi_count,
    warmup_iters, momentum, clip, eps, update_state, r_one_iters)``

    * Warm-up (``num_batches_tracked < warmup_iters``): χ̄ → χ_B, Ψ̄ → Ψ_B and r = 1, i.e. eq 15 with its exact
      gradient eq 16. The rings and the EMA are filled all the same.
    * After warm-up: eq 19 forward and eq 20 backward with the SMAs of the rings; r ≡ 1 as long as
      ``num_batches_tracked < r_one_iters`` (the authors' released schedule, :class:`MABN2d`).

    What the backward treats as constants (eq 20 taken literally):

    * r (and through it χ̂_t) is a constant, as in batch renormalization (mabn §4.1 eq 14): ∂L/∂Y = r·∂L/∂Ŷ.
    * χ̄_t (in the factor 1/χ̄_t and in Y = x/χ̄_t) is a constant, and so are the past entries of both rings.
    * The only path from ∂L/∂x back through the statistic χ̄ is the term −Y·Ψ̄_t/χ̄_t, in which the batch
      statistic Ψ_B of eq 16 is replaced by the SMA Ψ̄_t. Equivalently, with k the window length and P the sum
      of the k-1 past Ψ entries: ∂L/∂x = [exact gradient of eq 19 w.r.t. x with r and the past χ² entries
      held fixed] − Y·P / (k·χ̄_t). So when P = 0 (and in warm-up, where k = 1) the backward is the exact
      gradient of the forward, which is what the gradcheck tests verify.
    * Ψ_B is pushed into ``psi_ring`` during the backward (each backward call of a training forward pushes
      one value); γ and β get their ordinary gradients Σ ∂L/∂z·Ŷ and Σ ∂L/∂z.

    With ``update_state=False`` the rings, the EMA and the counters are read but never written (statistics are
    computed as if this step's values had been pushed): the state is held fixed, e.g. for gradcheck.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chi_sq_ring, psi_ring, running_chi, num_batches_tracked, psi_count,
                warmup_iters: int, momentum: float, clip: float, eps: float, update_state: bool,
                r_one_iters: int = 0):
        sd = stat_dtype(x.dtype)
        dims = reduce_dims(x)
        n = x.numel() // x.shape[1]
        xs = x.to(sd)

        native = native_for(xs, 2)  # d2norm's CPU kernels, or None (torch ops)
        if native is not None:  # CPU: per-channel moments in one read (d2norm's kernel), E[x²] = var + mean²
            mean_b, var_b = native.channel_moments(xs)
            chi_sq_b = var_b + mean_b * mean_b + eps
        else:
            # χ²_B = E[x²] + ε (eq 15); vector_norm reduces without materializing x².
            chi_sq_b = torch.linalg.vector_norm(xs, 2, dim=dims).square() / n + eps
        warm = num_batches_tracked < warmup_iters
        chi_bar_sq, pos = _window_mean(chi_sq_ring, num_batches_tracked, chi_sq_b)
        chi = torch.where(warm, chi_sq_b, chi_bar_sq).sqrt()  # χ̄_t (χ_B in warm-up)
        chi_hat = momentum * running_chi.to(sd) + (1.0 - momentum) * chi_sq_b.sqrt()  # EMA of χ_B, §4.2
        r_one = warm | (num_batches_tracked < r_one_iters)
        r = torch.where(r_one, torch.ones_like(chi), torch.clamp(chi / chi_hat, 1.0 / clip, clip))  # eq 19

        if update_state:
            chi_sq_ring.index_copy_(0, pos, chi_sq_b.view(1, -1).to(chi_sq_ring.dtype))
            running_chi.copy_(chi_hat)
            num_batches_tracked.add_(1)

        # z = γ·r·x/χ̄ + β in one fused pass (BN's inference kernel on CPU, layers/kernels.py).
        scale = weight.to(sd) * r / chi
        y = channel_affine(xs, scale, bias.to(sd)).to(x.dtype)

        ctx.save_for_backward(x, weight, chi, r, warm)
        ctx.psi_ring = psi_ring
        ctx.psi_count = psi_count
        ctx.update_state = update_state
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        x, weight, chi, r, warm = ctx.saved_tensors
        sd = chi.dtype
        dims = reduce_dims(x)
        n = x.numel() // x.shape[1]
        xs, gs = x.to(sd), grad_z.to(sd)

        native = native_for(xs, 2)  # d2norm's CPU kernels, or None (torch ops)
        if native is not None:
            gs = gs.contiguous()
            rows = xs.shape[0] * xs.shape[1]
            sum_g, sum_xg = (t.view(xs.shape[0], -1).sum(0) for t in native.row_dot_sums(gs, xs, rows))
        else:
            sum_g, sum_xg = None, (xs * gs).sum(dims)
        r_over_chi = r / chi  # Ŷ = x·r/χ̄
        a = weight.to(sd) * r_over_chi  # ∂L/∂Y = r·γ·∂L/∂z, so ∂L/∂Y / χ̄ = a·∂L/∂z
        psi_b = a * sum_xg / n  # Ψ_B = mean(Y·∂L/∂Y), eq 5
        psi_sma, pos = _window_mean(ctx.psi_ring, ctx.psi_count, psi_b)
        psi_bar = torch.where(warm, psi_b, psi_sma)
        if ctx.update_state:
            old = (ctx.psi_ring.clone(), ctx.psi_count.clone())
            ctx.psi_ring.index_copy_(0, pos, psi_b.view(1, -1).to(ctx.psi_ring.dtype))
            ctx.psi_count.add_(1)
            undo_nonfinite_update_((ctx.psi_ring, ctx.psi_count), old)  # a non-finite Ψ_B is not pushed

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # eq 20: (∂L/∂Y − Y·Ψ̄)/χ̄ = a·g − x·Ψ̄/χ̄² (one element-wise pass, no reduction).
            b = -psi_bar / (chi * chi)
            if native is not None:  # one pass: g·a_c + x·b_c per (sample, channel) row
                k = xs.shape[0]
                grad_x = native.row_affine2(gs, a.repeat(k), xs, b.repeat(k), b.new_zeros(k * b.numel()))
            else:
                grad_x = torch.addcmul(xs * _channel_view(b, xs), gs, _channel_view(a, xs))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (r_over_chi * sum_xg).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (gs.sum(dims) if sum_g is None else sum_g).to(weight.dtype)
        return (grad_x, grad_w, grad_b) + (None,) * 11


SCHEDULES = ("paper", "released")


@register_norm("MABN")
class MABN2d(nn.Module, D2NormModule):
    """Moving Average Batch Normalization (mabn §4.2, eqs 15, 19, 20) over inputs of shape (N, C, *).

    Training runs :class:`MABNFunction` (see it for the exact equations and what the backward treats as
    constants). Eval: ``z = γ·x/χ̂ + β`` with the EMA χ̂ (``running_chi``), a per-channel affine map.

    Registered buffers (the complete state: a checkpoint resumes bit-exactly):

    * ``running_chi`` (C,): χ̂, init 1. Updated by every non-empty training forward.
    * ``chi_sq_buffer`` (m, C): ring of χ²_B; push number i lives in row i mod m; unfilled rows are 0.
      Updated by every non-empty training forward.
    * ``num_batches_tracked`` (): training forwards so far = pushes into ``chi_sq_buffer``; the warm-up
      counter (warm-up while it is < ``warmup_iters``).
    * ``psi_buffer`` (m, C), ``psi_count`` (): ring of Ψ_B and its push count; updated by the backward of a
      training forward (a training forward without backward, e.g. under ``no_grad``, pushes no Ψ_B).

    Eval never writes a buffer; zero-size input writes none either (its statistics do not exist). fp16/bf16
    input: statistics in float32, output in the input dtype. Not for activation checkpointing (a recomputed
    forward would push twice). ``momentum`` uses the paper's convention (weight of the old value).

    ``schedule`` (``D2NORM.MABN.SCHEDULE``), with t = 1, 2, ... the training step of the layer:

    * ``"paper"`` (default): batch statistics (χ_B, Ψ_B, r = 1) for t ≤ ``warmup_iters``, eq 19-20 after.
    * ``"released"``: the schedule of the authors' released ``MABN.py``, for comparing against the official
      numbers: batch statistics while t ≤ m (``buffer_size``) or t < ``warmup_iters``; r ≡ 1 (no
      renormalization) for t ≤ max(1000, ``warmup_iters``); afterwards r = clip(·, 1/λ, λ) — the released code
      hard-codes λ = 5, our ``clip`` default. Only the schedule is reproduced: the released code's χ̂ is an EMA
      of the window statistic χ̄² taken before this step's update (r = χ̄/χ̂_{t−1}), ours the EMA of χ_B of the
      paper's text (r = χ̄/χ̂_t); both use it for inference.
    """

    CFG_NODE = "MABN"
    CFG_DOC = 'MABN: mabn §4, eqs 12-20; Appendix B'
    OPTIONS = (
        Option("BUFFER_SIZE", 16, "m: recent batches in the simple moving averages chi_bar^2 and Psi_bar (eqs 13, "
               "19-20); 16 in Tables 2-4 and 8, 32 in Tables 5-6.", arg="buffer_size", check=Int(1)),
        Option("MOMENTUM", 0.98, "alpha in [0, 1), the paper's convention (weight of the OLD value, opposite to "
               "torch's): chi_hat_t = alpha chi_hat_{t-1} + (1 - alpha) chi_B_t (§4.2 below eq 20); 0.98 in "
               "Appendix B.2-B.4.", arg="momentum", check=Number(0, 1, high_open=True)),
        Option("CLIP", 5.0, "lambda >= 1 in r = clip(chi_bar / chi_hat, 1/lambda, lambda) (eq 19); the paper "
               "gives none, 5 is the authors' released code's.", arg="clip", check=Number(1)),
        Option("WARMUP_ITERS", 100, "Training steps of the layer using batch statistics chi_B, Psi_B and r = 1 "
               "(Appendix B.3: 'batch statistics ... during first 10,000 iterations'); buffers fill meanwhile.",
               arg="warmup_iters", check=Int(0)),
        Option("EPS", 1e-5, "eps >= 0 added to E[x^2] (eq 15 has none; it guards all-zero channels).", arg="eps",
               check=Number(0)),
        Option("SCHEDULE", "paper", "'paper' (eq 19 after WARMUP_ITERS) or 'released' (the authors' code: batch "
               "statistics while step <= BUFFER_SIZE or < WARMUP_ITERS, r = 1 until step max(1000, WARMUP_ITERS)).",
               arg="schedule", check=Choice(*SCHEDULES)),
    )

    def __init__(self, num_features: int, buffer_size: int, momentum: float, clip: float, warmup_iters: int,
                 eps: float, schedule: str, device=None, dtype=None):
        super().__init__()
        check_int("MABN num_features", num_features, minimum=1)
        self.schedule = schedule
        self.num_features = int(num_features)
        self.buffer_size = int(buffer_size)
        self.momentum = float(momentum)
        self.clip = float(clip)
        self.warmup_iters = int(warmup_iters)
        self.eps = float(eps)
        f = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **f))
        self.bias = nn.Parameter(torch.zeros(num_features, **f))
        self.register_buffer("running_chi", torch.ones(num_features, **f))
        self.register_buffer("chi_sq_buffer", torch.zeros(buffer_size, num_features, **f))
        self.register_buffer("psi_buffer", torch.zeros(buffer_size, num_features, **f))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("psi_count", torch.tensor(0, dtype=torch.long, device=device))

    #: stock backbone builder -> d2norm's weight-centralized MABN twin (mabn §4.2 eq 18)
    MABN_BACKBONES = {
        "build_resnet_backbone": "build_mabn_resnet_backbone",
        "build_resnet_fpn_backbone": "build_mabn_resnet_fpn_backbone",
        "build_retinanet_resnet_fpn_backbone": "build_mabn_retinanet_resnet_fpn_backbone",
    }

    @classmethod
    def check_cfg_use(cls, cfg, keys, world: int) -> None:
        """Warns for MABN in a stock (not weight-centralized) backbone, FPN, box / mask head or RetinaNet head:
        mabn §4.2 eq 18 centralizes the weights of the conv before each MABN, which d2norm's MABN builders do."""
        from .cfg_checks import warn_once

        used = set(keys)
        backbone = cfg.MODEL.BACKBONE.NAME
        arch = cfg.MODEL.META_ARCHITECTURE
        twin = cls.MABN_BACKBONES.get(backbone)
        eq18 = "its convs are not weight-centralized, which MABN needs (mabn §4.2 eq 18)"
        if "MODEL.RESNETS.NORM" in used and twin:
            warn_once(f"MODEL.RESNETS.NORM 'MABN' with the stock backbone MODEL.BACKBONE.NAME {backbone!r}: {eq18}. "
                      f"Use MODEL.BACKBONE.NAME {twin!r}.")
        if "MODEL.FPN.NORM" in used and twin and "fpn" in backbone:
            warn_once(f"MODEL.FPN.NORM 'MABN' with the stock backbone MODEL.BACKBONE.NAME {backbone!r}: {eq18}. "
                      f"Use MODEL.BACKBONE.NAME {twin!r}.")
        rcnn = "RCNN" in arch or arch == "PanopticFPN"
        head = cfg.MODEL.ROI_BOX_HEAD
        if rcnn and "MODEL.ROI_BOX_HEAD.NORM" in used and head.NAME != "MABNConvFCHead" and head.NUM_CONV:
            warn_once(f"MODEL.ROI_BOX_HEAD.NORM 'MABN' with MODEL.ROI_BOX_HEAD.NAME {head.NAME!r}: {eq18}. "
                      f"Use MODEL.ROI_BOX_HEAD.NAME 'MABNConvFCHead'.")
        mask = cfg.MODEL.ROI_MASK_HEAD
        if (rcnn and cfg.MODEL.MASK_ON and "MODEL.ROI_MASK_HEAD.NORM" in used
                and mask.NAME != "MABNMaskRCNNConvUpsampleHead"):
            warn_once(f"MODEL.ROI_MASK_HEAD.NORM 'MABN' with MODEL.ROI_MASK_HEAD.NAME {mask.NAME!r}: {eq18}. "
                      f"Use MODEL.ROI_MASK_HEAD.NAME 'MABNMaskRCNNConvUpsampleHead'.")
        if "RetinaNet" in arch and arch != "MABNRetinaNet" and "MODEL.RETINANET.NORM" in used:
            warn_once(f"MODEL.RETINANET.NORM 'MABN' with MODEL.META_ARCHITECTURE {arch!r}: {eq18}. "
                      f"Use MODEL.META_ARCHITECTURE 'MABNRetinaNet'.")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, buffer_size={self.buffer_size}, momentum={self.momentum}, "
                f"clip={self.clip}, warmup_iters={self.warmup_iters}, eps={self.eps}, schedule={self.schedule!r}")

    def phase_iters(self) -> Tuple[int, int]:
        """(steps with batch statistics, steps with r ≡ 1) from the start, for ``schedule`` (class docstring);
        as counts of completed steps (``num_batches_tracked``) below which the phase holds."""
        if self.schedule == "released":
            return max(self.buffer_size, self.warmup_iters - 1), max(1000, self.warmup_iters)
        return self.warmup_iters, 0

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(f"MABN2d({self.num_features})", x, self.num_features)
        if self.training and x.numel() > 0:
            warm, r_one = self.phase_iters()
            return MABNFunction.apply(
                x, self.weight, self.bias, self.chi_sq_buffer, self.psi_buffer, self.running_chi,
                self.num_batches_tracked, self.psi_count, warm, self.momentum, self.clip,
                self.eps, True, r_one,
            )
        # Inference (and empty training input): z = γ·x/χ̂ + β.
        sd = stat_dtype(x.dtype)
        scale = self.weight.to(sd) / self.running_chi.to(sd)
        return channel_affine(x.to(sd), scale, self.bias.to(sd)).to(x.dtype)  # one fused pass (layers/kernels.py)


    # ---- protocol (layers/base.py) -----------------------------------------------------------------------
    def stats_adapter(self):
        """Population χ = sqrt(E[x²] + ε) per channel (:class:`MABNAdapter`)."""
        return MABNAdapter(self)

    def frozen_bn_state(self) -> FrozenBNState:
        """z = γ·x/χ̂ + β (mabn §4.2) is FrozenBN with μ = 0 and σ² + ε = χ̂², exactly its eval output."""
        chi = self.running_chi.detach()
        return FrozenBNState(torch.zeros_like(chi), chi * chi - self.eps, self.eps, self.weight, self.bias)

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        return ("MABN normalizes without mean centering by the moving-average second moment χ̂ (mabn §4.2 eqs "
                "12-20): there is no batch mean/variance pair for eq 3 or EvalNorm to mix with")

    def inference_affine(self):
        """Inference z = γ·x/χ̂ + β (mabn §4.2) is a fixed affine map: scale γ/χ̂, shift β."""
        sd = stat_dtype(self.running_chi.dtype)
        scale = self.weight.detach().to(sd) / self.running_chi.detach().to(sd)
        return scale, self.bias.detach().to(sd).clone()


class MABNAdapter(StatsAdapter):
    """:class:`~d2norm.layers.mabn.MABN2d`: per channel χ = sqrt(E[x²] + ε) (mabn eq 15)."""

    @property
    def rows(self) -> int:
        return self.module.num_features

    def forward(self, x):
        m = self.module
        check_input_channels(f"MABN2d({m.num_features})", x, m.num_features)
        sd = stat_dtype(x.dtype)
        xs = x.to(sd)
        if x.numel() == 0:
            chi = m.running_chi.to(sd)
        elif self.mode == "population":
            _, _, sq = self.population(0, sd)
            self._touch()
            chi = (sq + m.eps).sqrt()
        else:
            n, mean, var = batch_moments(x, reduce_dims(x))
            self.record(0, n, mean, var)
            chi = (var + mean * mean + m.eps).sqrt()  # χ_B of eq 15
        scale = m.weight.to(sd) / chi
        return torch.addcmul(_channel_view(m.bias.to(sd), xs), xs, _channel_view(scale, xs)).to(x.dtype)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_chi.copy_((est.sq_mean + m.eps).sqrt().to(m.running_chi.dtype))

    def ema_stats(self, slot):
        """No mean (MABN does not center); σ is χ = sqrt(E[x²] + ε) (``running_chi``, mabn eq 15)."""
        return None, self.module.running_chi.detach().double()

    def comparable_stats(self, est):
        return None, (est.sq_mean + self.module.eps).sqrt()

    def training_moving_stats(self, slot):
        """χ̄ = sqrt(SMA of the ring's χ²_B = E[x²] + ε over its filled entries): what the next training step
        normalizes with (eq 19; its own batch takes the place of the oldest entry) once past the phase with batch
        statistics (``phase_iters``); ``None`` before."""
        m = self.module
        t = int(m.num_batches_tracked)
        if t < m.phase_iters()[0] or t == 0:
            return None
        fill = min(t, m.buffer_size)
        return None, (m.chi_sq_buffer.detach().double().sum(0) / fill).sqrt()


class WeightCentralized:
    """Mixin of the convolutions with Weight Centralization (mabn §4.2, eq 18): the convolution uses
    ``W − mean(W)`` where the mean is over (in_channels/groups, kh, kw) for each output channel, i.e. eq 18's
    W̄ = (1/p)·Σ_i W_{:,i}. The centering is part of the forward graph, so the gradient reaching ``weight`` is
    the projection of the centered weight's gradient (its per-output-channel mean removed). No state of its own:
    a conv's class can be swapped in place (:func:`centralize_mabn_convs`)."""

    def centered_weight(self) -> torch.Tensor:
        return _CenterRows.apply(self.weight)


class _CenterRows(torch.autograd.Function):
    """``W − mean(W)`` over every dim but the first (eq 18's W̄ per output channel), with the backward written
    out: the centering is an orthogonal projection P, so ∂L/∂W = P(∂L/∂(W − W̄)) = G − mean(G), the same map.
    On CPU both directions are d2norm's one-pass kernel (:func:`~d2norm.layers.native.row_center`: one read,
    one write); elsewhere ``t - t.mean(...)``. Autograd's own backward of ``w - w.mean(...)`` takes five passes
    over the weight (neg, sum, an expanded div, add); centering was most of MABN's extra cost in detector
    training, where every backbone conv is centered (``tools/benchmark_models.py``). The backward applies this
    Function again, so higher-order gradients work (P is linear: its own derivative)."""

    @staticmethod
    def center(t: torch.Tensor) -> torch.Tensor:
        fast = row_center(t, t.shape[0]) if t.dim() > 1 else None
        if fast is not None:
            return fast
        dims = tuple(range(1, t.dim()))
        return t - t.mean(dim=dims, keepdim=True)

    @staticmethod
    def forward(ctx, w):
        return _CenterRows.center(w)

    @staticmethod
    def backward(ctx, g):
        return _CenterRows.apply(g)


class CenteredConv2d(WeightCentralized, Conv2d):
    """detectron2 ``Conv2d`` with Weight Centralization (:class:`WeightCentralized`, mabn eq 18). Same
    constructor (``norm=``, ``activation=``) and state dict as detectron2's ``Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and x.numel() == 0 and self.training:
            assert not isinstance(self.norm, nn.SyncBatchNorm), "SyncBatchNorm does not support empty inputs!"
        x = self._conv_forward(x, self.centered_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class CenteredPlainConv2d(WeightCentralized, nn.Conv2d):
    """``nn.Conv2d`` with Weight Centralization (:class:`WeightCentralized`, mabn eq 18), for heads built from
    plain ``nn.Conv2d`` + norm in an ``nn.Sequential`` (detectron2 v0.6's ``RetinaNetHead``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centered_weight(), self.bias)


def effective_conv_weight(conv: nn.Module) -> torch.Tensor:
    """The weight ``conv``'s forward convolves with: W − mean(W) for a weight-centralized conv (eq 18)."""
    return conv.centered_weight() if isinstance(conv, WeightCentralized) else conv.weight


# ---- model wiring (mabn §4.2: every MABN follows a weight-centralized conv) --------------------------------
def _conv_norm_pairs(module: nn.Module) -> Iterator[Tuple[str, nn.Module, nn.Module]]:
    """``(conv name, conv, the norm it feeds)``: detectron2 ``Conv2d``'s own ``norm``, and in every
    ``nn.Sequential`` a plain conv with the module right after it."""
    for name, m in module.named_modules():
        if isinstance(m, Conv2d) and m.norm is not None:
            yield name, m, m.norm
        elif isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (cname, conv), (_, nxt) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and not isinstance(conv, Conv2d):
                    yield (f"{name}.{cname}" if name else cname), conv, nxt


def centralize_mabn_convs(module: nn.Module) -> List[str]:
    """Make every conv of ``module`` that feeds an :class:`MABN2d` weight-centralized (eq 18), in place by a
    class swap (detectron2 ``Conv2d`` → :class:`CenteredConv2d`, ``nn.Conv2d`` → :class:`CenteredPlainConv2d`):
    module names, parameters and state dicts stay, and every reference to the conv sees the centered one.
    Returns the names of the converted convs."""
    converted = []
    for name, conv, norm in list(_conv_norm_pairs(module)):
        if isinstance(norm, MABN2d) and not isinstance(conv, WeightCentralized):
            if type(conv) is nn.Conv2d:
                conv.__class__ = CenteredPlainConv2d
            elif isinstance(conv, Conv2d) and type(conv) is Conv2d:
                conv.__class__ = CenteredConv2d
            else:
                continue  # a conv subclass with its own forward (e.g. deformable): reported by the wiring check
            converted.append(name)
    return converted


def check_mabn_wiring(module: nn.Module, where: str, hint: str = "") -> None:
    """ValueError unless every :class:`MABN2d` in ``module`` is fed by a weight-centralized conv (mabn §4.2)."""
    fed = {id(norm) for _, conv, norm in _conv_norm_pairs(module) if isinstance(conv, WeightCentralized)}
    loose = [name for name, m in module.named_modules() if isinstance(m, MABN2d) and id(m) not in fed]
    if loose:
        raise ValueError(f"{where}: MABN layers not preceded by a weight-centralized conv (mabn eq 18): "
                         f"{', '.join(loose)}{hint}")


def set_mabn_calls_per_iteration(module: nn.Module, calls: int) -> int:
    """Every :class:`MABN2d` of ``module`` is called ``calls`` times per training iteration (one layer shared by
    the ``calls`` FPN levels of a RetinaNet head): its per-iteration quantities are rescaled to per-call ones so
    they keep the paper's meaning, which is stated in iterations t (mabn §4.1 SMA ``S_t`` over the last m
    iterations, B.3 "batch statistics ... during first 10,000 iterations", momentum α = 0.98 per iteration):
    warm-up ``warmup_iters`` → ``warmup_iters·calls`` calls, ring buffer m → m·calls calls (the SMA spans m
    iterations of every level), EMA momentum α → α^(1/calls). Call it at build time (before any training
    forward: the ring buffers are reallocated) after the warm-up is set. Returns how many layers were set."""
    check_int("MABN calls per iteration", calls, minimum=1)
    layers = [m for m in module.modules() if isinstance(m, MABN2d)]
    for m in layers:
        if int(m.num_batches_tracked) != 0:
            raise ValueError("set_mabn_calls_per_iteration: the layer has already trained; set it at build time")
        m.warmup_iters *= calls
        m.buffer_size *= calls
        m.momentum = m.momentum ** (1.0 / calls)
        for name in ("chi_sq_buffer", "psi_buffer"):
            old = getattr(m, name)
            setattr(m, name, old.new_zeros(m.buffer_size, m.num_features))
    return len(layers)


def set_mabn_warmup(module: nn.Module, warmup_iters: int) -> int:
    """Set ``warmup_iters`` of every :class:`MABN2d` in ``module``; returns how many layers were set."""
    check_int("MABN warm-up iterations", warmup_iters, minimum=0)
    layers = [m for m in module.modules() if isinstance(m, MABN2d)]
    for m in layers:
        m.warmup_iters = int(warmup_iters)
    return len(layers)
