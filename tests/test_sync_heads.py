"""SyncBN heads (rethinking Table 6 "SyncBN") and batch-statistics heads (rethinking §4.2, Table 3 row 2).

Both are detectron2's stock ``FastRCNNConvFCHead`` / ``MaskRCNNConvUpsampleHead`` with ``NORM: "AnySyncBN"`` /
``NORM: "BatchStatsBN"``. SyncBN: on 2 real gloo processes, every rank's output and input gradient, the summed
parameter gradients and both ranks' EMA equal a single float64 process running the head on the concatenated RoIs
(uneven, an empty rank without a graph, all empty). BatchStatsBN: in eval the head normalizes with the current
batch's statistics (float64 reference), never touches its buffers, and trains as BN."""
import pytest
import torch
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

import d2norm.layers.batch_stats_bn  # noqa: F401  (registers "BatchStatsBN")
import d2norm.layers.sync_bn  # noqa: F401  (registers "AnySyncBN")
from d2norm.layers.batch_stats_bn import BatchStatsBatchNorm2d
from d2norm.layers.sync_bn import AnySyncBatchNorm2d
from dist_utils import run_distributed
from test_shuffle_heads import (
    bn_prefixes,
    build,
    ema,
    head_out,
    make_cfg,
    make_inputs,
    randomized,
    ref_grouped,
    ref_head,
)

STOCK = dict(box="FastRCNNConvFCHead", mask="MaskRCNNConvUpsampleHead")

# (sizes per rank, whether rank r's input requires grad); (0, 6): rank 0 has no RoI and no graph.
CASES = [((5, 3), (True, True)), ((0, 6), (False, True)), ((0, 0), (True, True))]


def _state(kind, norm, seed=3):
    head = randomized(build(make_cfg(norm=norm, **STOCK), kind), seed)
    return {k: v.double() if v.is_floating_point() else v for k, v in head.state_dict().items()}


