"""Surgery on a running detectron2 trainer after its model's parameters changed (the FrozenBN switch, rethinking
§4.3): statistics broadcast, optimizer param groups rebuilt in place, LR scheduler and detectron2's
``LRScheduler`` hook refreshed, the DDP wrapper rebuilt when the trainable parameter set changed.

torch and detectron2 offer no public API to change the parameter set of a live optimizer / DDP wrapper, so this
module reads and writes some of their private attributes. All of them are used through the accessors in the
block "Private attributes" below and nowhere else; a torch or detectron2 upgrade that renames one breaks only
those functions.
"""
import logging
import warnings
from typing import List, Optional, Sequence

import torch
from detectron2.utils import comm
from torch import nn

__all__ = ["switch_to_frozen_bn", "rebuild_optimizer_param_groups"]

logger = logging.getLogger(__name__)


# ---- Private attributes of torch / detectron2 objects (every use in this module goes through these) -------
def _trainer_hooks(trainer) -> list:
    """detectron2 ``TrainerBase._hooks``: the registered hooks (no public getter)."""
    return getattr(trainer, "_hooks", [])


def _refresh_lr_scheduler_hooks(trainer) -> None:
    """detectron2 ``hooks.LRScheduler._optimizer`` / ``._best_param_group_id``: the group whose LR the hook logs
    is chosen once at ``before_train``; choose it again for the new param groups."""
    from detectron2.engine import hooks as d2hooks

    for h in _trainer_hooks(trainer):
        if isinstance(h, d2hooks.LRScheduler) and getattr(h, "_optimizer", None) is not None:
            h._best_param_group_id = d2hooks.LRScheduler.get_best_param_group_id(h._optimizer)


def _set_scheduler_last_lr(scheduler, lrs: List[float]) -> None:
    """torch ``LRScheduler._last_lr`` (what ``get_last_lr()`` returns) for a changed set of param groups."""
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = lrs


def _ddp_bucket_cap_mb(ddp) -> Optional[float]:
    """torch ``DistributedDataParallel._bucket_config.bucket_cap_mb`` (the constructor argument is not kept)."""
    return getattr(getattr(ddp, "_bucket_config", None), "bucket_cap_mb", None)


def _ddp_remove_autograd_hooks(ddp) -> None:
    """torch ``DistributedDataParallel._remove_autograd_hooks()``: detach the old reducer from the parameters."""
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()


def _ddp_comm_hooks(ddp) -> list:
    """torch ``DistributedDataParallel._comm_hooks``: ``(hook, state)`` pairs given to ``register_comm_hook``."""
    return getattr(ddp, "_comm_hooks", [])



@torch.no_grad()
def _broadcast_frozen_state(net: nn.Module, names: Sequence[str]) -> None:
    """Every rank takes rank 0's frozen statistics (per-rank EMAs differ when buffers are not broadcast, as in
    detectron2's DDP setup); one collective."""
    import torch.distributed as dist

    if comm.get_world_size() == 1:
        return
    bufs = [b for n in sorted(names) for b in net.get_submodule(n).buffers()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs])
    dist.broadcast(flat, src=0)
    off = 0
    for b in bufs:
        b.copy_(flat[off: off + b.numel()].view_as(b).to(b.dtype))
        off += b.numel()


def rebuild_optimizer_param_groups(optimizer: torch.optim.Optimizer, fresh_groups: List[dict], scheduler=None):
    """Give ``optimizer`` (in place: every holder of the object stays valid) the param groups ``fresh_groups``
    of an optimizer freshly built for the converted model, so its parameters are exactly the model's trainable
    parameters, grouped as a resumed run builds them.

    State (momentum buffers) of parameters that remain is kept (the same Parameter objects); state of removed
    ones is dropped. Each group's ``initial_lr`` is its base LR and its ``lr`` the base LR times the multiplier
    the LR schedule currently applies (read from the old groups); a torch/detectron2 LR scheduler's
    ``base_lrs`` follow the new groups.
    """
    mult = None
    for g in optimizer.param_groups:
        if g.get("initial_lr"):
            mult = g["lr"] / g["initial_lr"]
            break
    groups = []
    for g in fresh_groups:
        g = dict(g)
        g["params"] = list(g["params"])
        base = g["lr"]
        g["initial_lr"] = base
        g["lr"] = base * mult if mult is not None else base
        groups.append(g)
    keep = {id(p) for g in groups for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in keep]:
        del optimizer.state[p]
    optimizer.param_groups[:] = groups
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        _set_scheduler_last_lr(scheduler, [g["lr"] for g in groups])


