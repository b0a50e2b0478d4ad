"""R-CNN heads whose BatchNorm normalizes a random share of all workers' RoIs (rethinking §6.1, Fig. 9, Table 6).

rethinking §6.1: "randomly shuffle the RoI features among GPUs before entering the head. This assigns each GPU a
random subset of samples to normalize, and also weakens the correlation between samples within a normalization
batch." Fig. 9: "RoI features are first shuffled among GPUs ... Other computation in the head is independent for
each RoI. After the head, all RoI predictions are shuffled back to form predictions for each image."

Where the shuffle sits (as in Fig. 9): the pooled RoI features are shuffled before the head's first layer and
the head's output is shuffled back, so the *whole* head (every conv + BN + ReLU, and the fc / deconv / predictor
layers, which are per-RoI anyway) runs on the random share. One shuffle per head instead of one per BN layer.

Heads (registered in detectron2's registries, selected by ``MODEL.ROI_BOX_HEAD.NAME`` / ``ROI_MASK_HEAD.NAME``):

* ``ShuffledConvFCHead``: detectron2's :class:`FastRCNNConvFCHead` (4conv1fc with ``NUM_CONV 4, NUM_FC 1`` and a
  BN ``NORM``) with shuffled training.
* ``ShuffledMaskRCNNConvUpsampleHead``: detectron2's :class:`MaskRCNNConvUpsampleHead` with shuffled training.

Both keep the stock head's parameters and state-dict keys (checkpoints are interchangeable with the stock heads),
read every stock key (``NUM_CONV``, ``CONV_DIM``, ``NORM``, ...) and add ``cfg.D2NORM.SHUFFLE_HEAD``. The norm is
the stock ``NORM`` key (the paper: per-GPU "BN"). Inference never shuffles (population statistics, Table 6).
"""
import logging
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from ...options import Bool, Int, Option, check_node, declare_node, default
from ...utils.comm import all_to_all_rows, exchange_rows_and_seed, group_world_size, is_local_only, permutation

__all__ = [
    "balanced_shares",
    "shuffled_apply",
    "shuffle_head_options",
    "ShuffledConvFCHead",
    "ShuffledMaskRCNNConvUpsampleHead",
]

logger = logging.getLogger(__name__)


def balanced_shares(total: int, world_size: int) -> List[int]:
    """How many of the ``total`` shuffled RoIs each rank normalizes: an equal split, the remainder
    ``total % world_size`` going one each to the first ranks (sizes differ by at most one; a rank gets 0 only
    when ``total < world_size``). Rank ``r`` takes the contiguous slice of the permuted order after ranks < r.
    """
    q, rem = divmod(int(total), int(world_size))
    return [q + (1 if r < rem else 0) for r in range(world_size)]


def shuffled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    group=None,
) -> torch.Tensor:
    """``fn`` applied to a random, equally sized share of all ranks' rows of ``x``; returns ``fn``'s output for
    this rank's own rows, in their original order (rethinking §6.1, Fig. 9).

    ``fn`` must be per-row except for its normalization layers (an R-CNN head: per-RoI convs/fcs + BN), which
    do not depend on the order of the rows they normalize.

    Steps: (1) one exchange of every rank's row count and a seed drawn by the group's first rank from its
    ``generator`` (:func:`exchange_rows_and_seed`; per-rank counts may differ, 0 included); (2) the permutation
    of all rows (rank order) that seed stands for (:func:`permutation`, on the host, identical on every rank);
    position block r of the permuted order (:func:`balanced_shares`) is rank r's share; (3) each rank sends each
    of its rows to the rank whose share holds it (:func:`all_to_all_rows`), applies ``fn`` to the share it
    received, so its BN layers normalize that random share, and (4) the outputs go back the same way and are put
    in the input's row order.

    Communication: each row crosses the network only to the rank that normalizes it and back (forward 1 header
    + 2 all-to-all, backward 2 all-to-all); an all-gather of every rank's rows would move world_size x the bytes.
    The header is read on the host (one sync per call, which no row exchange of unknown counts can avoid: the
    receivers must size their buffers); the routing is computed on the host and copied to the device as index
    tensors.

    Differentiable end to end (the all-to-all's backward is the reverse all-to-all). To keep the backward
    collectives on every rank, ``x`` is made to require grad when autograd is recording and it does not (e.g. a
    rank whose pooled features were created without a graph), so no rank can skip a backward exchange while
    another runs it. Every rank must call this in the same order and run backward through the result (as for
    any synchronized layer; detectron2's losses keep empty predictions in the graph).

    Single process (or a group of one): exactly ``fn(x)``.
    """
    world = group_world_size(group)
    if world == 1:
        return fn(x)
    if torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_()
    sizes, seed = exchange_rows_and_seed(x, generator, group=group)
    total, rank = sum(sizes), dist.get_rank(group)
    if total == 0:  # every rank is empty and knows it: no exchange anywhere
        return fn(x)
    perm = permutation(total, seed)  # position p of the shuffled order holds global row perm[p]
    ranks = torch.arange(world)
    dest = torch.empty(total, dtype=torch.int64)
    dest[perm] = ranks.repeat_interleave(torch.tensor(balanced_shares(total, world)))  # global row -> its rank
    source = ranks.repeat_interleave(torch.tensor(sizes))  # global row -> the rank it comes from
    offset = sum(sizes[:rank])
    mine = dest[offset : offset + sizes[rank]]
    order = torch.argsort(mine, stable=True)  # own rows grouped by destination rank
    send = torch.bincount(mine, minlength=world).tolist()
    recv = torch.bincount(source[dest == rank], minlength=world).tolist()
    y_share = fn(all_to_all_rows(x[_to_device(order, x.device)], send, recv, group))
    y_sent = all_to_all_rows(y_share, recv, send, group)  # row i = output for own row order[i]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return y_sent[_to_device(inverse, x.device)]


