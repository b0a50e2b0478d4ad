"""Offline estimation of EvalNorm's α̂, β̂ on a trained, frozen model (evalnorm §3.4, "Offline estimation").

The model runs its *training* forward (so batch statistics, RoI sampling, ... are those of training) only to
produce the aux loss of eq 9 in every :class:`~d2norm.layers.evalnorm.EvalNorm2d`; an optimizer moves only
α̂, β̂. Everything else is left exactly as it was: parameters, every buffer (EvalNorm layers touch none while
fitting; other layers, e.g. plain BN, may update their EMA in the training forward, so all buffers are
snapshotted and restored), ``requires_grad`` flags and each module's train/eval flag.
"""
import itertools
import logging
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..layers.evalnorm import evalnorm_aux_loss, evalnorm_alpha_beta, evalnorm_modules, evalnorm_parameters

__all__ = ["fit_evalnorm_offline", "set_evalnorm_rule"]

logger = logging.getLogger(__name__)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def _cycle(data: Iterable) -> Iterable:
    """Cycle through a re-iterable (list, DataLoader); a one-shot iterator is consumed once."""
    if iter(data) is data:
        yield from data
        return
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


@torch.no_grad()
def _all_reduce_grads_(params) -> None:
    """Average the gradients of ``params`` over ranks (a layer a rank did not run counts as gradient 0)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.stack([p.grad for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, v in zip(params, flat):
        p.grad.copy_(v)


def fit_evalnorm_offline(
    model: nn.Module,
    data: Iterable,
    num_iters: int,
    lr: float = 0.05,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    optimizer_cls=torch.optim.Adam,
    sync_across_ranks: bool = True,
) -> Dict[str, Any]:
    """Fit α̂, β̂ of every EvalNorm layer of ``model`` by minimizing eq 9 with the rest of the model frozen.

    Args:
        model: the trained model (a ``DistributedDataParallel`` wrapper is unwrapped).
        data: batches; a re-iterable (list, DataLoader) is cycled, a one-shot iterator is used until exhausted.
        num_iters: optimizer steps (one batch each).
        lr: learning rate of ``optimizer_cls`` (Adam by default) on the logits of α̂, β̂.
        forward_fn: ``forward_fn(model, batch)`` runs the training forward; default ``model(batch)``
            (detectron2 models take ``list[dict]`` with ``"instances"``). Its output is ignored. It runs
            inside a private detectron2 ``EventStorage``, so training-mode heads can log without polluting
            a trainer's storage.
        sync_across_ranks: when torch.distributed is initialized, average the α̂, β̂ gradients over ranks
            (every rank must then call this with the same ``num_iters``).

    Returns:
        ``{"losses": [aux loss per iteration], "alpha_beta": evalnorm_alpha_beta(model)}``.
        Use the layers in mode ``"offline"`` (``D2NORM.EVALNORM.MODE``) to evaluate with the fitted values.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    layers = list(evalnorm_modules(model).values())
    if not layers:
        raise ValueError("fit_evalnorm_offline: the model has no EvalNorm layer")
    if int(num_iters) < 1:
        raise ValueError(f"fit_evalnorm_offline: num_iters must be >= 1, got {num_iters!r}")
    forward_fn = forward_fn or _default_forward
    fit_params = evalnorm_parameters(model)
    fit_ids = {id(p) for p in fit_params}

    with torch.no_grad():
        saved_tensors = {
            k: v.detach().clone()
            for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
            if id(v) not in fit_ids
        }
    saved_training = [(m, m.training) for m in model.modules()]
    saved_requires = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(p, p.grad) for p in fit_params]

    from detectron2.utils.events import EventStorage

    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in fit_params:
            p.requires_grad_(True)
            p.grad = None
        model.train()
        for m in layers:
            m._fitting = True
            m.clear_aux()
        optimizer = optimizer_cls(fit_params, lr=lr)
        with torch.enable_grad(), EventStorage(0):
            for _, batch in zip(range(int(num_iters)), _cycle(data)):
                forward_fn(model, batch)
                loss = evalnorm_aux_loss(model)
                if not loss.requires_grad:
                    raise RuntimeError(
                        "fit_evalnorm_offline: the forward ran no EvalNorm layer in training mode "
                        "(check forward_fn)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sync_across_ranks:
                    _all_reduce_grads_(fit_params)
                optimizer.step()
                losses.append(float(loss.detach()))
        if len(losses) < int(num_iters):
            logger.warning("fit_evalnorm_offline: data ran out after %d of %d iterations", len(losses), num_iters)
    finally:
        for m in layers:
            m._fitting = False
            m.clear_aux()
        for m, flag in saved_training:
            m.training = flag  # not m.train(flag): that would recurse into children
        for p, flag in saved_requires:
            p.requires_grad_(flag)
        for p, g in saved_grads:
            p.grad = g
        with torch.no_grad():
            current = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
            for k, v in saved_tensors.items():
                current[k].copy_(v)
    return {"losses": losses, "alpha_beta": evalnorm_alpha_beta(model)}


@torch.no_grad()
def set_evalnorm_rule(layers: Dict[str, nn.Module], batch_sizes: Dict[str, int]) -> None:
    """evalnorm §4.1's rule of thumb α̂ = β̂ = 1/B² written into each layer's parameters (B from ``batch_sizes``,
    0 = the layer's recorded ``seen_batch_size``), then mode ``"offline"``: the values travel in a checkpoint
    whatever the layers' B. RuntimeError naming the layer when B is unknown (0 and nothing recorded)."""
    import math

    for name, m in layers.items():
        m.rule_batch_size = int(batch_sizes.get(name, 0))
        m.mode = "rule"
        try:
            a, _ = m.eval_alpha_beta()
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}") from None
        a = min(max(float(a), 1e-12), 1 - 1e-7)  # B = 1 gives 1/B² = 1: the logit parametrization's edge
        logit = math.log(a / (1 - a))
        m.alpha_logit.fill_(logit)
        m.beta_logit.fill_(logit)
        m.mode = "offline"
