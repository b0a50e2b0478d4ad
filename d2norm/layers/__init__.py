"""d2norm normalization layers. Importing this package registers every layer in ``NORM_REGISTRY``."""
from .registry import NORM_REGISTRY, NormLayer, get_norm, norm_layer, norm_options, register_norm, valid_norm_names
from .install import build_model, install
from .base import D2NormBatchNorm2d, D2NormModule, FrozenBNState, NotAnAffine
from .ghost_bn import GhostBatchNorm2d
from .batch_group_norm import BatchGroupNorm
from .mabn import CenteredConv2d, CenteredPlainConv2d, MABN2d
from .evalnorm import EvalNorm2d
from .batch_stats_bn import BatchStatsBatchNorm2d
from .batch_renorm import BatchRenorm2d
from .example_weighted_bn import ExampleWeightedBatchNorm2d
from .domain_bn import DomainBatchNorm2d, domain_scope
from .sync_domain_bn import SyncDomainBatchNorm2d
from .sync_bn import AnySyncBatchNorm2d
from .report import ConversionReport
from .convert import convert_norm

__all__ = [
    "NORM_REGISTRY", "NormLayer", "build_model", "get_norm", "install", "norm_layer", "norm_options",
    "register_norm", "valid_norm_names", "D2NormModule", "D2NormBatchNorm2d", "FrozenBNState", "NotAnAffine",
    "GhostBatchNorm2d", "BatchGroupNorm", "CenteredConv2d", "CenteredPlainConv2d", "MABN2d", "EvalNorm2d",
    "BatchStatsBatchNorm2d", "BatchRenorm2d", "ExampleWeightedBatchNorm2d", "DomainBatchNorm2d", "SyncDomainBatchNorm2d",
    "domain_scope", "AnySyncBatchNorm2d", "ConversionReport", "convert_norm",
]
