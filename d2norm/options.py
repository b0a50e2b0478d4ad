"""Options declared once: every ``cfg.D2NORM.<NODE>.<KEY>`` is one :class:`Option` next to the code that reads it.

A layer lists its options in ``OPTIONS`` (class attribute); a hook, model or data module calls
:func:`declare_node`. From that one declaration come

* the cfg node and its default (:func:`d2norm.config.add_d2norm_config` assembles every declared node),
* a layer's ``from_config`` (:meth:`d2norm.layers.base.D2NormModule.from_config`) and its constructor defaults
  and checks (:func:`bind_options`, applied to every layer class that declares ``OPTIONS``),
* the generated option reference ``docs/config.md`` (``tools/gen_docs.py``).

The pattern is detectron2's ``add_*_config`` per project and mmcv's options travelling with the type, with the
default written once instead of in the cfg function and again in the constructor (timm's ``create_norm`` keeps
one dict of layer types; here the registry is that dict and the options travel with each entry).
"""
import copy
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .utils.validation import check_bool, check_choice, check_int, check_number

__all__ = [
    "Option", "Int", "Number", "Choice", "Bool", "Strings", "declare_node", "declared_nodes", "bind_options",
    "class_options", "options_from_config", "check_node", "check_cfg", "check_once", "check_values", "default",
    "markdown_reference",
]

#: a check: ``check(label, value)`` raises a ValueError naming ``label`` (which holds the cfg key) and what is
#: allowed, and returns the value (converted where the check converts)
Check = Callable[[str, Any], Any]


def Int(minimum: Optional[int] = None, maximum: Optional[int] = None, note: str = "") -> Check:
    return lambda label, v: check_int(label, v, minimum, maximum, note=note)


def Number(low=None, high=None, low_open=False, high_open=False, allow_none=False, note: str = "") -> Check:
    return lambda label, v: check_number(label, v, low, high, low_open, high_open, allow_none, note=note)


def Choice(*choices, note: str = "") -> Check:
    return lambda label, v: check_choice(label, v, choices, note=note)


def Bool(note: str = "") -> Check:
    return lambda label, v: check_bool(label, v, note=note)


def Strings(label: str, v) -> list:
    """A list of strings (e.g. regular expressions on layer names)."""
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"{label} must be a list of strings, got {v!r}")
    return list(v)


@dataclass(frozen=True)
class Option:
    """One option: ``cfg.D2NORM.<node>.<key>`` with its ``default``, the constructor argument ``arg`` it feeds
    (``None``: read from the cfg by a hook, tool or model), its ``check`` and ``doc`` (meaning, paper §)."""

    key: str
    default: Any
    doc: str
    arg: Optional[str] = None
    check: Optional[Check] = None
    #: the cfg node; ``None`` = the declaring class's ``CFG_NODE``
    node: Optional[str] = None

    def cfg_key(self, node: Optional[str] = None) -> str:
        return f"D2NORM.{self.node or node}.{self.key}"

    def validate(self, value, node: Optional[str] = None, owner: str = ""):
        """``value`` checked (ValueError naming the argument and its cfg key), converted by the check."""
        if self.check is None:
            return value
        label = f"{owner + ': ' if owner else ''}{self.arg or self.key.lower()} ({self.cfg_key(node)})"
        return self.check(label, value)


@dataclass
class _Node:
    name: str
    doc: str
    options: List[Option] = field(default_factory=list)
    owners: List[str] = field(default_factory=list)


_NODES: Dict[str, _Node] = {}


def declare_node(name: str, options: Sequence[Option], doc: str = "", owner: str = "") -> Tuple[Option, ...]:
    """Declare ``cfg.D2NORM.<name>`` with ``options`` (their ``node`` left ``None`` or equal to ``name``).
    Several owners may add keys to one node (layers sharing ``D2NORM.BN``); a key declared twice must be the
    same declaration. Returns the options (for the declaring module's own use)."""
    node = _NODES.setdefault(name, _Node(name, doc))
    if doc and not node.doc:
        node.doc = doc
    have = {o.key: o for o in node.options}
    for o in options:
        if o.node not in (None, name):
            raise ValueError(f"declare_node({name!r}): option {o.key} belongs to node {o.node!r}")
        if o.key in have:
            if have[o.key] is not o and (have[o.key].default, have[o.key].arg) != (o.default, o.arg):
                raise ValueError(f"D2NORM.{name}.{o.key} declared twice with different defaults/arguments")
            continue
        node.options.append(o)
        have[o.key] = o
    if owner and owner not in node.owners:
        node.owners.append(owner)
    return tuple(options)


def declared_nodes() -> List[_Node]:
    """Every declared node in declaration order."""
    return list(_NODES.values())


def class_options(cls) -> Dict[str, Tuple[str, Option]]:
    """``arg -> (node, option)`` of a layer class: the ``OPTIONS`` of its MRO, the most derived declaration of an
    argument winning (BRN's ``momentum`` from ``D2NORM.BRN`` over BN's ``D2NORM.BN.MOMENTUM``). Cfg-only options
    (``arg`` None) are keyed by their cfg key."""
    out: Dict[str, Tuple[str, Option]] = {}
    for klass in reversed(cls.__mro__):
        for o in klass.__dict__.get("OPTIONS", ()):
            node = o.node or klass.__dict__.get("CFG_NODE")
            out[o.arg or o.cfg_key(node)] = (node, o)
    return out


def _channel_arg(cls) -> str:
    init = cls.__init__
    params = list(inspect.signature(init).parameters.values())
    return params[1].name if params and params[0].name == "self" else params[0].name


