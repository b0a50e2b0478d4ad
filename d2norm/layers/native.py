"""CPU kernels torch lacks, for the layers that normalize with each sample's own statistics (and MABN).

Why our own: on CPU, ``torch.var_mean`` over a contiguous row is a scalar Welford loop (~25× ``BatchNorm2d``
inference on a ResNet feature map, measured with ``tools/benchmark_norms.py``'s shapes), and the fast vectorized
moments inside torch's GroupNorm/LayerNorm kernels (``RowwiseMoments``) are only reachable through those ops,
which also write a normalized copy of the input that :func:`~d2norm.layers.kernels.group_moments` must discard
(2 reads + 2 writes of the activation, plus an activation-sized allocation, instead of 1 read). The moments are
the exact two-pass algorithm per row — the mean, then Σ(x − mean)² over the same row while it is still in cache
— with double-precision accumulators in independent lanes (vectorizable without reassociating, no
``E[x²] − E[x]²`` cancellation: more accurate than the GroupNorm route). The kernels, one C++ source below:

* ``row_moments`` — per-(sample, channel [group]) mean / biased variance (:func:`row_moments`);
* ``channel_moments`` — per-channel batch statistics over N·H·W (BatchStatsBN inference, MABN's E[x²];
  :func:`channel_moments`): two passes per channel for long rows, one memory-order stream of shifted double sums
  for short (RoI) rows;
* ``row_affine`` — ``x·s[r] + t[r]`` per row (:func:`row_affine`);
* ``row_center`` — ``x − mean(x[r])`` per row: mabn eq 18's weight centralization and its backward
  (:func:`row_center`);
* ``mix_normalize`` — four-things eq 3 (per channel or channel group) / evalnorm eqs 5-6 inference in one kernel
  (:func:`mix_normalize`);
* ``row_affine_l1`` — evalnorm eq 9's Σ|t|, Σ sign(t), Σ sign(t)·x per row (:func:`row_affine_l1`);
* ``row_dot_sums`` / ``row_affine2`` — per-row Σg, Σg·x and ``g·s + x·a + b`` (MABN's eq-20 backward, through
  :func:`native_module`);
* ``block_norm_forward`` / ``block_norm_backward`` — normalization of (example group × channel group) blocks by
  their own moments and its closed-form backward, one task per block whose rows stay in cache (GhostBN / BGN
  training, :func:`~d2norm.layers.kernels.example_group_norm`, through :func:`native_module`).

All are parallel over rows (or channels) with ATen's thread pool (OpenMP, torch's libgomp) and compiled for
AVX-512 / AVX2 / baseline x86-64, chosen at load time (``target_clones``: a build cached in a home directory
shared by different CPUs stays valid).

They are compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja;
one build per environment, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``;
``scripts/install.sh`` and the test session build it up front). Without them, or with ``D2NORM_NATIVE=0`` in the
environment, every wrapper returns ``None`` and callers use the torch route (same results, slower); the reason is
logged once. CUDA tensors never come here (torch's CUDA kernels are used).
"""
import hashlib
import logging
import os
import sys
import threading
import time
from typing import Optional, Tuple

import torch

__all__ = ["row_moments", "channel_moments", "row_affine", "row_affine_l1", "row_center", "mix_normalize",
           "native_status", "native_module", "native_for"]

logger = logging.getLogger(__name__)

#: the C++ source of every kernel, compiled by torch's ``load_inline`` on first use
SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "native.cpp")

_lock = threading.Lock()
_module = None
_status: Optional[str] = None  # None: not tried yet; "ok" or the reason the GroupNorm route is used


