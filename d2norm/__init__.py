"""d2norm: the batch-normalization research of five papers as detectron2 components.

Importing d2norm first applies :mod:`d2norm.compat` (which makes detectron2 v0.6 run on today's stack and is
inert on a compiled upstream detectron2), then registers every norm layer, head, backbone and
meta-architecture, and hooks the norm registry into detectron2's ``get_norm`` / ``build_model``
(:func:`d2norm.layers.install`, the only detectron2 patch outside :mod:`d2norm.compat`).
"""
from . import compat  # noqa: F401  (must run before any detectron2.layers import)

from .config import add_d2norm_config, config_path
from . import layers
from .layers import NORM_REGISTRY, get_norm, norm_layer, norm_options
from . import modeling  # noqa: F401  (registers heads/backbones/meta-archs)
from . import data  # noqa: F401  (declares D2NORM.DATA)
from .engine import hooks  # noqa: F401  (declares the hooks' cfg nodes)

# The one detectron2 patch outside compat: get_norm / build_model resolve d2norm names (idempotent).
layers.install()

__version__ = "0.1.0"

__all__ = ["add_d2norm_config", "config_path", "get_norm", "NORM_REGISTRY", "norm_layer", "norm_options", "__version__"]
