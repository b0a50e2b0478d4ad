"""The norm registry: a d2norm name in any detectron2 ``NORM`` key builds our layer.

How it works:

* ``NORM_REGISTRY`` maps a name to a layer *class* with ``from_config(cfg, channels) -> dict``: its constructor
  kwargs read from ``cfg.D2NORM.<FAMILY>`` (detectron2's configurable convention).
* :func:`norm_options` binds the cfg of the model being built (a ``ContextVar``, so nothing outlives the build
  and threads do not share it). :func:`build_model` is detectron2's ``build_model`` inside that context.
* :func:`norm_layer` (``name, **options`` -> a picklable, printable ``channels -> module`` callable) carries
  options with the name, for LazyConfig and code: detectron2 accepts such a callable wherever it accepts a norm.
* :func:`get_norm` resolves d2norm names through the registry and everything else through detectron2's own
  ``get_norm``, so detectron2's names ("BN", "SyncBN", "FrozenBN", "GN", ...) keep their meaning. Unknown names
  raise a ``ValueError`` listing every valid name.
* :mod:`d2norm.layers.install` hooks :func:`get_norm` and the cfg-bound ``build_model`` into detectron2.
"""
import contextlib
import contextvars
import functools
import inspect
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import yaml
from tabulate import tabulate
from torch import nn

__all__ = [
    "NORM_REGISTRY",
    "NormRegistry",
    "NormLayer",
    "norm_layer",
    "register_norm",
    "get_norm",
    "norm_options",
    "valid_norm_names",
    "active_cfg",
    "bind_detectron2_get_norm",
]

logger = logging.getLogger(__name__)

# detectron2 names, probed against detectron2's own get_norm at install time (v0.6 has the first seven;
# later versions add "LN").
_D2_CANDIDATE_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


class NormRegistry:
    """Norm name -> layer class, with fvcore ``Registry``'s read interface: ``get``, ``in``, iteration over
    ``(name, class)`` pairs, a table as ``repr``.

    Our own rather than fvcore's ``Registry``: fvcore names every entry ``obj.__name__`` and has no public way to
    register a class under another name, and norm names ("GhostBN") are not class names.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._classes: Dict[str, type] = {}

    def add(self, name: str, cls: type) -> None:
        """Register ``cls`` under ``name``; ValueError for a detectron2 name, a taken name or a non-layer."""
        if name in _D2_CANDIDATE_NAMES:
            raise ValueError(f"d2norm must not shadow detectron2's norm name {name!r}")
        if name in self._classes:
            raise ValueError(f"norm name {name!r} is already registered to {self._classes[name].__qualname__}")
        from .base import D2NormModule

        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and issubclass(cls, D2NormModule)):
            raise ValueError(
                f"register_norm({name!r}): expected an nn.Module class implementing the D2NormModule protocol "
                f"(layers/base.py: from_config(cfg, channels), ...), got {cls!r}"
            )
        self._classes[name] = cls

    def get(self, name: str) -> type:
        cls = self._classes.get(name)
        if cls is None:
            raise KeyError(f"No norm named {name!r} in {self._name}; registered: {', '.join(sorted(self._classes))}")
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[Tuple[str, type]]:
        return iter(list(self._classes.items()))

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        rows = [(k, f"{v.__module__}.{v.__qualname__}") for k, v in self._classes.items()]
        return f"Registry of {self._name}:\n" + tabulate(rows, headers=["Names", "Classes"], tablefmt="fancy_grid")


#: d2norm's normalization layers: ``NORM`` name -> layer class with a classmethod ``from_config(cfg, channels)``
#: returning its constructor kwargs (``cfg`` is the full detectron2 config of the model being built)
NORM_REGISTRY = NormRegistry("D2NORM_NORM")

_ACTIVE_CFG: contextvars.ContextVar = contextvars.ContextVar("d2norm_active_cfg", default=None)
_state = {"d2_get_norm": None, "d2_build_model": None, "d2_names": None, "warned_default": set()}


def register_norm(name: str) -> Callable:
    """Class decorator: register a layer class (with ``from_config(cfg, channels) -> dict``) under ``name``."""
    if name in _D2_CANDIDATE_NAMES:
        raise ValueError(f"d2norm must not shadow detectron2's norm name {name!r}")

    def deco(cls):
        NORM_REGISTRY.add(name, cls)
        cls.norm_name = name  # the NORM name, used in option errors ("GhostBN: ghost_size (D2NORM.GHOST_BN.SIZE)")
        return cls

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
    """The cfg bound by :func:`norm_options`, or ``None`` outside one."""
    return _ACTIVE_CFG.get()


@functools.lru_cache(maxsize=None)
def _default_cfg():
    """detectron2 + ``cfg.D2NORM`` defaults (frozen: ``from_config`` only reads it)."""
    from detectron2.config import get_cfg

    from ..config import add_d2norm_config

    cfg = add_d2norm_config(get_cfg())
    cfg.freeze()
    return cfg


def _channel_arg(cls) -> str:
    """Name of the constructor's first argument (the number of channels)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return params[0].name


