"""Registered detectron2 heads, backbones and meta-architectures (importing registers them)."""
from .meta_arch import retinanet_domain  # noqa: F401  (DomainBNRetinaNet, rethinking Table 5)
from .backbone import mabn_resnet, xbn_resnet  # noqa: F401  (MABN and XBNBlock ResNets)
from . import roi_heads  # noqa: F401  (shuffled-RoI BN heads, rethinking §6.1; MABN R-CNN heads)
from .meta_arch import evalnorm_arch  # noqa: F401  (EvalNorm-aware meta-architectures, evalnorm §3.4)
from .meta_arch import mabn_retinanet  # noqa: F401  (MABNRetinaNet, mabn Appendix B.3 Table 7)
