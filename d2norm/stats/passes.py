"""What every statistics pass over a model shares (PreciseBN, the probes, the BN monitor, the EvalNorm fit):
forwarding the unwrapped module, re-batching a loader to a chosen batch size, and isolating the caller from the
pass's side effects besides the model state (:mod:`.state`): RNG streams, detectron2's event storage, cross-rank
activation exchange, layer forwards routed to their statistics adapters (rethinking A.10, "unintended updates")."""
import contextlib
import logging
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from ..utils.comm import local_only
from ..layers.protocol import norm_protocol
from .adapters import StatsAdapter
from .state import patched_instance_attrs

__all__ = [
    "unwrap_model",
    "batch_length",
    "rebatch",
    "isolated_rng",
    "torch_rng_state",
    "set_torch_rng_state",
    "discarded_event_storage",
    "routed_to_adapters",
]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``): a statistics
    pass forwards it directly, so no DDP buffer broadcast or gradient bookkeeping happens in the pass."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


# ---- batching ---------------------------------------------------------------------------------------------
def batch_length(batch) -> int:
    """Samples in a batch: a list of samples (detectron2's list of dicts) or a tensor whose dim 0 is the sample."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(
        f"a data batch must be a list of samples (detectron2) or a tensor, got {type(batch).__name__}"
    )


def _concat(parts: List[Any]):
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    out = []
    for p in parts:
        out.extend(p)
    return out


def rebatch(data: Iterator, total: int, batch_size: Optional[int]) -> Iterator:
    """Batches of exactly ``batch_size`` samples (the last possibly fewer), ``total`` samples in all; without
    ``batch_size`` the loader's own batches (the last one trimmed). Warns when ``data`` runs out first."""
    pending, have, done = [], 0, 0
    while done < total:
        want = min(batch_size or 0, total - done) if batch_size else None
        if want is not None and have >= want:
            merged = _concat(pending)
            yield merged[:want]
            rest = merged[want:batch_length(merged)]
            pending, have = ([rest], batch_length(rest)) if batch_length(rest) else ([], 0)
            done += want
            continue
        try:
            b = next(data)
        except StopIteration:
            if have:
                merged = _concat(pending)
                take = min(have, total - done)
                yield merged[:take]
                done += take
            if done < total:
                logger.warning("Statistics pass: the data ran out after %d of %d samples on this rank", done, total)
            return
        if want is None:
            take = min(batch_length(b), total - done)
            yield b if take == batch_length(b) else b[:take]
            done += take
        else:
            pending.append(b)
            have += batch_length(b)


# ---- isolation --------------------------------------------------------------------------------------------
def _cuda_devices() -> List[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextlib.contextmanager
def isolated_rng():
    """Restore the caller's torch (CPU + CUDA), numpy and python RNG states afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def torch_rng_state():
    """The torch CPU and (initialized) CUDA RNG states, for :func:`set_torch_rng_state`."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices()]


def set_torch_rng_state(state) -> None:
    """Reset the torch RNGs to a :func:`torch_rng_state` (the same random choices in every repeated pass)."""
    torch.set_rng_state(state[0])
    for d, s in zip(_cuda_devices(), state[1]):
        torch.cuda.set_rng_state(s, d)


def discarded_event_storage():
    """A detectron2 ``EventStorage`` to run the pass in: the model's ``put_scalar`` calls go there and are
    discarded instead of reaching the training run's storage."""
    try:
        from detectron2.utils.events import EventStorage
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return EventStorage()


@contextlib.contextmanager
def routed_to_adapters(adapters: Dict[str, StatsAdapter]):
    """Route every call of an adapted layer that its protocol declares (``routed_calls``: ``forward``, and
    DomainBN's ``forward_domains``) to its adapter; cross-rank activation exchange (shuffled heads) is off
    meanwhile (``local_only``)."""
    patches = [
        (a.module, attr, a.counted(getattr(a, attr)))
        for a in adapters.values()
        for attr, _ in norm_protocol(a.module).routed_calls
        if hasattr(a.module, attr) and hasattr(a, attr)
    ]
    with local_only(), patched_instance_attrs(patches):
        yield