def _rebuild_ddp(old):
    """A new ``DistributedDataParallel`` over ``old.module`` with ``old``'s options and comm hooks (its reducer
    knows the new parameter set); ``old``'s autograd hooks are removed so its reducer never fires again.
    Collective (parameter/buffer broadcast from rank 0): every rank must call it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = dict(
        device_ids=old.device_ids, output_device=old.output_device, dim=old.dim,
        process_group=old.process_group, find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view,
        broadcast_buffers=getattr(old, "forward_sync_buffers", getattr(old, "broadcast_buffers", True)),
    )
    cap = _ddp_bucket_cap_mb(old)
    if cap is not None:
        kwargs["bucket_cap_mb"] = cap
    if getattr(old, "static_graph", False):
        kwargs["static_graph"] = True
    _ddp_remove_autograd_hooks(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers kept for its init semantics
        new = DDP(old.module, **kwargs)
    for hook, state in _ddp_comm_hooks(old):
        new.register_comm_hook(state, hook)
    return new


def switch_to_frozen_bn(trainer, trainable_affine: bool = True, names=None, layers: Sequence[str] = ()):
    """Convert ``trainer.model``'s BN-family layers to FrozenBN (:func:`d2norm.layers.frozen.freeze_bn_layers`)
    and keep training consistent:

    * statistics: rank 0's on every rank (one broadcast);
    * optimizer: param groups rebuilt in place from ``trainer.build_optimizer(cfg, model)`` on the converted
      model (:func:`rebuild_optimizer_param_groups`), scheduler ``base_lrs`` and detectron2's ``LRScheduler``
      hook's summary group updated. With trainable γ/β the parameter objects are the same as before, so their
      momentum carries over;
    * DDP: when the set of trainable parameters changed (frozen γ/β, EvalNorm's α̂/β̂ dropped), the wrapper is
      rebuilt over the same module (its reducer registered hooks on the old set and would wait forever for
      gradients of removed parameters); every reference to the old wrapper in the trainer and its hooks is
      replaced. With an unchanged set the wrapper is kept.

    Call on every rank at the same iteration, between iterations. Returns the :class:`~d2norm.layers.report.ConversionReport`.
    """
    from torch.nn.parallel import DistributedDataParallel

    from ..layers.frozen import freeze_bn_layers
    from ..stats.monitor import select_layers

    model = trainer.model
    ddp = model if isinstance(model, DistributedDataParallel) else None
    net = ddp.module if ddp is not None else model
    before = [p for p in net.parameters() if p.requires_grad]
    flt = None
    if layers:
        flt = lambda n: bool(select_layers([n], layers))  # noqa: E731
    report = freeze_bn_layers(net, trainable_affine=trainable_affine, names=names, name_filter=flt)
    _broadcast_frozen_state(net, list(report.converted))
    after = [p for p in net.parameters() if p.requires_grad]

    fresh = trainer.build_optimizer(trainer.cfg, net)  # a classmethod; trainer may be a weakref proxy
    rebuild_optimizer_param_groups(trainer.optimizer, fresh.param_groups, getattr(trainer, "scheduler", None))
    del fresh
    _refresh_lr_scheduler_hooks(trainer)

    if ddp is not None and {id(p) for p in before} != {id(p) for p in after}:
        new = _rebuild_ddp(ddp)
        trainer.model = new  # DefaultTrainer.model sets _trainer.model
        for h in _trainer_hooks(trainer):
            for k, v in list(vars(h).items()):
                if v is ddp:
                    setattr(h, k, new)
    logger.info(
        "FrozenBN switch: %d layers converted (%s affine), %d left unchanged; trainable parameter tensors "
        "%d -> %d (%d -> %d values)%s",
        len(report.converted), "trainable" if trainable_affine else "frozen", len(report.skipped), len(before), len(after),
        sum(p.numel() for p in before), sum(p.numel() for p in after),
        "; DDP rebuilt" if trainer.model is not model else "",
    )
    return report
