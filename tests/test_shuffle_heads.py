"""Shuffled-RoI BN heads (rethinking §6.1, Fig. 9, Table 6) on 2 real gloo processes, against an independent
float64 reference: all ranks' RoIs concatenated, permuted, split into equal shares, a functional re-implementation
of the head (conv → BN with the share's batch statistics → ReLU ..., written here from the BN equations) applied
to each share, un-permuted. Outputs, input gradients of every rank, parameter gradients (summed over ranks, as
data parallelism does) and each rank's EMA buffers are compared; uneven, empty and all-empty ranks; the permutation
comes from rank 0 even when ranks' generators differ. Single process: exactly the stock head."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead, build_box_head
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, build_mask_head

import d2norm
import d2norm.modeling.roi_heads  # noqa: F401  (registers the heads)
from d2norm.utils.comm import exchange_rows_and_seed
from d2norm.layers.registry import norm_options
from d2norm.modeling.roi_heads.shuffle_heads import (
    ShuffledConvFCHead,
    ShuffledMaskRCNNConvUpsampleHead,
    balanced_shares,
)
from dist_utils import run_distributed
from helpers import batch_moments, bn_normalize

C_IN, RES = 3, 4  # pooled RoI features: 3 channels, 4 x 4
NUM_CONV, CONV_DIM, FC_DIM, NUM_CLASSES = 2, 4, 6, 2
EPS, MOMENTUM = 1e-5, 0.1


# ---- cfg / builders ---------------------------------------------------------------------------------------


def make_cfg(norm="BN", enabled=True, seed=-1, box="ShuffledConvFCHead", mask="ShuffledMaskRCNNConvUpsampleHead"):
    cfg = d2norm.add_d2norm_config(get_cfg())
    b = cfg.MODEL.ROI_BOX_HEAD
    b.NAME, b.NUM_CONV, b.CONV_DIM, b.NUM_FC, b.FC_DIM, b.NORM = box, NUM_CONV, CONV_DIM, 1, FC_DIM, norm
    m = cfg.MODEL.ROI_MASK_HEAD
    m.NAME, m.NUM_CONV, m.CONV_DIM, m.NORM = mask, NUM_CONV, CONV_DIM, norm
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.D2NORM.SHUFFLE_HEAD.ENABLED = enabled
    cfg.D2NORM.SHUFFLE_HEAD.SEED = seed
    cfg.D2NORM.BN.EPS, cfg.D2NORM.BN.MOMENTUM = EPS, MOMENTUM
    return cfg


def build(cfg, kind):
    shape = ShapeSpec(channels=C_IN, height=RES, width=RES)
    with norm_options(cfg):
        return build_box_head(cfg, shape) if kind == "box" else build_mask_head(cfg, shape)


def head_out(head, kind, x):
    return head(x) if kind == "box" else head.layers(x)


def randomized(head, seed):
    """Non-trivial γ, β and EMA buffers (so a wrong statistic or parameter shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in head.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("norm.bias") or name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return head


# ---- independent float64 reference of the heads (written from the layer definitions) -------------------------


def ref_bn(x, w, b, mode, rm=None, rv=None):
    """BN: batch mode μ, σ² (biased) over (N, H, W) of x; pop mode the given EMA. Returns y and, in batch mode,
    (μ, unbiased σ²) for the EMA update."""
    if mode == "batch":
        mu, var, m = batch_moments([x])
        stats = (mu.detach(), (var * m / max(m - 1, 1)).detach()) if m > 0 else None
    else:
        mu, var, stats = rm, rv, None
    return bn_normalize(x, mu, var, EPS, w, b), stats


def ref_head(p, kind, x, mode="batch"):
    """The stock head's math: [conv3x3 → BN → ReLU] × NUM_CONV, then fc → ReLU (box) or deconv 2x2/2 → ReLU →
    1x1 predictor (mask). ``p``: the head's state dict (float64 tensors). Returns (y, per-BN stats)."""
    prefix = "conv" if kind == "box" else "mask_fcn"
    stats = []
    for k in range(1, NUM_CONV + 1):
        x = F.conv2d(x, p[f"{prefix}{k}.weight"], padding=1)
        x, st = ref_bn(x, p[f"{prefix}{k}.norm.weight"], p[f"{prefix}{k}.norm.bias"], mode,
                       p[f"{prefix}{k}.norm.running_mean"], p[f"{prefix}{k}.norm.running_var"])
        stats.append(st)
        x = torch.clamp(x, min=0)
    if kind == "box":
        x = torch.clamp(x.flatten(1) @ p["fc1.weight"].t() + p["fc1.bias"], min=0)
    else:
        x = torch.clamp(F.conv_transpose2d(x, p["deconv.weight"], p["deconv.bias"], stride=2), min=0)
        x = F.conv2d(x, p["predictor.weight"], p["predictor.bias"])
    return x, stats


def bn_prefixes(kind):
    prefix = "conv" if kind == "box" else "mask_fcn"
    return [f"{prefix}{k}.norm" for k in range(1, NUM_CONV + 1)]


def ema(p, kind, stats):
    """Expected running_mean/var after one training step whose BN batch statistics are ``stats``."""
    out = {}
    for pre, st in zip(bn_prefixes(kind), stats):
        rm, rv = p[pre + ".running_mean"], p[pre + ".running_var"]
        if st is not None:  # an empty batch leaves the EMA unchanged
            rm, rv = (1 - MOMENTUM) * rm + MOMENTUM * st[0], (1 - MOMENTUM) * rv + MOMENTUM * st[1]
        out[pre + ".running_mean"], out[pre + ".running_var"] = rm, rv
    return out


def ref_grouped(state, kind, xs, dys, groups):
    """Float64 reference of one training step in which the BN layers normalize ``groups`` (a list of index
    tensors into the concatenation of ``xs``; every row in exactly one group) instead of each rank's own RoIs.

    Returns per-rank outputs and input gradients of L = Σ_r <y_r, dy_r>, the parameter gradients of L, and for each
    group the EMA the BN buffers of the rank that normalized it end with."""
    p = {k: v.detach().double().clone() for k, v in state.items()}
    params = {k: v.requires_grad_() for k, v in p.items() if "running" not in k and "num_batches" not in k}
    xs = [x.detach().double().clone().requires_grad_() for x in xs]
    x_all = torch.cat(xs)
    out_rows = [None] * x_all.shape[0]
    group_ema = []
    for idx in groups:
        y, stats = ref_head(p, kind, x_all[idx], "batch")
        for j, i in enumerate(idx.tolist()):
            out_rows[i] = y[j]
        group_ema.append(ema(p, kind, stats))
    sizes = [x.shape[0] for x in xs]
    y_shape = ref_head(p, kind, x_all[:0], "pop")[0].shape[1:]
    ys, start = [], 0
    for n in sizes:
        rows = out_rows[start : start + n]
        ys.append(torch.stack(rows) if rows else torch.zeros((0,) + tuple(y_shape), dtype=torch.float64))
        start += n
    loss = sum(((y * dy.double()).sum() for y, dy in zip(ys, dys)), torch.zeros((), dtype=torch.float64))
    # Graph-less when every rank is empty; the stock head then has zero gradients.
    if loss.requires_grad:
        loss.backward()
    gx = [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]
    gp = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in params.items()}
    return dict(ys=[y.detach() for y in ys], gx=gx, gp=gp, ema=group_ema)


