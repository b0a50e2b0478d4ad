"""XBNBlock ResNet backbones (estimation-shift §5.1-5.3, Fig. 6, Tables 1, 4-6).

An XBNBlock is a residual block in which ONE batch normalization is replaced by a batch-free normalization
(BFN: GroupNorm or InstanceNorm), which blocks the accumulation of the BNs' estimation shift through the network
(estimation-shift §4.2.2, §5.1). Everything else is detectron2's ResNet: the backbone is built by detectron2's
``build_resnet_backbone`` (so ``MODEL.RESNETS.*`` keep their meaning and the BN part uses ``MODEL.RESNETS.NORM``,
which may be any detectron2 or d2norm name), then the chosen norm slots are swapped for :class:`BatchFreeNorm`.
Module and parameter names are detectron2's, so standard ResNet checkpoints load.

Options (``cfg.D2NORM.XBNBLOCK``):

* ``POSITION`` p ∈ {1, 2, 3} (§5.2.1 "Positions of BFN in an XBNBlock", Table 1): the BFN replaces the norm of
  ``conv{p}`` of the residual branch: P1 = after the first 1x1 conv, P2 = after the 3x3 conv (Fig. 6b, the
  paper's default), P3 = after the last 1x1 conv. ResNet-18/34 ``BasicBlock``s have two norms (conv1, conv2),
  so only p ∈ {1, 2} exists there; d2norm's P1/P2 are the norms after their first/second 3x3 conv. (The
  official code maps both P1 and P2 of a BasicBlock to its first norm, bn1: to reproduce its R18/R34 P2, use
  ``POSITION`` 1.) Shortcut norms are never replaced (Fig. 6 changes one BN of the branch only).
* ``STEM_NORM``: the stem's norm. ``"BFN"`` (default) = the batch-free norm of ``NORM_TYPE`` /
  ``NUM_GROUPS``, as the official code does (its ImageNet XBNBlock models normalize the 64-channel stem with
  GN of 64 groups, i.e. IN; its detection models use a GN stem), so the authors' checkpoints load with every
  entry; ``"RESNETS"`` = ``MODEL.RESNETS.NORM`` like the other BN slots (a BN-stem checkpoint keeps its
  stem statistics).
* ``DENSITY`` D (§5.2.1 "Positions of XBNBlock in a network", Fig. 7): the residual blocks are numbered
  k = 1..N in forward order *across* stages res2..res5 (one global count; N = 16 for ResNet-50, 33 for
  ResNet-101); block k is an XBNBlock iff ``k % D == 0``. D = 1 is every block (the paper's "XBNBlock");
  D = 2, 4, 8 give the paper's {2n}-th, {4n}-th, {8n}-th bottlenecks (XBNBlock-D2/D4/D8). Stages that are not
  built because ``OUT_FEATURES`` stops earlier are the last ones, so they never shift the numbering.
* ``NORM_TYPE`` "GN" (GroupNorm with ``NUM_GROUPS`` groups; the paper uses g = 64, §5.2.1) or "IN"
  (InstanceNorm = GroupNorm with one channel per group, §5.1), with ``EPS``. ``NUM_GROUPS`` must divide the
  channels of every replaced norm (else a ValueError listing each layer, its channels and the group count).

Loading checkpoints: a :class:`BatchFreeNorm` keeps γ/β (``weight``/``bias``) of the BN-type layer a checkpoint
holds for its slot and drops that layer's statistics (``running_mean``, ``running_var``,
``num_batches_tracked``, or any other per-layer buffer); the dropped keys are logged in one warning per load
and returned by :func:`xbn_load_report`. Note γ/β of BN and of the BFN act on differently normalized
activations: a BN checkpoint is a warm start, not an equivalent network (the paper fine-tunes from ImageNet
models pre-trained *with* XBNBlock, §5.3.1).
"""
import logging
from typing import Dict, List

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone
from torch import nn

from .fpn import fpn_from_cfg, rcnn_top_block, retinanet_top_block
from ...options import Choice, Int, Number, Option, check_values, declare_node, default
from ...layers.registry import norm_options
from ...layers.report import ConversionReport

