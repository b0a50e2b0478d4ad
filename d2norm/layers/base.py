"""What every d2norm normalization layer shares."""
from typing import Tuple

__all__ = ["D2NormModule"]


class D2NormModule:
    """Marker mixin for d2norm normalization layers.

    * Their affine parameters (γ, β) are norm parameters: ``SOLVER.WEIGHT_DECAY_NORM`` applies to them
      (four-things §3.3; see :func:`d2norm.solver.get_optimizer_params`), even for layers that are not
      subclasses of torch's norm classes.
    * Parameters named in :attr:`no_weight_decay` (e.g. EvalNorm's α̂, β̂) get no weight decay at all.
    """

    #: names of direct parameters of this module that must never be weight-decayed
    no_weight_decay: Tuple[str, ...] = ()