def _option_names(cls) -> List[str]:
    """Keyword options ``cls`` accepts: its ``from_config`` keys and its constructor's named arguments (following
    ``**kwargs`` into the base classes, e.g. ``affine``/``device``/``dtype`` of torch's BatchNorm)."""
    names = set(cls.from_config(_default_cfg(), 32)) - {_channel_arg(cls)}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


class NormLayer:
    """``channels -> module`` for a registered d2norm norm with options given here (see :func:`norm_layer`).

    Options named here are constructor kwargs of the layer class (``GhostBatchNorm2d(ghost_size=4)``); every
    other option comes from the cfg bound by :func:`norm_options` / :func:`build_model` when there is one,
    otherwise from the ``cfg.D2NORM`` defaults. Picklable, printable, comparable; ``LazyConfig.save`` writes it as
    ``{_target_: d2norm.layers.norm_layer, name: ..., <options>}``, which ``instantiate`` turns back into it.
    """

    def __init__(self, name: str, **options: Any):
        if not isinstance(name, str) or name not in NORM_REGISTRY:
            d2 = isinstance(name, str) and name in _D2_CANDIDATE_NAMES
            raise ValueError(
                f"norm_layer: {name!r} is not a d2norm norm name; valid: "
                f"{', '.join(sorted(k for k, _ in NORM_REGISTRY))}."
                + (f" detectron2's own names take no options: write norm={name!r}." if d2 else "")
            )
        cls = NORM_REGISTRY.get(name)
        allowed = _option_names(cls)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"norm_layer({name!r}): unknown option(s) {', '.join(unknown)}; {cls.__name__} accepts "
                f"{', '.join(allowed)} (the channel count is the call argument)."
            )
        self.name = name
        self.options: Dict[str, Any] = dict(options)

    @property
    def layer_class(self):
        return NORM_REGISTRY.get(self.name)

    def __call__(self, channels: int) -> nn.Module:
        cls = self.layer_class
        bound = _ACTIVE_CFG.get()
        kwargs = cls.from_config(bound if bound is not None else _default_cfg(), channels)
        if bound is None and not self.options and cls not in _state["warned_default"]:
            _state["warned_default"].add(cls)
            used = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != _channel_arg(cls))
            logger.warning(
                "%s (%s) built with no bound cfg (outside d2norm.build_model / norm_options(cfg)) and no explicit "
                "options: using the cfg.D2NORM defaults %s. Pass options with norm_layer(%r, ...) or build "
                "inside norm_options(cfg). (Said once per layer type.)",
                self.name, cls.__name__, used, self.name,
            )
        kwargs.update(self.options)
        return cls(**kwargs)

    def __repr__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.options.items()]
        return f"norm_layer({', '.join(args)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NormLayer) and (self.name, self.options) == (other.name, other.options)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.options.items(), key=lambda kv: kv[0]))))

    def to_dict(self) -> Dict[str, Any]:
        """The LazyConfig form: ``instantiate`` of it returns an equal :class:`NormLayer`."""
        return {"_target_": "d2norm.layers.norm_layer", "name": self.name, **self.options}


def norm_layer(name: str, **options: Any) -> NormLayer:
    """A d2norm norm with its options, as a ``channels -> module`` callable detectron2 accepts as ``norm``.

    ``L(FPN)(norm=norm_layer("GhostBN", ghost_size=4), ...)`` in a LazyConfig, or ``Conv2d(..., norm=...)`` /
    ``get_norm(norm_layer(...), C)`` in code. Unknown names and options raise a ``ValueError`` listing what is
    allowed. In a yacs config keep ``NORM: "GhostBN"`` with ``cfg.D2NORM.*``.
    """
    return NormLayer(name, **options)


# LazyConfig.save dumps with PyYAML's default Dumper: write a NormLayer as its instantiable mapping.
yaml.add_representer(NormLayer, lambda dumper, n: dumper.represent_dict(n.to_dict()))


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
            return NormLayer(norm)(out_channels)
        if norm not in _d2_names():
            raise ValueError(
                f"Unknown norm {norm!r}. Valid names: {', '.join(valid_norm_names())} (or '' / None for no norm)."
            )
    original = _state["d2_get_norm"]
    if original is None:
        from detectron2.layers import batch_norm

        original = batch_norm.get_norm
    return original(norm, out_channels)


def bind_detectron2_get_norm(original) -> bool:
    """Record detectron2's own ``get_norm`` (before :func:`d2norm.layers.install.install` rebinds it to
    :func:`get_norm`), which resolves detectron2's names; False when one is recorded already (idempotent)."""
    if _state["d2_get_norm"] is not None:
        return False
    _state["d2_get_norm"] = original
    _d2_names()
    return True
