"""d2norm.utils.comm on 2 real gloo processes (uneven and empty ranks), and the test helper itself."""
import time

import pytest
import torch

import d2norm  # noqa: F401
from d2norm.utils import comm as D
from dist_utils import DistributedTestError, run_distributed

# (rank 0 rows, rank 1 rows): uneven, one empty rank, both empty
GATHER_CASES = [(3, 5), (0, 4), (0, 0)]
TRAILING = (2, 3)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, gs = {}, {}
    for sizes in GATHER_CASES:
        xs[sizes] = [torch.randn((n,) + TRAILING, generator=g, dtype=torch.float64) * 3 + 2 for n in sizes]
        total = sum(sizes)
        # a different upstream gradient on each rank: each rank's loss uses the whole gathered tensor
        gs[sizes] = [torch.randn((total,) + TRAILING, generator=g, dtype=torch.float64) for _ in sizes]
    v = [torch.randn(4, generator=g, dtype=torch.float64) * 3 + 2 for _ in range(2)]
    h = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2)]
    return xs, gs, v, h


def _collectives_worker(rank, world_size, xs, gs, v, h):
    out = {}
    # all_gather_variable: forward and backward with uneven and empty ranks
    for sizes in GATHER_CASES:
        x = xs[sizes][rank].clone().requires_grad_()
        gathered, got_sizes = D.all_gather_variable(x, return_sizes=True)
        (gathered * gs[sizes][rank]).sum().backward()
        out[("gather", sizes)] = (gathered.detach(), got_sizes, x.grad.clone(), gathered.requires_grad)
    # all_reduce_sum: values, gradients (incl. a stride-0 expanded upstream grad), input untouched
    vr = v[rank].clone().requires_grad_()
    before = vr.detach().clone()
    y = D.all_reduce_sum(vr)
    (y * h[rank]).sum().backward()
    grad_h = vr.grad.clone()
    vr.grad = None
    D.all_reduce_sum(vr).sum().backward()  # grad_output is an expanded view of a scalar
    out["reduce"] = (y.detach(), grad_h, vr.grad.clone(), torch.equal(vr.detach(), before))
    # shared_permutation: different seeds / generators on each rank, yet one permutation
    out["perm_seed"] = D.shared_permutation(11, 100 + rank)
    out["perm_gen"] = D.shared_permutation(7, torch.Generator().manual_seed(5 + rank), device="cpu")
    out["perm_none"] = D.shared_permutation(6)
    out["perm_empty"] = D.shared_permutation(0, 3)
    # a trailing-dim mismatch is a ValueError on every rank, not a hang
    try:
        D.all_gather_variable(torch.zeros(2, 3 + rank))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # subgroups
    g1 = D.sync_subgroup(1)
    out["sub1"] = (D.group_world_size(g1), D.all_reduce_sum(torch.tensor([float(rank + 1)]), g1))
    out["sub2"] = D.sync_subgroup(2) is None and D.sync_subgroup(0) is None
    try:
        D.sync_subgroup(3)
        out["sub3"] = None
    except ValueError as e:
        out["sub3"] = str(e)
    return out


def test_collectives_two_gloo_ranks():
    xs, gs, v, h = _data()
    res = run_distributed(_collectives_worker, world_size=2, args=(xs, gs, v, h))
    for sizes in GATHER_CASES:
        expect = torch.cat(xs[sizes])
        gsum = gs[sizes][0] + gs[sizes][1]
        starts = [0, sizes[0]]
        for r in range(2):
            gathered, got_sizes, grad, req = res[r][("gather", sizes)]
            assert got_sizes == list(sizes)
            assert gathered.shape == (sum(sizes),) + TRAILING
            assert torch.equal(gathered, expect)
            assert grad.shape == (sizes[r],) + TRAILING
            torch.testing.assert_close(grad, gsum[starts[r] : starts[r] + sizes[r]], rtol=0, atol=1e-12)
            assert req  # the gathered tensor stays in the graph, also when empty
    for r in range(2):
        y, grad_h, grad_ones, untouched = res[r]["reduce"]
        torch.testing.assert_close(y, v[0] + v[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_h, h[0] + h[1], rtol=0, atol=1e-12)
        assert torch.equal(grad_ones, torch.full((4,), 2.0, dtype=torch.float64))
        assert untouched
    # identical on both ranks, and it is rank 0's permutation
    assert torch.equal(res[0]["perm_seed"], res[1]["perm_seed"])
    assert torch.equal(res[0]["perm_seed"], torch.randperm(11, generator=torch.Generator().manual_seed(100)))
    assert torch.equal(res[0]["perm_gen"], res[1]["perm_gen"])
    assert torch.equal(res[0]["perm_gen"], torch.randperm(7, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(res[0]["perm_none"], res[1]["perm_none"])
    assert sorted(res[0]["perm_none"].tolist()) == list(range(6))
    assert res[0]["perm_empty"].numel() == 0 and res[1]["perm_empty"].numel() == 0
    for r in range(2):
        assert res[r]["mismatch"] is not None and "(2, 3)" in res[r]["mismatch"] and "(2, 4)" in res[r]["mismatch"]
        size1, reduced = res[r]["sub1"]
        assert size1 == 1 and reduced.item() == r + 1  # a group of one rank: no cross-rank sum
        assert res[r]["sub2"] is True
        assert res[r]["sub3"] is not None and "3" in res[r]["sub3"] and "world size 2" in res[r]["sub3"]


def test_single_process_fallbacks():
    x = torch.randn(3, 2) * 3 + 2
    assert D.all_gather_variable(x) is x
    out, sizes = D.all_gather_variable(x, return_sizes=True)
    assert out is x and sizes == [3]
    assert D.all_reduce_sum(x) is x
    p = D.shared_permutation(9, 4)
    assert torch.equal(p, torch.randperm(9, generator=torch.Generator().manual_seed(4)))
    assert D.sync_subgroup(0) is None and D.sync_subgroup(1) is None
    with pytest.raises(ValueError, match="-1"):
        D.sync_subgroup(-1)
    with pytest.raises(ValueError, match="-2"):
        D.shared_permutation(-2, 0)
    with pytest.raises(ValueError, match="str"):
        D.shared_permutation(3, "seed")


def test_all_reduce_gradcheck_single_process():
    # Single process: the functions are identities, so gradcheck checks the wrappers keep the graph intact.
    x = (torch.randn(4, dtype=torch.float64) * 3 + 2).requires_grad_()
    assert torch.autograd.gradcheck(D.all_reduce_sum, (x,))
    assert torch.autograd.gradcheck(D.all_gather_variable, (x.view(2, 2),))


# ---- the helper itself ---------------------------------------------------------------------------------


def _raising_worker(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    return rank


def _sleeping_worker(rank, world_size):
    time.sleep(1000)


def _comm_worker(rank, world_size):
    from detectron2.utils import comm

    return (comm.get_rank(), comm.get_world_size(), comm.get_local_rank(), comm.get_local_size(),
            torch.get_num_threads())


def test_run_distributed_results_and_comm():
    res = run_distributed(_comm_worker, world_size=2)
    assert res == [(0, 2, 0, 2, 1), (1, 2, 1, 2, 1)]


def test_run_distributed_propagates_exceptions():
    with pytest.raises(DistributedTestError, match="boom from rank 1"):
        run_distributed(_raising_worker, world_size=2)


def test_run_distributed_times_out():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="did not finish in 3s"):
        run_distributed(_sleeping_worker, world_size=2, timeout=3)
    assert time.monotonic() - start < 30
