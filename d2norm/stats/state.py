"""Snapshot and restore of a model's non-parameter state around a forward pass that must not change it.

rethinking A.10 "Unintended updates": a forward in training mode updates state besides BN's statistics —
detectron2's RetinaNet keeps an EMA ``loss_normalizer`` (a Python float it creates on first use), a
``CycleBatchNormList`` advances its ``_pos`` counter, EvalNorm stores aux-loss terms, MABN pushes ring
buffers. :func:`capture_state` records every buffer (cloned) and the plain attributes of every module's
``__dict__``; :func:`restore_state` puts them back and deletes attributes the pass added.
"""
import contextlib
from typing import Any, Dict, Iterable, Iterator, Tuple

import torch
from torch import nn

__all__ = ["capture_state", "restore_state", "patched_instance_attrs"]

# nn.Module bookkeeping that a forward never changes (parameters are not touched under no_grad; modules and
# hooks are our own patching's business)
_SKIP = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "forward"}
_MAX_TENSOR_CLONE = 1 << 22  # unregistered tensors larger than this are restored by reference only


def _is_bookkeeping(key: str) -> bool:
    return key in _SKIP or key.endswith("_hooks") or key.endswith("_hooks_with_kwargs") or "_hook" in key


def _save(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", v, v.detach().clone() if v.numel() <= _MAX_TENSOR_CLONE else None)
    if isinstance(v, list):
        return ("list", v, list(v))
    if isinstance(v, dict):
        return ("dict", v, dict(v))
    if isinstance(v, set):
        return ("set", v, set(v))
    return ("value", v, None)


def capture_state(model: nn.Module) -> Dict[str, Any]:
    """Everything a forward could change in ``model`` except parameters: buffers (cloned) and each module's
    plain attributes (numbers, strings, tensors, and the contents of lists / dicts / sets)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers(remove_duplicate=True) if b is not None}
    attrs: Dict[int, Tuple[nn.Module, Dict[str, Any]]] = {}
    for mod in model.modules():
        attrs[id(mod)] = (mod, {k: _save(v) for k, v in mod.__dict__.items() if not _is_bookkeeping(k)})
    return {"buffers": buffers, "attrs": attrs}


@torch.no_grad()
def restore_state(model: nn.Module, snap: Dict[str, Any]) -> None:
    """Undo every change to what :func:`capture_state` recorded (in place for buffers and containers)."""
    current = dict(model.named_buffers(remove_duplicate=True))
    for name, saved in snap["buffers"].items():
        buf = current.get(name)
        if buf is not None and not torch.equal(buf, saved):
            buf.copy_(saved)
    for mod, saved in snap["attrs"].values():
        for k in [k for k in mod.__dict__ if not _is_bookkeeping(k) and k not in saved]:
            del mod.__dict__[k]  # added by the pass (e.g. RetinaNet's lazily created loss_normalizer)
        for k, (kind, obj, copy) in saved.items():
            if kind == "tensor" and copy is not None and obj.shape == copy.shape and not torch.equal(obj, copy):
                obj.copy_(copy)
            elif kind == "list":
                obj[:] = copy
            elif kind in ("dict", "set"):
                obj.clear()
                obj.update(copy)
            mod.__dict__[k] = obj


@contextlib.contextmanager
def patched_instance_attrs(patches: Iterable[Tuple[nn.Module, str, Any]]) -> Iterator[None]:
    """Set ``module.__dict__[attr] = value`` for each ``(module, attr, value)`` (shadowing the class's method,
    e.g. ``forward``) for the duration of the context, then restore exactly what was there (including nothing).
    Used by the statistics passes to route layer calls without touching the modules' classes."""
    saved = []
    try:
        for mod, attr, value in patches:
            saved.append((mod, attr, mod.__dict__.get(attr, _MISSING)))
            mod.__dict__[attr] = value
        yield
    finally:
        for mod, attr, old in reversed(saved):
            if old is _MISSING:
                mod.__dict__.pop(attr, None)
            else:
                mod.__dict__[attr] = old


_MISSING = object()