def _load():
    global _module, _status
    with _lock:
        if _status is not None:
            return _module
        if os.environ.get("D2NORM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _status = "disabled by D2NORM_NATIVE=0"
            return None
        try:
            # its import warns "No CUDA runtime is found" on every CPU machine: irrelevant to a CPU kernel
            ext_logger = logging.getLogger("torch.utils.cpp_extension")
            level = ext_logger.level
            ext_logger.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load_inline
            finally:
                ext_logger.setLevel(level)

            # one build per environment (torch's cache is keyed by name; two venvs would rebuild each other's)
            env = hashlib.sha1(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:10]
            name = f"d2norm_native_{env}"
            start = time.perf_counter()
            building = not _is_built(name)
            if building:  # the first layer forward of an environment would otherwise sit ~1 min without a word
                print(f"d2norm: building the native CPU kernels (once per environment, about a minute; "
                      f"D2NORM_NATIVE=0 skips them) ...", file=sys.stderr, flush=True)
            _module = load_inline(
                name=name,
                cpp_sources=[open(SOURCE_PATH).read()],
                functions=["row_moments", "row_affine", "row_affine_l1", "row_dot_sums", "row_affine2", "mix_normalize",
                           "channel_moments", "row_center", "block_norm_forward", "block_norm_backward"],
                extra_cflags=["-O3", "-fopenmp"],  # OpenMP: at::parallel_for's threads (torch's libgomp)
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            _status = "ok"
            if building:
                print(f"d2norm: native CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)
        except Exception as e:  # no compiler / ninja / headers: the GroupNorm route is exact too, only slower
            _module = None
            _status = f"not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            logger.warning("d2norm: the native per-row moments kernel is unavailable, %s; per-sample statistics "
                           "use torch's GroupNorm kernel (same results, slower on CPU)", _status)
        return _module


def _is_built(name: str) -> bool:
    """Whether torch's extension cache already holds the compiled ``name`` (then loading takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(name, verbose=False)
        return any(f.endswith(".so") or f.endswith(".pyd") for f in os.listdir(folder))
    except Exception:
        return False


def native_module():
    """The compiled module (every kernel of csrc/native.cpp, on contiguous CPU float32/float64 tensors), or
    ``None`` when unavailable."""
    return _load()


def native_status() -> str:
    """``"ok"``, or why :func:`row_moments` falls back (built on first call)."""
    _load()
    return _status


def _cpu_rows(x: torch.Tensor, min_dim: int = 1) -> bool:
    """The condition every kernel shares: a non-empty contiguous CPU float32/float64 tensor of >= min_dim dims."""
    return (x.device.type == "cpu" and x.dim() >= min_dim and x.is_contiguous() and x.numel() > 0
            and x.dtype in (torch.float32, torch.float64))


def native_for(x: torch.Tensor, min_dim: int = 1):
    """:func:`native_module` when ``x`` is what every kernel takes (:func:`_cpu_rows`), else ``None``: for callers
    that use several kernels of the module directly (MABN's forward / backward, the block normalization)."""
    return _load() if _cpu_rows(x, min_dim) else None


def row_moments(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(mean, biased variance) of each row of ``x`` (R, L), float32/float64, contiguous, on CPU, L ≥ 1 — or
    ``None`` when the kernel is unavailable or ``x`` is not such a tensor (the caller's fallback applies). Not
    differentiable by itself (``kernels._GroupMoments`` supplies the backward)."""
    if not _cpu_rows(x) or x.dim() != 2:
        return None
    mod = _load()
    if mod is None:
        return None
    mean, var = mod.row_moments(x)
    return mean, var


def row_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> Optional[torch.Tensor]:
    """``x * scale[r] + shift[r]`` over the R = ``scale.numel()`` equal rows of the flat, contiguous CPU
    float32/float64 ``x`` (e.g. the (sample, channel) rows of NCHW with (N, C) coefficients), in one pass; the
    result has ``x``'s shape. ``None`` when unavailable / not such tensors. Not differentiable by itself."""
    if (not _cpu_rows(x) or scale.dtype != x.dtype or shift.dtype != x.dtype or scale.numel() == 0
            or shift.numel() != scale.numel() or x.numel() % scale.numel()):
        return None
    mod = _load()
    if mod is None:
        return None
    return mod.row_affine(x, scale.contiguous().view(-1), shift.contiguous().view(-1))


def row_affine_l1(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row of ``x`` (R, L), with ``t = x·a[r] + b[r]``: ``(Σ|t|, Σ sign(t), Σ sign(t)·x)``, three (R,)
    tensors from one pass (evalnorm eq 9's L1 term and its gradient statistics), or ``None`` when unavailable /
    not such tensors (contiguous CPU float32/float64, ``a``/``b`` of R elements, same dtype)."""
    if (not _cpu_rows(x) or x.dim() != 2 or a.dtype != x.dtype or b.dtype != x.dtype
            or a.numel() != x.shape[0] or b.numel() != x.shape[0]):
        return None
    mod = _load()
    if mod is None:
        return None
    return tuple(mod.row_affine_l1(x, a.contiguous().view(-1), b.contiguous().view(-1)))


def mix_normalize(x: torch.Tensor, pop_mean: torch.Tensor, pop_var: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], alpha_mean: float, alpha_var: float, eps: float,
                  groups: Optional[int] = None) -> Optional[torch.Tensor]:
    """Inference of a layer that mixes each (sample, channel [group])'s own mean / variance into the
    population's: four-things eq 3 (``alpha_mean = alpha_var = α``; per channel group for BGN, §3.4) and
    evalnorm eqs 5-6 (α̂, β̂), then normalizes and applies the per-channel affine, in one kernel that reads ``x``
    (N, C, ...) once and writes the output once. ``groups`` (default C) contiguous channel groups, with
    ``pop_mean`` / ``pop_var`` one value per group. ``None`` when unavailable or not applicable (contiguous CPU
    float32/float64, no gradient needed, statistics / affine of ``x``'s dtype and size)."""
    if not _cpu_rows(x, 2) or (torch.is_grad_enabled()
                               and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return None
    c = x.shape[1]
    g = c if groups is None else int(groups)
    if g < 1 or c % g:
        return None
    if any(t.dtype != x.dtype or t.numel() != g for t in (pop_mean, pop_var)):
        return None
    if any(t is not None and (t.dtype != x.dtype or t.numel() != c) for t in (weight, bias)):
        return None
    mod = _load()
    if mod is None:
        return None
    empty = x.new_empty(0)
    return mod.mix_normalize(x, pop_mean.contiguous(), pop_var.contiguous(),
                             empty if weight is None else weight.detach().contiguous(),
                             empty if bias is None else bias.detach().contiguous(),
                             float(alpha_mean), float(alpha_var), float(eps), g)


def channel_moments(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, biased variance) of ``x`` (N, C, ...) over its N·H·W elements (BN's batch statistics)
    in one read of ``x``; ``None`` when unavailable or not applicable (contiguous CPU float32/float64, no
    gradient needed)."""
    if not _cpu_rows(x, 2) or (torch.is_grad_enabled() and x.requires_grad):
        return None
    mod = _load()
    if mod is None:
        return None
    mean, var = mod.channel_moments(x)
    return mean, var


def row_center(x: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """``x − mean`` of each of the ``rows`` equal rows of the flat, contiguous CPU float32/float64 ``x`` (e.g. a
    conv weight's output channels: mabn eq 18), in one pass; the result has ``x``'s shape. ``None`` when
    unavailable / not such a tensor. Not differentiable by itself (``mabn._CenterRows`` supplies the backward)."""
    if not _cpu_rows(x) or rows < 1 or x.numel() % rows:
        return None
    mod = _load()
    if mod is None:
        return None
    return mod.row_center(x, int(rows))
