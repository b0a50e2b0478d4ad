"""The norm registry: a d2norm name in any detectron2 ``NORM`` key builds our layer.

How it works (DESIGN principles 1-3):

* ``NORM_REGISTRY`` maps a name to a *builder* ``builder(cfg, channels) -> nn.Module`` that reads its options
  from ``cfg.D2NORM.<FAMILY>``.
* :func:`norm_options` binds the cfg of the model being built (a ``ContextVar``, so nothing outlives the build
  and threads do not share it). :func:`build_model` is detectron2's ``build_model`` inside that context.
* :func:`get_norm` resolves d2norm names through the registry and everything else through detectron2's own
  ``get_norm``, so detectron2's names ("BN", "SyncBN", "FrozenBN", "GN", ...) keep their meaning. Unknown names
  raise a ``ValueError`` listing every valid name.
* :func:`install` rebinds ``get_norm`` in every detectron2 module that imported it (detectron2's ``get_norm`` is
  a closed dict bound by name in ``layers/blocks.py``, ``backbone/fpn.py``, ``roi_heads/box_head.py``, ...), and
  wraps detectron2's ``build_model`` with :func:`norm_options`, so stock builders, ``DefaultTrainer`` and
  ``DefaultPredictor`` all build our layers with the right cfg. It runs once when d2norm is imported.
"""
import contextlib
import contextvars
import functools
import logging
import sys
from typing import Callable, Iterator, List, Optional

from fvcore.common.registry import Registry
from torch import nn

__all__ = [
    "NORM_REGISTRY",
    "register_norm",
    "get_norm",
    "norm_options",
    "build_model",
    "valid_norm_names",
    "active_cfg",
    "install",
]

logger = logging.getLogger(__name__)

NORM_REGISTRY = Registry("D2NORM_NORM")
NORM_REGISTRY.__doc__ = """
Registry of d2norm normalization layers. Each entry is ``builder(cfg, channels) -> nn.Module``; ``cfg`` is the
full detectron2 config of the model being built (with ``cfg.D2NORM`` added).
"""

# detectron2 names, probed against detectron2's own get_norm at install time (v0.6 has the first seven;
# later versions add "LN").
_D2_CANDIDATE_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

_ACTIVE_CFG: contextvars.ContextVar = contextvars.ContextVar("d2norm_active_cfg", default=None)
_state = {"d2_get_norm": None, "d2_build_model": None, "d2_names": None, "warned_default": False}


def register_norm(name: str) -> Callable:
    """Decorator: register ``builder(cfg, channels)`` under ``name``.

    fvcore's ``Registry.register`` always uses ``obj.__name__``; norm names like "GhostBN" are not valid
    function names in our style, hence this wrapper around its ``_do_register``.
    """
    if name in _D2_CANDIDATE_NAMES:
        raise ValueError(f"d2norm must not shadow detectron2's norm name {name!r}")

    def deco(builder: Callable) -> Callable:
        NORM_REGISTRY._do_register(name, builder)
        return builder

    return deco


def _d2_names() -> List[str]:
    if _state["d2_names"] is None:
        from detectron2.layers import batch_norm

        original = _state["d2_get_norm"] or batch_norm.get_norm
        names = []
        for n in _D2_CANDIDATE_NAMES:
            try:
                original(n, 32)
            except KeyError:
                continue
            names.append(n)
        _state["d2_names"] = names
    return list(_state["d2_names"])


def valid_norm_names() -> List[str]:
    """detectron2's norm names followed by d2norm's, as accepted by every ``NORM`` key."""
    return _d2_names() + sorted(k for k, _ in NORM_REGISTRY)


@contextlib.contextmanager
def norm_options(cfg) -> Iterator[None]:
    """Build d2norm layers inside this context with the options in ``cfg.D2NORM``.

    The cfg is cloned (and frozen), so changing ``cfg`` afterwards does not change layers built inside.
    """
    from ..config import add_d2norm_config

    bound = add_d2norm_config(cfg.clone())
    bound.freeze()
    token = _ACTIVE_CFG.set(bound)
    try:
        yield
    finally:
        _ACTIVE_CFG.reset(token)


def active_cfg():
    """The cfg bound by :func:`norm_options`; outside one, detectron2 + d2norm defaults (with a warning)."""
    cfg = _ACTIVE_CFG.get()
    if cfg is not None:
        return cfg
    from detectron2.config import get_cfg

    from ..config import add_d2norm_config

    if not _state["warned_default"]:
        logger.warning(
            "A d2norm norm layer was built outside d2norm.build_model / norm_options(cfg): "
            "using the default cfg.D2NORM options."
        )
        _state["warned_default"] = True
    return add_d2norm_config(get_cfg())


def get_norm(norm, out_channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm`` extended with :data:`NORM_REGISTRY`.

    Args:
        norm: ``None``/``""`` (no norm), a name, or a callable ``channels -> nn.Module`` (as in detectron2).
        out_channels: number of channels of the normalized tensor.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        if len(norm) == 0:
            return None
        if norm in NORM_REGISTRY:
            return NORM_REGISTRY.get(norm)(active_cfg(), out_channels)
        if norm not in _d2_names():
            raise ValueError(
                f"Unknown norm {norm!r}. Valid names: {', '.join(valid_norm_names())} (or '' / None for no norm)."
            )
    original = _state["d2_get_norm"]
    if original is None:
        from detectron2.layers import batch_norm

        original = batch_norm.get_norm
    return original(norm, out_channels)


def build_model(cfg):
    """detectron2's ``build_model`` with ``cfg.D2NORM`` bound for every norm layer it creates."""
    original = _state["d2_build_model"]
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
    """Hook :func:`get_norm` and :func:`build_model` into detectron2 (idempotent)."""
    if _state["d2_get_norm"] is not None:
        return
    # Import every detectron2 module that binds get_norm / build_model by name, so the rebinding sees them.
    import detectron2.engine.defaults  # noqa: F401
    import detectron2.layers.aspp  # noqa: F401
    import detectron2.modeling  # noqa: F401  (imports fpn, resnet, heads, retinanet, semantic_seg)
    from detectron2.layers import batch_norm
    from detectron2.modeling.meta_arch import build as meta_build

    _state["d2_get_norm"] = batch_norm.get_norm
    _state["d2_build_model"] = meta_build.build_model
    _d2_names()
    _rebind("get_norm", batch_norm.get_norm, get_norm)

    @functools.wraps(meta_build.build_model)
    def _build_model(cfg):
        return build_model(cfg)

    _rebind("build_model", meta_build.build_model, _build_model)