def seed_drawn_from(gen):
    """The documented seed rule: an int64 in [0, 2**62) drawn from rank 0's generator."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def permutation_of_seed(n, seed):
    """The documented permutation rule: torch.randperm(n) of a CPU generator seeded with the shared seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def shuffle_groups(perm, world):
    """Rank r normalizes the r-th contiguous block of the permuted order; blocks as equal as possible, the
    remainder to the first ranks (the documented split, written independently of balanced_shares)."""
    total = perm.numel()
    out, start = [], 0
    for r in range(world):
        n = total // world + (1 if r < total % world else 0)
        out.append(perm[start : start + n])
        start += n
    return out


def rank_groups(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(torch.arange(start, start + n))
        start += n
    return out


def make_inputs(sizes, kind, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, C_IN, RES, RES, generator=g, dtype=torch.float64) * 3 + 2 for n in sizes]
    y_shape = (FC_DIM,) if kind == "box" else (NUM_CLASSES, 2 * RES, 2 * RES)
    dys = [torch.randn((n,) + y_shape, generator=g, dtype=torch.float64) for n in sizes]
    return xs, dys


# ---- single process: the plain head ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_single_process_is_exactly_the_stock_head(kind):
    head = randomized(build(make_cfg(), kind), 0)
    stock = build(make_cfg(box="FastRCNNConvFCHead", mask="MaskRCNNConvUpsampleHead"), kind)
    assert type(stock) in (FastRCNNConvFCHead, MaskRCNNConvUpsampleHead)
    assert list(head.state_dict()) == list(stock.state_dict())  # checkpoints are interchangeable
    stock.load_state_dict(head.state_dict())
    xs, dys = make_inputs([7], kind, 1)
    x1 = xs[0].float().requires_grad_()
    x2 = xs[0].float().requires_grad_()
    for mode in ("train", "eval"):
        head.train(mode == "train")
        stock.train(mode == "train")
        y1, y2 = head_out(head, kind, x1), head_out(stock, kind, x2)
        assert torch.equal(y1, y2)
        (y1 * dys[0].float()).sum().backward()
        (y2 * dys[0].float()).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        for (n1, p1), (n2, p2) in zip(head.named_parameters(), stock.named_parameters()):
            assert n1 == n2 and torch.equal(p1.grad, p2.grad), n1
        for (n1, b1), (n2, b2) in zip(head.named_buffers(), stock.named_buffers()):
            assert torch.equal(b1, b2), n1
    # and the math is the head's: float64 reference with batch statistics, EMA of the batch statistics
    head64 = randomized(build(make_cfg(), kind), 0).double().train()
    p0 = {k: v.clone() for k, v in head64.state_dict().items()}
    y = head_out(head64, kind, xs[0])
    y_ref, stats = ref_head(p0, kind, xs[0], "batch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k, v in ema(p0, kind, stats).items():
        torch.testing.assert_close(head64.state_dict()[k], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_single_process_empty_input(kind):
    head = randomized(build(make_cfg(), kind), 0).train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.zeros(0, C_IN, RES, RES, requires_grad=True)
    y = head_out(head, kind, x)
    assert y.shape[0] == 0
    y.sum().backward()
    for k, v in head.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(v, before[k]), k  # no NaN, EMA untouched


def test_cfg_options_and_validation():
    a = build(make_cfg(enabled=True, seed=-1), "box")
    b = build(make_cfg(enabled=False, seed=7), "box")
    m = build(make_cfg(enabled=False, seed=7), "mask")
    assert isinstance(a, ShuffledConvFCHead) and isinstance(m, ShuffledMaskRCNNConvUpsampleHead)
    assert (a.shuffle, a.seed, a._generator) == (True, -1, None)
    assert (b.shuffle, b.seed) == (False, 7) and m.seed == 8  # box SEED, mask SEED + 1
    assert torch.equal(torch.randperm(9, generator=b._generator),
                       torch.randperm(9, generator=torch.Generator().manual_seed(7)))
    for key, bad in (("ENABLED", "yes"), ("ENABLED", 1), ("SEED", -2), ("SEED", 1.5)):
        cfg = make_cfg()
        cfg.D2NORM.SHUFFLE_HEAD[key] = bad
        with pytest.raises(ValueError, match=f"SHUFFLE_HEAD.{key}.*{bad!r}"):
            build(cfg, "box")


def test_no_norm_warns(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="d2norm.modeling.roi_heads.shuffle_heads"):
        build(make_cfg(norm=""), "box")
    assert "no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="d2norm.modeling.roi_heads.shuffle_heads"):
        build(make_cfg(norm="BN"), "box")
    assert "no effect" not in caplog.text


def test_balanced_shares():
    assert balanced_shares(8, 2) == [4, 4]
    assert balanced_shares(7, 3) == [3, 2, 2]
    assert balanced_shares(1, 2) == [1, 0]
    assert balanced_shares(0, 2) == [0, 0]


def test_balanced_shares_vs_upstream_split():
    """Documented difference (README): upstream's ``batch_shuffle`` (projects/Rethinking-BatchNorm) gives rank r
    the r-th chunk of ceil(T/W) shuffled RoIs, so the last ranks may normalize much smaller batches or none;
    ours differ by at most one. Equal whenever W divides T."""
    def upstream(total, world):  # torch.split(idx_shuffle, ceil(T/W)), missing chunks empty
        size = -(-total // world)
        return [max(0, min(size, total - r * size)) for r in range(world)] if total else [0] * world

    assert upstream(10, 4) == [3, 3, 3, 1] and balanced_shares(10, 4) == [3, 3, 2, 2]
    assert upstream(5, 4) == [2, 2, 1, 0] and balanced_shares(5, 4) == [2, 1, 1, 1]
    for total in range(0, 40):
        for world in (1, 2, 3, 4, 8):
            ours = balanced_shares(total, world)
            assert sum(ours) == total and max(ours) - min(ours) <= 1
            if total % world == 0:
                assert ours == upstream(total, world)


# ---- 2 gloo processes ---------------------------------------------------------------------------------------

# (sizes per rank, whether rank r's input requires grad). (0, 6): rank 0 empty and its features carry no graph
# (a pooler without boxes); (1, 0): rank 1's share is empty; (0, 0): nothing at all.
CASES = [((5, 3), (True, True)), ((0, 6), (False, True)), ((1, 0), (True, True)), ((0, 0), (True, True))]
SEED = 100


def _worker_shuffle(rank, world, kind, state, cases):
    torch.manual_seed(1000 + rank)  # ranks' global RNGs differ (as in detectron2), irrelevant with a SEED
    gen = torch.Generator().manual_seed(rank)
    out = {"perm": [exchange_rows_and_seed(torch.zeros(rank, 2), gen) for _ in range(2)]}
    res = []
    for ci, (sizes, needs_grad) in enumerate(cases):
        xs, dys = make_inputs(sizes, kind, ci)
        # every rank has a *different* seed: the permutation must still be rank 0's
        head = build(make_cfg(seed=SEED + rank), kind).double().train()
        head.load_state_dict(state)
        steps = []
        for step in range(2):  # two iterations: the second uses the generator's next permutation
            head.zero_grad()
            x = xs[rank].clone().requires_grad_(needs_grad[rank])
            y = head_out(head, kind, x)
            (y * dys[rank]).sum().backward()
            steps.append(dict(
                y=y.detach(), gx=x.grad if x.grad is not None else None,
                gp={k: v.grad.clone() for k, v in head.named_parameters()},
                buffers={k: v.clone() for k, v in head.state_dict().items() if "running" in k},
            ))
            head.load_state_dict(state)  # both steps start from the same state (EMA compared per step)
        res.append(steps)
    out["cases"] = res
    # ENABLED False: per-rank BN; eval: population statistics. Neither communicates: rank 0 runs one more
    # forward than rank 1 (a collective would then time out).
    xs, dys = make_inputs((5, 3), kind, 0)
    off = build(make_cfg(enabled=False), kind).double().train()
    off.load_state_dict(state)
    ev = build(make_cfg(), kind).double().eval()
    ev.load_state_dict(state)
    out["off"] = head_out(off, kind, xs[rank]).detach()
    for _ in range(2 if rank == 0 else 1):
        out["eval"] = head_out(ev, kind, xs[rank]).detach()
    out["eval_buffers_same"] = all(torch.equal(v, state[k]) for k, v in ev.state_dict().items())
    return out


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_two_ranks_match_shuffled_reference(kind):
    state = {k: v.double() if v.is_floating_point() else v
             for k, v in randomized(build(make_cfg(), kind), 3).state_dict().items()}
    results = run_distributed(_worker_shuffle, world_size=2, args=(kind, state, CASES))
    # the seed is identical on all ranks although their generators differ (rank 0's is used)
    for i in range(2):
        assert results[0]["perm"][i] == results[1]["perm"][i]
    assert results[0]["perm"][0] == ([0, 1], seed_drawn_from(torch.Generator().manual_seed(0)))

    param_keys = [k for k, v in state.items() if v.is_floating_point() and "running" not in k]
    for ci, (sizes, _) in enumerate(CASES):
        xs, dys = make_inputs(sizes, kind, ci)
        gen = torch.Generator().manual_seed(SEED + (0 if kind == "box" else 1))  # rank 0's generator
        for step in range(2):
            perm = permutation_of_seed(sum(sizes), seed_drawn_from(gen))  # drawn even when no rank has rows
            groups = shuffle_groups(perm, 2)
            ref = ref_grouped(state, kind, xs, dys, groups)
            for r in range(2):
                got = results[r]["cases"][ci][step]
                assert got["y"].shape == ref["ys"][r].shape
                torch.testing.assert_close(got["y"], ref["ys"][r], rtol=1e-9, atol=1e-9)
                if got["gx"] is not None:
                    torch.testing.assert_close(got["gx"], ref["gx"][r], rtol=1e-9, atol=1e-9)
                # rank r's BN normalized group r: its EMA is that group's
                for k, v in ref["ema"][r].items():
                    torch.testing.assert_close(got["buffers"][k], v, rtol=1e-10, atol=1e-12)
            # parameter gradients: data parallelism sums the ranks' gradients
            for k in param_keys:
                summed = results[0]["cases"][ci][step]["gp"][k] + results[1]["cases"][ci][step]["gp"][k]
                torch.testing.assert_close(summed, ref["gp"][k], rtol=1e-9, atol=1e-9)
            if sizes == (5, 3):
                # the test can fail: grouping by rank (no shuffle) gives a different output
                plain = ref_grouped(state, kind, xs, dys, rank_groups(sizes))
                assert not torch.allclose(results[0]["cases"][ci][step]["y"], plain["ys"][0], atol=1e-6)
        # the second iteration drew a new permutation
        if sum(sizes) > 2:
            both = [torch.cat([results[r]["cases"][ci][step]["y"] for r in range(2)]) for step in range(2)]
            assert not torch.allclose(both[0], both[1], atol=1e-6)

    xs, dys = make_inputs((5, 3), kind, 0)
    plain = ref_grouped(state, kind, xs, dys, rank_groups((5, 3)))
    p = {k: v.double() for k, v in state.items()}
    for r in range(2):
        torch.testing.assert_close(results[r]["off"], plain["ys"][r], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(results[r]["eval"], ref_head(p, kind, xs[r], "pop")[0], rtol=1e-9, atol=1e-9)
        assert results[r]["eval_buffers_same"]


def _worker_bytes(rank, world, state, sizes):
    """Bytes each collective delivers to this rank in one shuffled training step of the box head."""
    import torch.distributed as dist

    seen = []

    def counting(name, fn, out_arg):
        def wrapped(*args, **kwargs):
            res = fn(*args, **kwargs)
            outs = args[out_arg] if out_arg is not None else args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            seen.append((name, sum(t.numel() * t.element_size() for t in outs)))
            return res
        return wrapped

    for name in ("all_to_all_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast"):
        setattr(dist, name, counting(name, getattr(dist, name), 0))
    head = build(make_cfg(seed=SEED), "box").double().train()
    head.load_state_dict(state)
    xs, dys = make_inputs(sizes, "box", 0)
    x = xs[rank].clone().requires_grad_()
    (head(x) * dys[rank]).sum().backward()
    return seen


def test_shuffle_moves_each_row_only_to_the_rank_that_normalizes_it():
    """The rows cross the network once each way (all-to-all), not to every rank (an all-gather: world x the bytes,
    which is what this test fails on); the only other message is the fixed-size header of row counts + seed."""
    sizes = (7, 2)
    state = {k: v.double() if v.is_floating_point() else v
             for k, v in randomized(build(make_cfg(), "box"), 3).state_dict().items()}
    results = run_distributed(_worker_bytes, world_size=2, args=(state, sizes))
    shares = balanced_shares(sum(sizes), 2)
    row_in, row_out = C_IN * RES * RES * 8, FC_DIM * 8  # float64 rows of the pooled features and the head output
    for r in range(2):
        a2a = [b for name, b in results[r] if name == "all_to_all_single"]
        # forward: my share of input rows, then my own rows' outputs; backward: the share's output gradients,
        # then my own rows' input gradients
        assert a2a == [shares[r] * row_in, sizes[r] * row_out, shares[r] * row_out, sizes[r] * row_in]
        others = [(name, b) for name, b in results[r] if name != "all_to_all_single"]
        assert len(others) == 1 and others[0][0] == "all_gather_into_tensor" and others[0][1] <= 2 * 16 * 8


# ---- configs (rethinking Table 3 / Table 6 rows) ---------------------------------------------------------

TABLE6 = {  # row: (box head, mask head, norm, images per GPU in the header comment)
    1: ("FastRCNNConvFCHead", "MaskRCNNConvUpsampleHead", "BN"),
    2: ("FastRCNNConvFCHead", "MaskRCNNConvUpsampleHead", "BN"),
    3: ("FastRCNNConvFCHead", "MaskRCNNConvUpsampleHead", "BatchStatsBN"),
    4: ("ShuffledConvFCHead", "ShuffledMaskRCNNConvUpsampleHead", "BN"),
    5: ("ShuffledConvFCHead", "ShuffledMaskRCNNConvUpsampleHead", "BN"),
    6: ("FastRCNNConvFCHead", "MaskRCNNConvUpsampleHead", "AnySyncBN"),
    7: ("FastRCNNConvFCHead", "MaskRCNNConvUpsampleHead", ""),
}


@pytest.mark.parametrize("row", sorted(TABLE6))
def test_table6_configs(row):
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(root, "rethinking", f"mask_rcnn_R50_FPN_table6_row{row}.yaml"))
    box, mask, norm = TABLE6[row]
    assert (cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_MASK_HEAD.NAME) == (box, mask)
    assert cfg.MODEL.ROI_BOX_HEAD.NORM == cfg.MODEL.ROI_MASK_HEAD.NORM == norm
    # 4conv1fc box head (§4.2, following the GN paper), 4-conv mask head, FrozenBN backbone, 3x, 16 images
    b = cfg.MODEL.ROI_BOX_HEAD
    assert (b.NUM_CONV, b.NUM_FC, cfg.MODEL.ROI_MASK_HEAD.NUM_CONV) == (4, 1, 4)
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.MASK_ON
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.MAX_ITER == 270000
    if row in (4, 5):
        assert cfg.D2NORM.SHUFFLE_HEAD.ENABLED


# ---- inside a real Mask R-CNN: a rank whose image has no object (0 foreground RoIs for the mask head) --------

TINY_MODEL = [
    "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.CONV_DIM", "8", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
]


def tiny_rcnn_step(cfg_file, rank):
    """One training forward/backward of the CPU config's Mask R-CNN (same init on every rank) on a 64 px image;
    rank 0's image has four objects, rank 1's none. Returns losses and per-parameter gradient norms."""
    import os

    from detectron2.structures import BitMasks, Boxes, Instances

    from d2norm.layers import build_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(root, "configs", "cpu", cfg_file))
    cfg.merge_from_list(TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(rank)
    inst = Instances((64, 64))
    if rank == 0:
        # 4 objects: at least their 4 ground-truth boxes (added to the proposals) are foreground RoIs
        boxes = torch.tensor([[10, 8, 44, 40], [2, 2, 20, 18], [30, 34, 62, 60], [40, 4, 60, 28]])
        mask = torch.zeros(4, 64, 64, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            mask[i, y0:y1, x0:x1] = True
        inst.gt_boxes = Boxes(boxes.float())
        inst.gt_classes = torch.tensor([1, 0, 2, 1])
        inst.gt_masks = BitMasks(mask)
    else:
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))
    batch = [{"image": torch.rand(3, 64, 64, generator=g) * 255, "instances": inst, "height": 64, "width": 64}]
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(batch)
        sum(losses.values()).backward()
    grads = {n: (p.grad.norm().item() if p.grad is not None else None) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "roi_heads" in n and "running" in n}
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": grads, "buffers": buffers}


def _worker_rcnn(rank, world, cfg_file):
    return tiny_rcnn_step(cfg_file, rank)


def test_two_ranks_mask_rcnn_with_an_empty_rank():
    results = run_distributed(_worker_rcnn, world_size=2, args=("mask_rcnn_R18_FPN_table6_shuffle.yaml",))
    for r in range(2):
        assert all(torch.isfinite(torch.tensor(v)) for v in results[r]["losses"].values()), results[r]["losses"]
    # rank 1 has no foreground RoI, yet its mask head normalized (and got gradients from) half of rank 0's
    # RoIs; a per-rank head would leave its mask convs without gradient.
    mask_grads = {n: v for n, v in results[1]["grads"].items() if "mask_head.mask_fcn" in n}
    assert mask_grads and all(v is not None and v > 0 for v in mask_grads.values()), mask_grads
    for r in range(2):
        for n, b in results[r]["buffers"].items():
            assert torch.isfinite(b).all(), n
