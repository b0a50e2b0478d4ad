"""Non-finite batch statistics never reach the moving statistics of a d2norm layer.

One NaN/Inf element in a training batch would leave that channel's EMA non-finite for good (NaN·(1 − m) stays
NaN). Each layer skips such an update as a whole and counts it. Checked per layer: a bad batch followed by 30
clean ones leaves the layer bit-identical to a twin that saw only the clean ones, and its statistics equal a
float64 reference of the clean steps written from the papers' update rules (torch's EMA convention
r ← (1 − m)·r + m·batch; MABN's χ̂ ← α·χ̂ + (1 − α)·χ_B, mabn text below eq 20).
"""
import copy
import logging

import pytest
import torch

from d2norm.layers import (
    AnySyncBatchNorm2d,
    BatchGroupNorm,
    BatchStatsBatchNorm2d,
    DomainBatchNorm2d,
    EvalNorm2d,
    ExampleWeightedBatchNorm2d,
    GhostBatchNorm2d,
    MABN2d,
)
from d2norm.layers.base import NONFINITE_COUNTER, nonfinite_skip_counts, undo_nonfinite_update_

C, N, H, W = 4, 6, 3, 3
STEPS = 30
MOM = 0.2


def _batches(seed, bad_value):
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(STEPS)]
    bad = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    bad[1, 2, 0, 1] = bad_value  # one element of one channel
    return bad, clean


# ---- float64 references of the clean steps (independent of the layers' code) --------------------------
def ref_bn(clean, momentum=MOM):
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for x in clean:
        v = x.transpose(0, 1).reshape(C, -1)
        rm = (1 - momentum) * rm + momentum * v.mean(1)
        rv = (1 - momentum) * rv + momentum * v.var(1, unbiased=True)
    return {"running_mean": rm, "running_var": rv}