def _worker_sync(rank, world, kind, state, cases):
    res = []
    for ci, (sizes, needs_grad) in enumerate(cases):
        xs, dys = make_inputs(sizes, kind, ci)
        head = build(make_cfg(norm="AnySyncBN", **STOCK), kind).double().train()
        head.load_state_dict(state)
        x = xs[rank].clone().requires_grad_(needs_grad[rank])
        y = head_out(head, kind, x)
        (y * dys[rank]).sum().backward()
        res.append(dict(
            y=y.detach(), gx=x.grad,
            gp={k: v.grad.clone() for k, v in head.named_parameters()},
            buffers={k: v.clone() for k, v in head.state_dict().items() if "running" in k},
        ))
    return res


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_sync_head_two_ranks_equal_single_process_on_concatenation(kind):
    head = build(make_cfg(norm="AnySyncBN", **STOCK), kind)
    assert type(head) in (FastRCNNConvFCHead, MaskRCNNConvUpsampleHead)
    norms = [m for m in head.modules() if isinstance(m, AnySyncBatchNorm2d)]
    assert len(norms) == len(bn_prefixes(kind))

    state = _state(kind, "AnySyncBN")
    results = run_distributed(_worker_sync, world_size=2, args=(kind, state, CASES))
    param_keys = [k for k in results[0][0]["gp"]]
    for ci, (sizes, needs_grad) in enumerate(CASES):
        xs, dys = make_inputs(sizes, kind, ci)
        ref = ref_grouped(state, kind, xs, dys, [torch.arange(sum(sizes))])  # one batch: all ranks' RoIs
        for r in range(2):
            got = results[r][ci]
            assert got["y"].shape == ref["ys"][r].shape
            torch.testing.assert_close(got["y"], ref["ys"][r], rtol=1e-9, atol=1e-9)
            if needs_grad[r]:
                torch.testing.assert_close(got["gx"], ref["gx"][r], rtol=1e-9, atol=1e-9)
            for k, v in ref["ema"][0].items():  # both ranks hold the global batch's EMA
                torch.testing.assert_close(got["buffers"][k], v, rtol=1e-10, atol=1e-12)
        for k in param_keys:
            summed = results[0][ci]["gp"][k] + results[1][ci]["gp"][k]
            torch.testing.assert_close(summed, ref["gp"][k], rtol=1e-9, atol=1e-9)
        if sizes == (5, 3):
            # the test can fail: per-rank BN gives a different output
            per_rank = ref_grouped(state, kind, xs, dys, [torch.arange(5), torch.arange(5, 8)])
            assert not torch.allclose(results[0][ci]["y"], per_rank["ys"][0], atol=1e-6)


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_batch_stats_head_eval_uses_current_batch_statistics(kind):
    head = build(make_cfg(norm="BatchStatsBN", **STOCK), kind)
    assert type(head) in (FastRCNNConvFCHead, MaskRCNNConvUpsampleHead)
    assert sum(isinstance(m, BatchStatsBatchNorm2d) for m in head.modules()) == len(bn_prefixes(kind))
    state = _state(kind, "BatchStatsBN")
    head = head.double()
    head.load_state_dict(state)
    p = dict(state)
    xs, _ = make_inputs([7], kind, 0)
    x = xs[0]

    # eval: μ_B, σ_B of the current input (Table 3 "μ_B, σ_B (1 img)": one image's RoIs), buffers untouched
    head.eval()
    y = head_out(head, kind, x)
    torch.testing.assert_close(y, ref_head(p, kind, x, "batch")[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y, ref_head(p, kind, x, "pop")[0], atol=1e-4)
    # each call normalizes its own batch: the first 3 RoIs alone differ from the same RoIs among 7
    y3 = head_out(head, kind, x[:3])
    torch.testing.assert_close(y3, ref_head(p, kind, x[:3], "batch")[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y3, y[:3], atol=1e-6)
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), k

    # training: plain BN (batch statistics, EMA of the batch statistics)
    head.train()
    y = head_out(head, kind, x)
    y_ref, stats = ref_head(p, kind, x, "batch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k, v in ema(p, kind, stats).items():
        torch.testing.assert_close(head.state_dict()[k], v, rtol=1e-12, atol=1e-12)


def _worker_rcnn(rank, world, cfg_file):
    from test_shuffle_heads import tiny_rcnn_step

    return tiny_rcnn_step(cfg_file, rank)


def test_two_ranks_sync_mask_rcnn_with_an_empty_rank():
    """rank 1's image has no object, so its mask head gets 0 RoIs: it still joins every AnySyncBN collective
    (forward and backward, else this deadlocks), and both ranks end with the same head EMA."""
    results = run_distributed(_worker_rcnn, world_size=2, args=("mask_rcnn_R18_FPN_table6_syncbn.yaml",))
    for r in range(2):
        assert all(torch.isfinite(torch.tensor(v)) for v in results[r]["losses"].values()), results[r]["losses"]
    b0, b1 = results[0]["buffers"], results[1]["buffers"]
    assert any("mask_head" in n for n in b0) and any("box_head" in n for n in b0)
    for n in b0:
        assert torch.isfinite(b0[n]).all(), n
        torch.testing.assert_close(b0[n], b1[n], rtol=1e-5, atol=1e-6)
    # the mask BN EMA moved on rank 1 too (it holds the global statistics of rank 0's RoIs)
    rm = [n for n in b1 if "mask_head.mask_fcn1.norm.running_mean" in n][0]
    assert b1[rm].abs().sum() > 0
    # rank 1's mask convs have no RoI of their own: zero gradient of the conv weights (DDP averages them)
    assert results[1]["grads"]["roi_heads.mask_head.mask_fcn1.weight"] == 0.0
    assert results[0]["grads"]["roi_heads.mask_head.mask_fcn1.weight"] > 0.0
