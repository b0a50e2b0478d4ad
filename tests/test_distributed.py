"""d2norm.utils.comm on 2 real gloo processes (uneven and empty ranks), and the test helper itself."""
import time

import pytest
import torch

import d2norm  # noqa: F401
from d2norm.utils import comm as D
from dist_utils import DistributedTestError, run_distributed

# rows per rank (the same on both ranks: all_gather_rows gathers equal shapes), 0 included
GATHER_CASES = [(3, 3), (0, 0)]
TRAILING = (2, 3)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, gs = {}, {}
    for sizes in GATHER_CASES:
        xs[sizes] = [torch.randn((n,) + TRAILING, generator=g, dtype=torch.float64) * 3 + 2 for n in sizes]
        # a different upstream gradient on each rank: each rank's loss uses the whole gathered tensor
        gs[sizes] = [torch.randn((2, sizes[0]) + TRAILING, generator=g, dtype=torch.float64) for _ in sizes]
    v = [torch.randn(4, generator=g, dtype=torch.float64) * 3 + 2 for _ in range(2)]
    return xs, gs, v


# case: (per rank the rows it sends to rank 0 and rank 1, rows per rank)
A2A_CASES = {"uneven": ([[1, 2], [3, 1]], (3, 4)), "empty": ([[0, 0], [2, 0]], (0, 2))}


def _a2a_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, gs = {}, {}
    for case, (sends, n) in A2A_CASES.items():
        xs[case] = [torch.randn(k, 2, 3, generator=g, dtype=torch.float64) for k in n]
        recv = [sum(sends[s][r] for s in range(2)) for r in range(2)]
        gs[case] = [torch.randn(k, 2, 3, generator=g, dtype=torch.float64) for k in recv]
    return xs, gs


def _a2a_reference(xs, sends):
    """Rank r's received rows: from each rank s in rank order, s's block of rows addressed to r (rows are
    addressed in order: rank s's first sends[s][0] rows go to rank 0, the next sends[s][1] to rank 1)."""
    blocks = [[xs[s][sum(sends[s][:r]) : sum(sends[s][: r + 1])] for r in range(2)] for s in range(2)]
    return [torch.cat([blocks[s][r] for s in range(2)]) for r in range(2)], blocks


def _collectives_worker(rank, world_size, xs, gs, v, a2a, a2a_grads):
    out = {}
    # all_gather_rows: forward and backward (each rank's loss uses every rank's row)
    for sizes in GATHER_CASES:
        x = xs[sizes][rank].clone().requires_grad_()
        gathered = D.all_gather_rows(x)
        (gathered * gs[sizes][rank]).sum().backward()
        out[("gather", sizes)] = (gathered.detach(), x.grad.clone())
    vr = v[rank].clone().requires_grad_()
    D.all_gather_rows(vr).sum().backward()  # grad_output is an expanded view of a scalar: never reduced in place
    grad_ones = vr.grad.clone()
    # all_reduce_sum_detached: values, input untouched
    before = vr.detach().clone()
    y = D.all_reduce_sum_detached(vr)
    out["reduce"] = (y, grad_ones, torch.equal(vr.detach(), before), y.requires_grad)
    # exchange_rows_and_seed: every rank's row count and rank 0's seed, although the generators differ
    out["seed_gen"] = D.exchange_rows_and_seed(torch.zeros(2 + rank, 3), torch.Generator().manual_seed(5 + rank))
    out["seed_none"] = D.exchange_rows_and_seed(torch.zeros(0, 3, dtype=torch.float64))
    # all_to_all_rows: uneven counts, a rank that sends nothing, a rank that receives nothing; backward
    for case, (sends, n) in A2A_CASES.items():
        x = a2a[case][rank].clone().requires_grad_()
        recv = [sends[s][rank] for s in range(world_size)]
        y = D.all_to_all_rows(x, sends[rank], recv)
        (y * a2a_grads[case][rank]).sum().backward()
        out[("a2a", case)] = (y.detach(), x.grad.clone())
    half = a2a["uneven"][rank].to(torch.bfloat16)  # moved as bytes: a dtype gloo cannot all-to-all directly
    out["a2a_bf16"] = D.all_to_all_rows(half, A2A_CASES["uneven"][0][rank],
                                        [A2A_CASES["uneven"][0][s][rank] for s in range(world_size)])
    try:
        D.all_to_all_rows(torch.zeros(2, 3), [1, 0], [1, 1])
        out["a2a_bad"] = None
    except ValueError as e:
        out["a2a_bad"] = str(e)
    # a trailing-dim mismatch is a ValueError on every rank, not a hang
    try:
        D.exchange_rows_and_seed(torch.zeros(2, 3 + rank))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # subgroups
    g1 = D.sync_subgroup(1)
    out["sub1"] = (D.group_world_size(g1), D.all_reduce_sum_detached(torch.tensor([float(rank + 1)]), g1))
    out["sub2"] = D.sync_subgroup(2) is None and D.sync_subgroup(0) is None
    try:
        D.sync_subgroup(3)
        out["sub3"] = None
    except ValueError as e:
        out["sub3"] = str(e)
    return out


