"""Registered R-CNN box/mask heads (importing registers them in detectron2's ROI_BOX_HEAD_REGISTRY /
ROI_MASK_HEAD_REGISTRY).

* shuffle_heads: ``ShuffledConvFCHead``, ``ShuffledMaskRCNNConvUpsampleHead`` (rethinking §6.1, Fig. 9, Table 6).
* mabn_heads: ``MABNConvFCHead``, ``MABNMaskRCNNConvUpsampleHead`` (mabn §4.2 eq 18, Appendix B.3).

SyncBN heads (rethinking Table 6) and batch-statistics heads (rethinking §4.2, Table 3) need no class of their
own: detectron2's ``FastRCNNConvFCHead`` / ``MaskRCNNConvUpsampleHead`` with ``NORM: "AnySyncBN"`` /
``NORM: "BatchStatsBN"`` (see configs/rethinking/mask_rcnn_R50_FPN_table6_*.yaml).
"""
from . import mabn_heads, shuffle_heads  # noqa: F401