def _to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device``; to CUDA through pinned memory, so the copy does not wait for the work
    already queued on the stream (a copy from pageable memory does)."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


NODE = "SHUFFLE_HEAD"
OPTIONS = declare_node(NODE, (
    Option("ENABLED", True, "True: shuffle RoIs across workers in training (Table 6 'per-GPU BN w/ shuffle'); "
           "False: the stock per-GPU head (rows 1-2), same parameters and checkpoint keys.", check=Bool()),
    Option("SEED", -1, "Permutation source (a seed drawn on rank 0 and sent to every rank): -1 = torch's global "
           "RNG of rank 0 (seeded by detectron2's SEED); >= 0 = a dedicated generator per head (box: SEED, mask: SEED + 1).",
           check=Int(-1, note=" (>= 0: a dedicated generator; -1: the global torch RNG of rank 0)")),
), doc="Shuffled-RoI BN heads (ShuffledConvFCHead, ShuffledMaskRCNNConvUpsampleHead): rethinking §6.1, Fig. 9, "
       "Table 6")


def shuffle_head_options(cfg, seed_offset: int) -> dict:
    """Validated ``cfg.D2NORM.SHUFFLE_HEAD`` options for a head: ``{"shuffle": bool, "seed": int}``.

    ``seed_offset`` separates the generators of the box head (0) and the mask head (1) when ``SEED >= 0``.
    """
    opts = cfg.D2NORM.SHUFFLE_HEAD
    enabled, seed = opts.ENABLED, opts.SEED
    check_node(cfg, NODE)
    return {"shuffle": enabled, "seed": seed if seed < 0 else seed + seed_offset}


class _ShuffleMixin:
    """Holds the shuffle switch and the permutation generator of a head."""

    def _init_shuffle(self, shuffle: bool, seed: int, norm) -> None:
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        # A dedicated generator so the permutations do not depend on (nor consume) the model's other random
        # draws; only the first rank's generator is used (exchange_rows_and_seed sends its seed). Not checkpointed:
        # a resumed run restarts the sequence, which only changes which random shares are drawn.
        self._generator = torch.Generator().manual_seed(self.seed) if self.seed >= 0 else None
        if self.shuffle and not norm:
            logger.warning(
                "%s has no norm (NORM %r): shuffling RoIs across workers only changes what BatchNorm "
                "normalizes, so it has no effect here.", type(self).__name__, norm,
            )

    def _shuffled(self, fn, x):
        if self.training and self.shuffle and not is_local_only():
            return shuffled_apply(fn, x, self._generator)
        return fn(x)


@ROI_BOX_HEAD_REGISTRY.register()
class ShuffledConvFCHead(_ShuffleMixin, FastRCNNConvFCHead):
    """:class:`FastRCNNConvFCHead` (e.g. 4conv1fc + BN, rethinking §4.2 / [GN paper]) whose training forward
    runs on a random share of all workers' RoIs (rethinking §6.1, Fig. 9, Table 6 "per-GPU BN w/ shuffle").

    Training with more than one worker and ``D2NORM.SHUFFLE_HEAD.ENABLED``: :func:`shuffled_apply` around the
    whole head. Otherwise (one worker, ``ENABLED False``, eval): exactly ``FastRCNNConvFCHead``.
    """

    @configurable
    def __init__(self, input_shape, *, conv_dims, fc_dims, conv_norm="", shuffle: bool = default(NODE, "ENABLED"),
                 seed: int = default(NODE, "SEED")):
        """Arguments of :class:`FastRCNNConvFCHead`, plus ``shuffle`` (shuffle in training) and ``seed``
        (``>= 0``: a dedicated generator; ``-1``: the global torch RNG of rank 0)."""
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm)
        self._init_shuffle(shuffle, seed, conv_norm)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(shuffle_head_options(cfg, seed_offset=0))
        return ret

    def forward(self, x):
        return self._shuffled(super().forward, x)


@ROI_MASK_HEAD_REGISTRY.register()
class ShuffledMaskRCNNConvUpsampleHead(_ShuffleMixin, MaskRCNNConvUpsampleHead):
    """:class:`MaskRCNNConvUpsampleHead` (convs + BN, deconv, predictor) whose training ``layers`` run on a random
    share of all workers' RoIs (rethinking §6.1, Fig. 9, Table 6). The loss / inference of
    ``BaseMaskRCNNHead.forward`` see the mask logits back in the original RoI order. One worker, ``ENABLED
    False`` or eval: exactly ``MaskRCNNConvUpsampleHead``.
    """

    @configurable
    def __init__(self, input_shape, *, num_classes, conv_dims, conv_norm="", shuffle: bool = default(NODE, "ENABLED"),
                 seed: int = default(NODE, "SEED"), **kwargs):
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=conv_norm, **kwargs)
        self._init_shuffle(shuffle, seed, conv_norm)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(shuffle_head_options(cfg, seed_offset=1))
        return ret

    def layers(self, x):
        return self._shuffled(super().layers, x)
