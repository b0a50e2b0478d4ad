"""Registered detectron2 heads, backbones and meta-architectures (importing registers them)."""
from .meta_arch import retinanet_domain  # noqa: F401  (DomainBNRetinaNet, rethinking Table 5)
from .backbone import mabn_resnet, xbn_resnet  # noqa: F401  (MABN and XBNBlock ResNets, MABN heads)