def test_collectives_two_gloo_ranks():
    xs, gs, v = _data()
    a2a, a2a_grads = _a2a_data()
    res = run_distributed(_collectives_worker, world_size=2, args=(xs, gs, v, a2a, a2a_grads))
    for sizes in GATHER_CASES:
        expect = torch.stack(xs[sizes])
        gsum = gs[sizes][0] + gs[sizes][1]  # each rank's loss uses both rows: the gradients add up
        for r in range(2):
            gathered, grad = res[r][("gather", sizes)]
            assert torch.equal(gathered, expect)
            torch.testing.assert_close(grad, gsum[r], rtol=0, atol=1e-12)
    for r in range(2):
        y, grad_ones, untouched, y_grad = res[r]["reduce"]
        torch.testing.assert_close(y, v[0] + v[1], rtol=0, atol=1e-12)
        assert torch.equal(grad_ones, torch.full((4,), 2.0, dtype=torch.float64))
        assert untouched and not y_grad
    # identical on both ranks, and it is rank 0's draw
    rank0_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    assert res[0]["seed_gen"] == res[1]["seed_gen"] == ([2, 3], rank0_seed)
    assert res[0]["seed_none"] == res[1]["seed_none"] and res[0]["seed_none"][0] == [0, 0]
    for case, (sends, n) in A2A_CASES.items():
        want, _ = _a2a_reference(a2a[case], sends)
        # gradient: each rank's upstream gradient rows go back to the rank (and row) they came from
        _, grad_blocks = _a2a_reference(a2a_grads[case], [[sends[s][r] for s in range(2)] for r in range(2)])
        for r in range(2):
            y, gx = res[r][("a2a", case)]
            assert torch.equal(y, want[r])
            assert torch.equal(gx, torch.cat([grad_blocks[s][r] for s in range(2)]))
    want, _ = _a2a_reference(a2a["uneven"], A2A_CASES["uneven"][0])
    for r in range(2):
        assert res[r]["a2a_bf16"].dtype == torch.bfloat16
        assert torch.equal(res[r]["a2a_bf16"], want[r].to(torch.bfloat16))
        assert "[1, 0]" in res[r]["a2a_bad"] and "2 rows" in res[r]["a2a_bad"]
    for r in range(2):
        assert res[r]["mismatch"] is not None and "(2, 3)" in res[r]["mismatch"] and "(2, 4)" in res[r]["mismatch"]
        size1, reduced = res[r]["sub1"]
        assert size1 == 1 and reduced.item() == r + 1  # a group of one rank: no cross-rank sum
        assert res[r]["sub2"] is True
        assert res[r]["sub3"] is not None and "3" in res[r]["sub3"] and "world size 2" in res[r]["sub3"]


def test_single_process_fallbacks():
    x = torch.randn(3, 2) * 3 + 2
    assert torch.equal(D.all_gather_rows(x), x[None])
    assert torch.equal(D.permutation(9, 4), torch.randperm(9, generator=torch.Generator().manual_seed(4)))
    assert D.exchange_rows_and_seed(x, torch.Generator().manual_seed(3)) == (
        [3], D.draw_seed(torch.Generator().manual_seed(3)))
    assert D.all_to_all_rows(x, [3], [3]) is x
    assert D.sync_subgroup(0) is None and D.sync_subgroup(1) is None
    with pytest.raises(ValueError, match="-1"):
        D.sync_subgroup(-1)
    with pytest.raises(ValueError, match="-2"):
        D.permutation(-2, 0)
    with pytest.raises(ValueError, match="str"):
        D.draw_seed("seed")


def test_all_gather_gradcheck_single_process():
    # Single process: t[None], so gradcheck checks the wrapper keeps the graph intact.
    x = (torch.randn(4, dtype=torch.float64) * 3 + 2).requires_grad_()
    assert torch.autograd.gradcheck(D.all_gather_rows, (x.view(2, 2),))


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