def ref_ghost(clean, size):
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for x in clean:
        parts = [x[i : i + size] for i in range(0, N, size)]  # size divides N here
        cnt = [p.numel() // C for p in parts]
        mean = sum(c * p.transpose(0, 1).reshape(C, -1).mean(1) for c, p in zip(cnt, parts)) / sum(cnt)
        var = sum(c * p.transpose(0, 1).reshape(C, -1).var(1, unbiased=True) for c, p in zip(cnt, parts)) / sum(cnt)
        rm = (1 - MOM) * rm + MOM * mean
        rv = (1 - MOM) * rv + MOM * var
    return {"running_mean": rm, "running_var": rv}


def ref_bgn(clean, groups):
    rm, rsq = torch.zeros(groups, dtype=torch.float64), torch.ones(groups, dtype=torch.float64)
    for x in clean:
        v = x.reshape(N, groups, -1).transpose(0, 1).reshape(groups, -1)  # all values of each channel group
        rm = (1 - MOM) * rm + MOM * v.mean(1)
        rsq = (1 - MOM) * rsq + MOM * (v * v).mean(1)
    return {"running_mean": rm, "running_var": rsq - rm * rm}  # m_{x²} − m_x² (four-things eq 3)


def ref_mabn(clean, alpha, eps):
    chi = torch.ones(C, dtype=torch.float64)
    for x in clean:
        chi_b = ((x * x).mean(dim=(0, 2, 3)) + eps).sqrt()
        chi = alpha * chi + (1 - alpha) * chi_b
    return {"running_chi": chi}


# ---- the layers -------------------------------------------------------------------------------------------
def _domain_fwd(layer, x):
    return layer(x, domain=1)


def _domain_shared_fwd(layer, x):
    return layer.forward_domains([x[:3], x[3:]])[0]


LAYERS = {
    "GhostBN": (lambda: GhostBatchNorm2d(C, ghost_size=3, momentum=MOM), None, lambda c: ref_ghost(c, 3)),
    "BatchStatsBN": (lambda: BatchStatsBatchNorm2d(C, momentum=MOM), None, ref_bn),
    "ExampleWeightedBN": (lambda: ExampleWeightedBatchNorm2d(C, alpha=0.3, momentum=MOM), None, ref_bn),
    "EvalNorm": (lambda: EvalNorm2d(C, mode="online", momentum=MOM), None, ref_bn),
    "BGN": (lambda: BatchGroupNorm(C, num_groups=2, example_group_size=2, momentum=MOM), None,
            lambda c: ref_bgn(c, 2)),
    "MABN": (lambda: MABN2d(C, buffer_size=4, momentum=0.9, warmup_iters=3, eps=1e-5), None,
             lambda c: ref_mabn(c, 0.9, 1e-5)),
    "DomainBN": (lambda: DomainBatchNorm2d(C, num_domains=2, momentum=MOM), _domain_fwd,
                 lambda c: {k: v for k, v in ref_bn(c).items()}),
    "AnySyncBN": (lambda: AnySyncBatchNorm2d(C, momentum=MOM), None, ref_bn),
}


def _step(layer, fwd, x, backward):
    x = x.clone().requires_grad_(backward)
    y = fwd(layer, x) if fwd else layer(x)
    if backward:
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        if isinstance(layer, EvalNorm2d):
            loss = loss + layer.pop_aux_loss()
        loss.backward()


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_batch_then_clean_steps_equal_clean_reference(name, bad_value, caplog):
    make, fwd, ref = LAYERS[name]
    torch.manual_seed(0)
    layer = make().double().train()
    twin = copy.deepcopy(layer)
    bad, clean = _batches(1, bad_value)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        _step(layer, fwd, bad, backward=True)
    assert type(layer).__name__ in caplog.text and "non-finite batch statistics" in caplog.text
    assert int(getattr(layer, NONFINITE_COUNTER)) == 1
    for x in clean:
        _step(layer, fwd, x, backward=True)
        _step(twin, fwd, x, backward=True)
    got, want = _state(layer), _state(twin)
    assert got.keys() == want.keys()
    for k in got:
        assert torch.isfinite(got[k].double()).all(), k
        assert torch.equal(got[k], want[k]), k  # exactly as if the bad batch had not been seen
    reference = ref(clean)
    for k, v in reference.items():
        g = got[k][1] if name == "DomainBN" else got[k]  # domain 1's row
        torch.testing.assert_close(g, v, rtol=1e-10, atol=1e-12)
    if name == "DomainBN":  # domain 0 never saw data
        assert torch.equal(got["running_mean"][0], torch.zeros(C, dtype=torch.float64))
    assert nonfinite_skip_counts(torch.nn.Sequential(layer)) == {"0": 1}
    assert int(getattr(layer, NONFINITE_COUNTER)) == 1  # clean steps are not counted


def test_domain_bn_shared_training_statistics():
    layer = DomainBatchNorm2d(C, num_domains=2, train_stats="shared", pop_stats="shared", momentum=MOM).double()
    twin = copy.deepcopy(layer)
    bad, clean = _batches(2, float("nan"))
    _step(layer, _domain_shared_fwd, bad, backward=True)
    for x in clean:
        _step(layer, _domain_shared_fwd, x, backward=True)
        _step(twin, _domain_shared_fwd, x, backward=True)
    assert int(getattr(layer, NONFINITE_COUNTER)) == 1
    for k, v in _state(twin).items():
        assert torch.equal(layer.state_dict()[k], v), k
    torch.testing.assert_close(layer.running_mean, ref_bn(clean)["running_mean"], rtol=1e-10, atol=1e-12)


def test_mabn_ring_buffers_and_counters_skip_the_bad_step():
    """MABN's whole state (χ² and Ψ rings, χ̂, both counters) keeps the clean steps' values (mabn eq 19/20)."""
    layer = MABN2d(C, buffer_size=4, momentum=0.9, warmup_iters=0).double()
    bad, clean = _batches(3, float("nan"))
    _step(layer, None, clean[0], backward=True)
    before = _state(layer)
    _step(layer, None, bad, backward=True)
    after = _state(layer)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert int(layer.num_batches_tracked) == 1 and int(layer.psi_count) == 1


def test_eval_and_clean_training_are_not_counted():
    layer = GhostBatchNorm2d(C, ghost_size=2).double()
    _, clean = _batches(4, 0.0)
    layer(clean[0])
    layer.eval()
    bad, _ = _batches(5, float("nan"))
    layer(bad)  # eval reads, never writes: nothing to skip
    assert int(getattr(layer, NONFINITE_COUNTER)) == 0
    assert nonfinite_skip_counts(torch.nn.Sequential(layer)) == {}


def test_undo_keeps_values_that_were_already_non_finite():
    """A channel already non-finite before (a bad checkpoint) does not block later updates of the layer."""
    old = torch.tensor([float("nan"), 1.0, 2.0])
    new = torch.tensor([float("nan"), 1.5, 2.5])
    buf = new.clone()
    assert not bool(undo_nonfinite_update_([buf], [old]))
    assert torch.equal(buf[1:], new[1:])
    buf = torch.tensor([float("nan"), float("inf"), 2.5])
    assert bool(undo_nonfinite_update_([buf], [old]))
    assert torch.equal(buf[1:], old[1:])


def test_trainer_hook_names_layers_and_writes_storage_scalar(caplog):
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from d2norm.engine.hooks import NonFiniteStatsHook

    model = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1), GhostBatchNorm2d(C, ghost_size=2)).double()
    hook = NonFiniteStatsHook(model)
    bad, clean = _batches(6, float("nan"))
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.before_train()
        model(clean[0])
        hook.after_step()
        assert "nonfinite_stats/skipped" not in storage.histories()  # nothing skipped: nothing written
        with caplog.at_level(logging.WARNING, logger="d2norm"):
            model(bad)
        assert "GhostBatchNorm2d '1': non-finite batch statistics" in caplog.text
        storage.iter = hook.trainer.iter = 1
        hook.after_step()
        assert storage.histories()["nonfinite_stats/skipped"].latest() == 1


