"""Differentiable collectives for cross-process normalization (SyncBN, shuffled-RoI heads).

rethinking A.5/A.6 (SyncBN: "workers perform collective communication in order to compute and share the mean
and variance of a larger batch"), A.10 ("Empty inputs ... handling empty inputs and control flow without
communication deadlocks"). Everything here works on CPU/gloo and CUDA/NCCL.

What we reuse and what we add:

* ``detectron2.utils.comm`` gives rank / world size and a *pickling* (non-differentiable) ``all_gather``;
  ``fvcore.nn.distributed`` gives ``differentiable_all_reduce`` / ``differentiable_all_gather``. We reuse comm
  for ranks. We do not reuse fvcore's two functions because (a) its all-reduce backward reduces
  ``grad_output`` *in place*, which can be a stride-0 expanded view or a buffer autograd shares with another
  branch, (b) an all-gather sends every row to every rank, where the shuffled heads need each row on one rank,
  and (c) neither moves tensors to the device the backend needs (gloo: CPU, NCCL: CUDA).
* Added here: :func:`all_reduce_sum_detached` (SUM all-reduce on a copy), :func:`all_gather_rows` (differentiable
  all-gather of equal-shape tensors), :func:`exchange_rows_and_seed` (every rank's row count and one shared
  seed, in one collective), :func:`permutation` (the permutation a seed stands for), :func:`all_to_all_rows`
  (differentiable exchange of rows, each row sent only to the rank that needs it) and :func:`sync_subgroup`
  (cached process groups of ``k`` consecutive ranks, to choose the SyncBN normalization batch size, A.5).

Contract (as for every collective): every rank of the group calls the same functions in the same order, and,
for the differentiable ones, every rank runs backward through their output (an empty output included;
detectron2's losses keep empty predictions in the graph with ``x.sum() * 0``), because backward is itself a
collective.
"""
import contextlib
import contextvars
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = [
    "group_world_size",
    "all_reduce_sum_detached",
    "all_gather_rows_detached",
    "all_gather_rows",
    "all_to_all_rows",
    "draw_seed",
    "permutation",
    "exchange_rows_and_seed",
    "sync_subgroup",
]


def group_world_size(group=None) -> int:
    """Number of ranks in ``group`` (``None`` = all ranks); 1 when torch.distributed is not initialized."""
    if group is None:
        return comm.get_world_size()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _comm_device(device: torch.device, group=None) -> torch.device:
    """Device a tensor must be on for ``group``'s backend: gloo → CPU, NCCL → CUDA, else unchanged
    (e.g. torch's multi-device default backend "cpu:gloo,cuda:nccl" dispatches on the tensor's device)."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum_detached(t: torch.Tensor, group=None) -> torch.Tensor:
    """Non-differentiable SUM all-reduce of a fresh contiguous copy of ``t`` (``t`` is never modified), done
    on the backend's device; the result is on ``t.device``. Must be called with more than one rank."""
    buf = t.detach().to(_comm_device(t.device, group), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_gather_rows_detached(t: torch.Tensor, group=None) -> torch.Tensor:
    """Non-differentiable all-gather of an equal-shape tensor from every rank of ``group``: returns
    ``(world, *t.shape)`` on ``t.device``, row r = rank r's ``t`` (one collective; torch's ``nn.SyncBatchNorm``
    gathers its per-rank statistics the same way). Must be called with more than one rank."""
    dev = _comm_device(t.device, group)
    buf = t.detach().to(dev, copy=True).contiguous()
    world = group_world_size(group)
    out = buf.new_empty(world * buf.numel())  # flat: gloo accepts only a 1-d output here
    dist.all_gather_into_tensor(out, buf.reshape(-1), group=group)
    return out.view((world,) + tuple(buf.shape)).to(t.device)


# Fixed-length shape header so that ranks whose tensors differ even in ndim still exchange equal-size messages
# (a mismatch is then reported as a ValueError on every rank instead of a hang / corrupt collective).
_MAX_DIMS = 8
_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)


