"""The ``cfg.D2NORM`` node: assembled from the options each layer, model, hook and data module declares once
(:mod:`d2norm.options`); the generated reference with every key, default and paper section is
``docs/config.md``.

Use::

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(...)

Layer options are read from ``cfg.D2NORM.<FAMILY>`` when a model is built (see
:func:`d2norm.layers.registry.norm_options`), never from module-level state, so two models built from two
configs in one process do not share options.
"""
import copy
import os

from detectron2.config import CfgNode as CN

from .options import declared_nodes

__all__ = ["add_d2norm_config", "config_path", "resolve_config_file"]

#: the repository's ``configs/`` folder (next to the package in the editable install ``make install`` makes)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_file(path: str) -> str:
    """``path`` if it exists; else, for a relative ``configs/...`` path (as in the README and the tools' help),
    d2norm's own config of that name, so the documented commands work from any directory; else ``path``."""
    if not path or os.path.isfile(path) or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == "configs" and len(parts) > 1:
        own = os.path.join(CONFIGS_DIR, *parts[1:])
        if os.path.isfile(own):
            return own
    return path


def config_path(name: str) -> str:
    """Absolute path of ``configs/<name>`` (e.g. ``"cpu/retinanet_R18_ghostbn.yaml"``), whatever the working
    directory, as detectron2's ``model_zoo.get_config_file`` does for its own configs; FileNotFoundError naming
    the folder searched."""
    path = os.path.join(CONFIGS_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config {name!r} under {CONFIGS_DIR} (d2norm's configs folder)")
    return path


def add_d2norm_config(cfg: CN) -> CN:
    """Add the ``D2NORM`` node to ``cfg`` in place, one sub-node per declared option node
    (:mod:`d2norm.options`: each layer's ``OPTIONS``, each hook's / model's ``declare_node``; ``import d2norm``
    imports every declaring module); returns ``cfg``.

    Idempotent: values already set are kept; nodes or keys declared since (a layer registered after the cfg was
    made) are added with their defaults.
    """
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    root = cfg.setdefault("D2NORM", CN())
    for node in declared_nodes():
        sub = root.setdefault(node.name, CN())
        for o in node.options:
            if o.key not in sub:
                sub[o.key] = copy.deepcopy(o.default)
    if was_frozen:
        cfg.freeze()
    return cfg