__all__ = [
    "BatchFreeNorm",
    "XBNOptions",
    "xbn_options_from_cfg",
    "xbn_block_flags",
    "convert_resnet_to_xbn",
    "xbn_load_report",
    "xbn_resnet",
    "build_xbn_resnet_backbone",
    "build_xbn_resnet_fpn_backbone",
    "build_xbn_retinanet_resnet_fpn_backbone",
]

logger = logging.getLogger(__name__)

_NORM_TYPES = ("GN", "IN")
_STEM_NORMS = ("BFN", "RESNETS")


class BatchFreeNorm(nn.GroupNorm):
    """The batch-free normalization of an XBNBlock (estimation-shift §5.1): GN, or IN when ``num_groups`` equals
    ``num_channels`` (per-sample, per-channel statistics over H, W — exactly GroupNorm with C groups).

    Same state dict as ``nn.GroupNorm`` (``weight``, ``bias``; no buffers): identical behaviour in training and
    inference, which is why it stops the estimation shift (§4.2.2). Loading a checkpoint that held a BN-type
    layer in this slot keeps γ/β and drops the layer's other direct entries (its statistics); the dropped keys of
    the latest load are in :attr:`dropped_keys`.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.dropped_keys: List[str] = []

    @property
    def is_instance_norm(self) -> bool:
        return self.num_groups == self.num_channels

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # `state_dict` is torch's per-module copy, so popping here never touches the caller's dict.
        own = set(self._parameters) | set(self._buffers)
        dropped = [k for k in state_dict
                   if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] not in own]
        for k in dropped:
            state_dict.pop(k)
        self.dropped_keys = dropped
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def xbn_load_report(model: nn.Module) -> ConversionReport:
    """What the latest ``load_state_dict`` could not carry into the batch-free slots: ``unmapped_source`` =
    ``{layer: [dropped entries]}`` (the checkpoint's statistics of a BN-type layer whose slot is now GN/IN), with
    the layer names as in the loaded state dict (e.g. ``backbone.bottom_up.res2.0.conv2.norm``)."""
    report = ConversionReport(target="XBNBlock")
    for m in model.modules():
        if isinstance(m, BatchFreeNorm):
            for key in m.dropped_keys:
                layer, _, name = key.rpartition(".")
                report.unmapped_source.setdefault(layer, []).append(name)
    return report


def _report_dropped(module: nn.Module, incompatible_keys) -> None:
    per_layer = xbn_load_report(module).unmapped_source
    if per_layer:
        logger.warning(
            "XBNBlock: the checkpoint has statistics for %d norms that are batch-free (GN/IN) in this model; "
            "their gamma/beta were loaded, these entries were dropped:\n  %s",
            len(per_layer), "\n  ".join(f"{layer}.{{{', '.join(names)}}}" for layer, names in per_layer.items()),
        )


NODE = "XBNBLOCK"
OPTIONS = declare_node(NODE, (
    Option("POSITION", 2, "Which norm of an XBNBlock's residual branch becomes batch-free (§5.2.1, Table 1): 1/2/3 = "
           "after conv1/conv2/conv3 (P1/P2/P3); 2 = Fig. 6b, the paper's default. BasicBlocks (R18/R34): 1-2.",
           check=Int(1, 3, note=" (P1/P2/P3: which norm of the block becomes batch-free)")),
    Option("DENSITY", 1, "Every DENSITY-th residual block is an XBNBlock (§5.2.1, Fig. 7): blocks 1..N in forward "
           "order across res2-res5, block k iff k % DENSITY == 0; 1 = all, 2/4/8 = XBNBlock-D2/D4/D8.",
           check=Int(1, note=" (every D-th block is an XBNBlock; the paper uses 1, 2, 4, 8)")),
    Option("NORM_TYPE", "GN", "The batch-free norm (§5.1): 'GN' (GroupNorm, NUM_GROUPS groups) or 'IN' "
           "(InstanceNorm = GroupNorm with one channel per group).", check=Choice(*_NORM_TYPES)),
    Option("NUM_GROUPS", 64, "GN group count g (§5.2.1: 64); must divide the channels of every replaced norm. "
           "Ignored for 'IN'.", check=Int(1)),
    Option("EPS", 1e-5, "eps of the batch-free norm (GroupNorm's default).", check=Number(0, low_open=True)),
    Option("STEM_NORM", "BFN", "The stem's norm: 'BFN' = the batch-free norm above, as the official code (so the "
           "authors' checkpoints load completely); 'RESNETS' = MODEL.RESNETS.NORM like the other BN slots.",
           check=Choice(*_STEM_NORMS, note=" (the batch-free norm, or MODEL.RESNETS.NORM)")),
), doc="XBNBlock ResNet backbones (build_xbn_*_backbone): estimation-shift §5.1-5.3")


class XBNOptions:
    """Validated ``cfg.D2NORM.XBNBLOCK`` values (see the module docstring for their meaning)."""

    def __init__(self, position: int = default(NODE, "POSITION"), density: int = default(NODE, "DENSITY"),
                 norm_type: str = default(NODE, "NORM_TYPE"), num_groups: int = default(NODE, "NUM_GROUPS"),
                 eps: float = default(NODE, "EPS"), stem_norm: str = default(NODE, "STEM_NORM")):
        check_values(NODE, POSITION=position, DENSITY=density, NORM_TYPE=norm_type, NUM_GROUPS=num_groups, EPS=eps,
                     STEM_NORM=stem_norm)
        self.stem_norm = stem_norm
        self.position, self.density, self.norm_type = int(position), int(density), norm_type
        self.num_groups, self.eps = int(num_groups), float(eps)


def xbn_options_from_cfg(cfg) -> XBNOptions:
    c = cfg.D2NORM.XBNBLOCK
    return XBNOptions(c.POSITION, c.DENSITY, c.NORM_TYPE, c.NUM_GROUPS, c.EPS, c.STEM_NORM)


def xbn_block_flags(num_blocks: int, density: int) -> List[bool]:
    """Which of the blocks 1..num_blocks (global forward order) are XBNBlocks: block k iff k % density == 0."""
    return [k % density == 0 for k in range(1, num_blocks + 1)]


def _branch_convs(block: nn.Module) -> List[nn.Module]:
    # conv1, conv2[, conv3] of the residual branch (BasicBlock, BottleneckBlock, DeformBottleneckBlock).
    convs, k = [], 1
    while isinstance(getattr(block, f"conv{k}", None), nn.Module):
        convs.append(getattr(block, f"conv{k}"))
        k += 1
    return convs


def convert_resnet_to_xbn(resnet: ResNet, options: XBNOptions) -> Dict[str, BatchFreeNorm]:
    """Swap the configured norm slots of ``resnet`` (a detectron2 ``ResNet``) for :class:`BatchFreeNorm`, in place.

    Returns ``{module name: new norm}`` (e.g. ``"res2.1.conv2.norm"``) in block order. Call it before freezing
    stages (``ResNet.freeze``) so frozen stages freeze the new layers too.
    """
    blocks = [(f"{sname}.{i}", block)
              for sname, stage in zip(resnet.stage_names, resnet.stages) for i, block in enumerate(stage)]
    flags = xbn_block_flags(len(blocks), options.density)
    targets, bad_groups = [], []
    stem_conv = getattr(getattr(resnet, "stem", None), "conv1", None)
    if options.stem_norm == "BFN" and getattr(stem_conv, "norm", None) is not None:
        channels = stem_conv.out_channels
        groups = channels if options.norm_type == "IN" else options.num_groups
        if channels % groups:
            bad_groups.append(f"stem.conv1.norm ({channels} channels; or STEM_NORM 'RESNETS')")
        targets.append(("stem.conv1.norm", stem_conv, groups, channels))
    for (name, block), is_xbn in zip(blocks, flags):
        if not is_xbn:
            continue
        convs = _branch_convs(block)
        if options.position > len(convs):
            raise ValueError(
                f"D2NORM.XBNBLOCK.POSITION={options.position}, but block {name} ({type(block).__name__}) has "
                f"{len(convs)} norms in its residual branch (positions 1..{len(convs)}); P3 needs bottleneck "
                f"blocks (ResNet-50 and deeper)"
            )
        conv = convs[options.position - 1]
        slot = f"{name}.conv{options.position}.norm"
        if getattr(conv, "norm", None) is None:
            raise ValueError(f"{slot} does not exist (MODEL.RESNETS.NORM is empty?): XBNBlock replaces an "
                             f"existing norm")
        channels = conv.out_channels
        groups = channels if options.norm_type == "IN" else options.num_groups
        if channels % groups:
            bad_groups.append(f"{slot} ({channels} channels)")
        targets.append((slot, conv, groups, channels))
    if bad_groups:
        raise ValueError(
            f"D2NORM.XBNBLOCK.NUM_GROUPS={options.num_groups} must divide the channels of every batch-free norm; "
            f"it does not divide: {', '.join(bad_groups)}"
        )
    new = {}
    for slot, conv, groups, channels in targets:
        conv.norm = BatchFreeNorm(groups, channels, eps=options.eps).to(conv.weight.device)
        new[slot] = conv.norm
    if not getattr(resnet, "_xbn_report_hook", False):
        resnet.register_load_state_dict_post_hook(_report_dropped)
        resnet._xbn_report_hook = True
    return new


def xbn_resnet(resnet: ResNet, position: int = default(NODE, "POSITION"), density: int = default(NODE, "DENSITY"),
               norm_type: str = default(NODE, "NORM_TYPE"), num_groups: int = default(NODE, "NUM_GROUPS"),
               eps: float = default(NODE, "EPS"), freeze_at: int = 0,
               stem_norm: str = default(NODE, "STEM_NORM")) -> ResNet:
    """Plain-argument XBNBlock ResNet (LazyConfig, code): ``resnet`` (a detectron2 ``ResNet`` built with
    ``freeze_at=0``) with XBNBlocks (:func:`convert_resnet_to_xbn`, options as :class:`XBNOptions`), then frozen up
    to stage ``freeze_at`` so frozen stages include the batch-free norms.

    ``L(xbn_resnet)(resnet=L(ResNet)(...), position=2, density=1, norm_type="GN", num_groups=64, freeze_at=2,
    stem_norm="BFN")``.
    """
    options = XBNOptions(position, density, norm_type, num_groups, eps, stem_norm)
    frozen = [n for n, p in resnet.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"xbn_resnet: build the inner ResNet with freeze_at=0 and pass freeze_at to xbn_resnet "
                         f"(the swap must happen before freezing); frozen already: {', '.join(frozen[:4])}")
    convert_resnet_to_xbn(resnet, options)
    return resnet.freeze(freeze_at)


@BACKBONE_REGISTRY.register()
def build_xbn_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet (``MODEL.RESNETS.*``) with XBNBlocks as set by ``D2NORM.XBNBLOCK`` (§5.1)."""
    o = xbn_options_from_cfg(cfg)
    unfrozen = cfg.clone()
    unfrozen.defrost()
    unfrozen.MODEL.BACKBONE.FREEZE_AT = 0  # freeze after the swap, so frozen stages include the BFNs
    with norm_options(cfg):
        resnet = build_resnet_backbone(unfrozen, input_shape)
    return xbn_resnet(resnet, o.position, o.density, o.norm_type, o.num_groups, o.eps, cfg.MODEL.BACKBONE.FREEZE_AT,
                      o.stem_norm)


@BACKBONE_REGISTRY.register()
def build_xbn_resnet_fpn_backbone(cfg, input_shape):
    """XBNBlock ResNet + FPN with P6 by max-pooling (Faster/Mask R-CNN, estimation-shift Tables 4-6)."""
    bottom_up = build_xbn_resnet_backbone(cfg, input_shape)
    return fpn_from_cfg(cfg, bottom_up, rcnn_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_xbn_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """XBNBlock ResNet + FPN with P6/P7 from res5 (RetinaNet)."""
    bottom_up = build_xbn_resnet_backbone(cfg, input_shape)
    return fpn_from_cfg(cfg, bottom_up, retinanet_top_block(cfg, bottom_up))