def _exchange_header(x: torch.Tensor, group, extra: int = 0) -> Tuple[List[Tuple[int, ...]], List[int]]:
    """One all-gather of a fixed-size int64 header (ndim, dtype, ``extra``, shape) from every rank of ``group``:
    every rank's shape of ``x`` and its ``extra`` integer. Read on the host: the one host sync of a call that
    moves rows whose counts differ per rank (the receivers must know the counts before the data moves)."""
    if x.dim() < 1 or x.dim() > _MAX_DIMS:
        raise ValueError(f"rows exchanged across ranks: 1 to {_MAX_DIMS} dims supported, got shape {tuple(x.shape)}")
    dtype_code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    header = [x.dim(), dtype_code, int(extra)] + list(x.shape) + [0] * (_MAX_DIMS - x.dim())
    dev = _comm_device(x.device, group)
    local = torch.tensor(header, dtype=torch.int64, device=dev)
    gathered = torch.empty(group_world_size(group) * local.numel(), dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(gathered, local, group=group)
    rows = gathered.view(-1, local.numel()).tolist()
    shapes = [tuple(r[3 : 3 + r[0]]) for r in rows]
    dtypes = {r[1] for r in rows}
    if len({s[1:] for s in shapes}) != 1 or len({len(s) for s in shapes}) != 1 or len(dtypes) != 1:
        raise ValueError(
            "rows exchanged across ranks must agree on every dim but the first, and on dtype; got shapes "
            f"{shapes} and dtype codes {sorted(dtypes)} (index into {[str(d) for d in _DTYPES]})"
        )
    return shapes, [r[2] for r in rows]


class _AllGatherRows(torch.autograd.Function):
    """(world, *t.shape), row r = rank r's ``t``. Every rank's loss may depend on every row, so rank r's gradient
    is the sum over ranks of the gradient of row r (gloo has no reduce-scatter: an all-reduce, then row r)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_gather_rows_detached(t, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_detached(grad, ctx.group)[dist.get_rank(ctx.group)], None


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather of an equal-shape tensor from every rank: ``(world, *t.shape)``, row r = rank r's
    ``t`` (one all-gather forward: each rank sends its own bytes once, where a SUM all-reduce of a zero-padded
    ``(world, ...)`` tensor would move world x them). Single process: ``t[None]``."""
    if group_world_size(group) == 1:
        return t[None]
    return _AllGatherRows.apply(t, group)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A random int64 seed from ``generator`` (a CPU ``torch.Generator``) or, with ``None``, torch's global CPU
    RNG. Drawn on the host: no device value is read."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"draw_seed: generator must be None or a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def permutation(n: int, seed: int) -> torch.Tensor:
    """The permutation of ``range(n)`` a seed stands for: ``torch.randperm(n)`` of a CPU generator seeded with
    ``seed`` (on the host, so a rank reads its split sizes without a device sync)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"permutation: n must be >= 0, got {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def exchange_rows_and_seed(
    x: torch.Tensor, generator: Optional[torch.Generator] = None, group=None
) -> Tuple[List[int], int]:
    """Every rank's row count of ``x`` (dim 0; the other dims and the dtype must agree, else ValueError on every
    rank) and one seed shared by the group, in **one** collective: the group's first rank draws the seed
    (:func:`draw_seed` of its ``generator``; the other ranks' generators are not consumed), so ranks whose seeds
    or RNG states differ still agree. Single process: ``([len(x)], draw_seed(generator))``."""
    if group_world_size(group) == 1:
        return [int(x.shape[0])], draw_seed(generator)
    first = dist.get_rank(group) == 0
    shapes, extras = _exchange_header(x, group, extra=draw_seed(generator) if first else 0)
    return [s[0] for s in shapes], extras[0]


class _AllToAllRows(torch.autograd.Function):
    """Rank r sends ``send[s]`` consecutive rows of ``x`` to rank s and receives ``recv[s]`` rows from rank s
    (rank order). Backward is the same exchange reversed: the gradient of a row goes back to the rank it came
    from."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all_detached(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_detached(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all_detached(x: torch.Tensor, send: List[int], recv: List[int], group) -> torch.Tensor:
    tail = tuple(x.shape[1:])
    dev = _comm_device(x.device, group)
    # rows as raw bytes: the exchange moves memory, so any dtype goes (gloo has no all-to-all for bf16)
    row = 1
    for d in tail:
        row *= d
    width = row * x.element_size()
    src = x.detach().to(dev).contiguous().view(torch.uint8).reshape(x.shape[0], width)
    out = torch.empty((sum(recv), width), dtype=torch.uint8, device=dev)
    dist.all_to_all_single(out, src, output_split_sizes=list(recv), input_split_sizes=list(send), group=group)
    return out.view(x.dtype).reshape((sum(recv),) + tail).to(x.device)


def all_to_all_rows(x: torch.Tensor, send: List[int], recv: List[int], group=None) -> torch.Tensor:
    """Differentiable all-to-all of rows: rank r's ``x`` holds, in rank order, ``send[s]`` rows for each rank s;
    the result holds, in rank order, the ``recv[s]`` rows rank s sent here (``recv`` on rank r must equal
    ``send[r]`` on each rank s; 0 rows allowed). Each row crosses the network once (an all-gather would send every
    row to every rank). One collective forward, one backward. Single process: ``x``."""
    if group_world_size(group) == 1:
        return x
    if len(send) != group_world_size(group) or len(recv) != len(send) or sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all_rows: send {list(send)} / recv {list(recv)} must have one count per rank "
                         f"and send must sum to the {x.shape[0]} rows of x")
    return _AllToAllRows.apply(x, list(send), list(recv), group)