def options_from_config(cls, cfg, channels: int) -> dict:
    """Constructor kwargs of ``cls`` from ``cfg.D2NORM``: the channel count and every declared argument. A node
    or key the cfg lacks (a layer registered after the cfg was made) falls back to the declared default."""
    kwargs = {_channel_arg(cls): channels}
    d2 = cfg.get("D2NORM", {})
    for arg, (node, o) in class_options(cls).items():
        if o.arg is None:
            continue
        kwargs[arg] = d2.get(node, {}).get(o.key, o.default)
    return kwargs


def bind_options(cls) -> None:
    """Give ``cls.__init__`` (when the class defines it) the declared defaults of its arguments and run the
    declared checks on every call, so the constructor states neither. The wrapped ``__init__`` shows the defaults
    in ``inspect.signature`` / ``help``."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "__d2norm_options__", False):
        return
    sig = inspect.signature(init)
    declared = class_options(cls)
    params = []
    for p in sig.parameters.values():
        if p.name in declared and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            p = p.replace(default=declared[p.name][1].default)
        params.append(p)
    try:
        full = sig.replace(parameters=params)
    except ValueError as e:  # a declared argument after an undeclared one without a default
        raise TypeError(f"{cls.__qualname__}.__init__: declared options must come after the arguments without a "
                        f"default ({e})") from None

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = full.bind(self, *args, **kwargs)
        bound.apply_defaults()
        mine = class_options(type(self))  # the instance's class decides labels (a subclass may re-declare)
        for name, value in bound.arguments.items():
            if name in mine and name in declared:
                node, o = mine[name]
                o.validate(value, node, getattr(type(self), "norm_name", None) or type(self).__name__)
        return init(*bound.args, **bound.kwargs)

    __init__.__signature__ = full
    __init__.__d2norm_options__ = True
    cls.__init__ = __init__


def check_node(cfg, name: str) -> None:
    """Run the declared check of every option of ``cfg.D2NORM.<name>`` (ValueError naming the cfg key, the value
    and what is allowed). A node or key the cfg lacks is skipped (its default is used, which is valid). Once per
    frozen cfg (:func:`check_once`): the launch's check of every node and a hook's own check share the result."""
    values = cfg.get("D2NORM", {}).get(name)
    # keyed by the values too: a cfg defrosted, changed and frozen again is checked again
    check_once(cfg, f"node:{name}:{values!r}", lambda c: _check_node(c, name))


def _check_node(cfg, name: str) -> None:
    node = _NODES.get(name)
    values = cfg.get("D2NORM", {}).get(name)
    if node is None or values is None:
        return
    for o in node.options:
        if o.check is not None and o.key in values:
            o.check(o.cfg_key(name), values[o.key])


def check_cfg(cfg) -> None:
    """:func:`check_node` for every declared node: every d2norm option of ``cfg`` is checked, used or not (as
    every NORM key is), so a typo'd value fails at setup rather than when the layer or hook is first built."""
    for name in list(_NODES):
        check_node(cfg, name)


_ONCE: Dict[int, Tuple[Any, set]] = {}


def check_once(cfg, name: str, check: Callable) -> None:
    """``check(cfg)`` unless it already passed for this frozen ``cfg`` object (a launch's checks run at setup;
    the trainer's hook building then reuses the result instead of checking again). A cfg that is not frozen may
    have changed since: always checked."""
    if not cfg.is_frozen():
        check(cfg)
        return
    for k in [k for k, (ref, _) in _ONCE.items() if ref() is None]:
        del _ONCE[k]
    ref, done = _ONCE.get(id(cfg), (None, None))
    if ref is None or ref() is not cfg:
        ref, done = weakref.ref(cfg), set()
        _ONCE[id(cfg)] = (ref, done)
    if name not in done:
        check(cfg)
        done.add(name)


def check_values(name: str, **values) -> None:
    """The declared checks of ``D2NORM.<name>`` on ``values`` given by key (``check_values("XBNBLOCK",
    POSITION=2)``), for classes that take a node's options as constructor arguments."""
    node = _NODES[name]
    by_key = {o.key: o for o in node.options}
    for key, value in values.items():
        o = by_key[key]
        if o.check is not None:
            o.check(o.cfg_key(name), value)


def markdown_reference() -> str:
    """Every declared ``cfg.D2NORM`` key as markdown: one table per node (key, default, meaning with the paper
    section, the constructor argument it feeds), the text of ``docs/config.md`` (``tools/config_reference.py``)."""
    out = ["# `cfg.D2NORM`: every key", "",
           "Generated from the option declarations (`d2norm/options.py`; each layer's `OPTIONS`, each hook's and",
           "model's `declare_node`) by `python tools/config_reference.py --write docs/config.md`; a test fails when",
           "this page and the declarations differ.", ""]
    for node in declared_nodes():
        out += [f"## `D2NORM.{node.name}`", ""]
        if node.doc:
            out += [node.doc + (f" (declared by {', '.join(node.owners)})" if node.owners else ""), ""]
        if not node.options:
            out += ["No keys of its own.", ""]
            continue
        out += ["| key | default | argument | meaning |", "|---|---|---|---|"]
        for o in node.options:
            doc = o.doc.replace("|", "\\|")
            out.append(f"| `{o.key}` | `{o.default!r}` | {f'`{o.arg}`' if o.arg else ''} | {doc} |")
        out.append("")
    return "\n".join(out)


def default(name: str, key: str):
    """The declared default of ``D2NORM.<name>.<key>``, for a model class whose constructor takes the node's
    options as arguments (its signature then states no second default)."""
    for o in _NODES[name].options:
        if o.key == key:
            return copy.deepcopy(o.default)
    raise KeyError(f"D2NORM.{name}.{key} is not declared")