# ---- distributed: every rank takes the same decision --------------------------------------------------------
def _dist_worker(rank, world_size, bad, clean):
    from d2norm.stats import NonFiniteStatsError, recompute_population_stats

    out = {}
    layer = AnySyncBatchNorm2d(C, momentum=MOM).double()
    x = bad if rank == 0 else clean[0]  # the NaN is on rank 0 only; the statistics are global
    layer(x[rank * 3 : rank * 3 + 3])
    out["after_bad"] = _state(layer)
    out["skips"] = int(getattr(layer, NONFINITE_COUNTER))
    layer(clean[1][rank * 3 : rank * 3 + 3])
    out["after_clean"] = _state(layer)

    net = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1), GhostBatchNorm2d(C, ghost_size=2)).double()
    data = clean[2].clone() if rank == 0 else bad.clone()  # the NaN is on rank 1 only
    try:
        recompute_population_stats(net, [data], num_samples=2 * N, batch_size=3, progress=False)
        out["error"] = None
    except NonFiniteStatsError as e:
        out["error"] = str(e)
    return out


@pytest.mark.slow
def test_two_ranks_skip_together_and_precise_bn_fails_on_every_rank():
    from dist_utils import run_distributed

    bad, clean = _batches(7, float("nan"))
    results = run_distributed(_dist_worker, world_size=2, args=(bad, clean))
    fresh = _state(AnySyncBatchNorm2d(C, momentum=MOM).double())
    ref = ref_bn([clean[1]])  # the whole step-2 batch is rank 0's 3 + rank 1's 3 samples of clean[1]
    for r in results:
        assert r["skips"] == 1
        for k, v in fresh.items():
            assert torch.equal(r["after_bad"][k], v), k  # the global NaN step was skipped on both ranks
        torch.testing.assert_close(r["after_clean"]["running_mean"], ref["running_mean"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["after_clean"]["running_var"], ref["running_var"], rtol=1e-10, atol=1e-12)
        # rank 1's bad batch is its batch 0 (samples 0..2): both ranks report it
        assert "layer '1' in batch 0 of rank 1 (its samples 0..2)" in r["error"]