# (world group object, group size) -> this rank's subgroup. A cache of communication resources (like
# detectron2.utils.comm's cached gloo group), not of options: every rank must create every subgroup, in the
# same order, exactly once per process group.
_SUBGROUPS = {}


def sync_subgroup(group_size: int):
    """The process group of ``group_size`` consecutive ranks that contains this rank (rethinking A.5: SyncBN
    over a chosen number of workers sets the normalization batch size).

    ``0`` or the world size → ``None`` (all ranks). Must be called by every rank (it creates all subgroups
    the first time). ValueError when ``group_size`` is negative or does not divide the world size.
    """
    if not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"sync group size must be an integer >= 0 (0 = all ranks), got {group_size!r}")
    world = comm.get_world_size()
    if group_size in (0, world) or world == 1:
        return None
    if world % group_size:
        raise ValueError(f"sync group size {group_size} does not divide the world size {world}")
    key = (group_size,)
    entry = _SUBGROUPS.get(key)
    if entry is None or entry[0] is not dist.group.WORLD:  # re-initialized process group → rebuild
        rank = comm.get_rank()
        mine = None
        for start in range(0, world, group_size):
            g = dist.new_group(list(range(start, start + group_size)))
            if start <= rank < start + group_size:
                mine = g
        entry = (dist.group.WORLD, mine)
        _SUBGROUPS[key] = entry
    return entry[1]


_LOCAL_ONLY = contextvars.ContextVar("d2norm_local_only", default=False)


@contextlib.contextmanager
def local_only():
    """Inside, d2norm modules that exchange activations across ranks inside a forward (the shuffled-RoI heads)
    run on the local rank only.

    Statistics passes (PreciseBN, the BN monitor, probes) enter it: there ranks may run different numbers of
    forwards (their sample shares differ by one), so a collective inside a forward could deadlock, and the
    population statistics of a shuffled head do not depend on the shuffle (same union of RoIs).
    """
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def is_local_only() -> bool:
    return _LOCAL_ONLY.get()
