"""How d2norm's norms reach detectron2: :func:`install` rebinds ``get_norm`` in every detectron2 module that
imported it (detectron2's ``get_norm`` is a closed dict bound by name in ``layers/blocks.py``, ``backbone/fpn.py``,
``roi_heads/box_head.py``, ...) to :func:`d2norm.layers.registry.get_norm`, and detectron2's ``build_model`` to
:func:`build_model` (the setup checks, then the model built inside :func:`~d2norm.layers.registry.norm_options`),
so stock builders, ``DefaultTrainer`` and ``DefaultPredictor`` all build our layers with the right cfg. It is,
besides :mod:`d2norm.compat`, the only place that patches detectron2; ``import d2norm`` calls it once (it is
idempotent).
"""
import functools
import sys

from .cfg_checks import check_norm_cfg
from .registry import bind_detectron2_get_norm, get_norm, norm_options

__all__ = ["build_model", "install"]

_original = {"build_model": None}


def build_model(cfg):
    """detectron2's ``build_model`` with ``cfg.D2NORM`` bound for every norm layer it creates, after the
    setup-time norm checks of :func:`d2norm.layers.cfg_checks.check_norm_cfg`."""
    check_norm_cfg(cfg)
    original = _original["build_model"]
    if original is None:
        from detectron2.modeling import build_model as original
    with norm_options(cfg):
        return original(cfg)


def _rebind(attr: str, old, new) -> int:
    count = 0
    for name, mod in list(sys.modules.items()):
        if (name == "detectron2" or name.startswith("detectron2.")) and mod is not None:
            if mod.__dict__.get(attr) is old:
                setattr(mod, attr, new)
                count += 1
    return count


def install() -> None:
    """Hook :func:`~d2norm.layers.registry.get_norm` and :func:`build_model` into detectron2 (idempotent)."""
    # Import every detectron2 module that binds get_norm / build_model by name, so the rebinding sees them.
    import detectron2.engine.defaults  # noqa: F401
    import detectron2.layers.aspp  # noqa: F401
    import detectron2.modeling  # noqa: F401  (imports fpn, resnet, heads, retinanet, semantic_seg)
    from detectron2.layers import batch_norm
    from detectron2.modeling.meta_arch import build as meta_build

    if not bind_detectron2_get_norm(batch_norm.get_norm):
        return
    _original["build_model"] = meta_build.build_model
    _rebind("get_norm", batch_norm.get_norm, get_norm)

    @functools.wraps(meta_build.build_model)
    def _build_model(cfg):
        return build_model(cfg)

    _rebind("build_model", meta_build.build_model, _build_model)
