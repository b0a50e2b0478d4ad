"""Which path population statistics are computed on (rethinking §5.2 Table 5 + Alg. 1, A.3).

* Table 5, every layout: the statistics a PreciseBN pass writes are those of Alg. 1's *inference path* — the
  model in which every head norm normalizes the way inference does (per level when the population statistics are
  per level: row 2's per-level statistics come from the per-level model, as upstream's
  ``retinanet-eval-domain-specific.py`` computes them), statistics collected layer by layer through it. The
  non-exact pass with the population as one batch and the exact layer-wise pass with any B agree on it.
* A layer called several times per forward: exact layer-wise estimation equals the training forward of the whole
  population as one batch (every call normalized by its own population, the layer's statistics pooled over its
  calls), or fails naming the layer when forwards call it different numbers of times.

References are float64 and written from the definitions, not from the code under test.
"""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2norm  # noqa: F401
from d2norm.layers.domain_bn import DomainBatchNorm2d
from d2norm.stats import recompute_population_stats
from helpers import TABLE5_ROWS, batch_moments

K, C, EPS = 3, 4, 1e-5
ROWS = TABLE5_ROWS  # Table 5 rows: (TRAIN_STATS, POP_STATS, AFFINE_PER_DOMAIN)


class ToyHead(nn.Module):
    """A RetinaNet-style shared head over K "levels" (the input average-pooled by 1, 2, 4): per level conv, one
    DomainBN per layer applied to all levels with ``forward_domains``, ReLU."""

    def __init__(self, row, depth=3):
        super().__init__()
        ts, ps, aff = ROWS[row]
        self.convs = nn.ModuleList(nn.Conv2d(C, C, 3, padding=1) for _ in range(depth))
        self.norms = nn.ModuleList(
            DomainBatchNorm2d(C, K, train_stats=ts, pop_stats=ps, affine_per_domain=aff, eps=EPS) for _ in range(depth)
        )
        g = torch.Generator().manual_seed(row)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() <= 2 else 0.0))
        self.double().train()

    def levels(self, x):
        return [F.avg_pool2d(x, 2**k) if k else x for k in range(K)]

    def forward(self, x):
        feats = self.levels(x)
        for conv, norm in zip(self.convs, self.norms):
            feats = [F.relu(t) for t in norm.forward_domains([conv(f) for f in feats])]
        return feats


def _moments(ts):
    """float64 mean and biased variance of all values of the tensors ``ts`` (N_i, C, H_i, W_i), per channel."""
    return batch_moments(list(ts))


def ref_inference_path(head, x, row):
    """Alg. 1's inference path, layer by layer over the whole population ``x``: each layer normalizes every level
    with the population statistics of its inference grouping — level k's own statistics (POP per level, rows
    2, 4, 6; and rows 3, 5 where one BN is applied per level, Alg. 1 Row3) or those of all levels concatenated
    (row 1, Alg. 1 Row1) — and writes (mean, unbiased variance) per level (POP per level) or pooled over every
    level's values (POP shared). Returns the written statistics per layer."""
    ts, ps, aff = ROWS[row]
    feats = [f.detach().double() for f in head.levels(x)]
    written = []
    for conv, norm in zip(head.convs, head.norms):
        h = [F.conv2d(f, conv.weight.double(), conv.bias.double(), padding=1) for f in feats]
        if ts == "shared" and ps == "shared":
            mu, var, _ = _moments(h)
            stats = [(mu, var)] * K
        else:
            stats = [_moments([t])[:2] for t in h]
        out = []
        for k, (t, (mu, var)) in enumerate(zip(h, stats)):
            w = norm.weight[k] if aff else norm.weight
            b = norm.bias[k] if aff else norm.bias
            z = (t - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
            out.append(F.relu(z * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)))
        if ps == "per_domain":
            rows = [_moments([t]) for t in h]
            written.append((torch.stack([m for m, _, _ in rows]), torch.stack([v * n / (n - 1) for _, v, n in rows])))
        else:
            mu, var, n = _moments(h)
            written.append((mu, var * n / (n - 1)))
        feats = out
    return written


def ref_training_path_row2(head, x):
    """Row 2 on the *training* path (every layer normalizing all levels together, per-level statistics
    recorded): what the pass must not compute."""
    feats = [f.detach().double() for f in head.levels(x)]
    written = []
    for conv, norm in zip(head.convs, head.norms):
        h = [F.conv2d(f, conv.weight.double(), conv.bias.double(), padding=1) for f in feats]
        mu, var, _ = _moments(h)
        feats = [F.relu((t - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
                        * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)) for t in h]
        rows = [_moments([t]) for t in h]
        written.append(torch.stack([v * n / (n - 1) for _, v, n in rows]))
    return written


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 8, 8, generator=g, dtype=torch.float64) * 2 + 1


@pytest.mark.parametrize("row", sorted(ROWS))
def test_table5_layouts_inference_path_both_modes(row):
    head = ToyHead(row)
    x = _data()
    ref = ref_inference_path(head, x, row)
    one_batch, exact = copy.deepcopy(head), copy.deepcopy(head)
    recompute_population_stats(one_batch, [x], num_samples=6, batch_size=6, progress=False)
    recompute_population_stats(exact, [x], num_samples=6, batch_size=2, exact_layerwise=True, progress=False)
    for model in (one_batch, exact):
        for norm, (mean, var) in zip(model.norms, ref):
            torch.testing.assert_close(norm.running_mean, mean, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(norm.running_var, var, rtol=1e-10, atol=1e-10)
    if row == 2:  # the training path gives clearly different per-level statistics after the first layer
        train_path = ref_training_path_row2(head, x)
        torch.testing.assert_close(train_path[0], ref[0][1])  # first layer: same input either way
        rel = ((train_path[-1] - ref[-1][1]).abs() / ref[-1][1]).max()
        assert rel > 0.05, rel


# ---- a layer called more than once per forward ------------------------------------------------------------
class Reused(nn.Module):
    """BN ``a`` is called twice per forward, with ``b`` between the calls (its second input depends on ``b``)."""

    def __init__(self, extra_call_if_odd=False):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(C, C, 1) for _ in range(4))
        self.a, self.b, self.c = (nn.BatchNorm2d(C, eps=EPS) for _ in range(3))
        self.extra = extra_call_if_odd
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 + 0.3)
        self.double().train()

    def forward(self, x):
        y = F.relu(self.a(self.c1(x)))
        y = F.relu(self.b(self.c2(y)))
        y = F.relu(self.a(self.c3(y) * 3 + 2))
        if self.extra and x.shape[0] % 2:
            y = self.a(y)
        return self.c(self.c4(y))


def test_reused_layer_exact_equals_one_batch_training_forward():
    model = Reused()
    x = _data(7, seed=1)
    # reference: the training forward of the population as one batch (every call normalized by its own batch
    # = its own population); each layer's statistics pool all of its calls' inputs (every call one batch)
    ref_model = copy.deepcopy(model)
    seen = {"a": [], "b": [], "c": []}
    for name in seen:
        getattr(ref_model, name).register_forward_pre_hook(lambda m, i, n=name: seen[n].append(i[0].detach()))
    ref_model(x)
    assert len(seen["a"]) == 2
    exact = copy.deepcopy(model)
    recompute_population_stats(exact, [x], num_samples=7, batch_size=3, exact_layerwise=True, progress=False)
    approx = copy.deepcopy(model)
    recompute_population_stats(approx, [x], num_samples=7, batch_size=7, progress=False)  # one batch: exact too
    for name, inputs in seen.items():
        mean, var, n = _moments(inputs)
        for m in (exact, approx):
            torch.testing.assert_close(getattr(m, name).running_mean, mean, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(getattr(m, name).running_var, var * n / (n - 1), rtol=1e-10, atol=1e-10)


class ReusedInARow(nn.Module):
    """conv → bn1 → conv → bn1 (again, right after its first call) → conv → bn3 → fc → bn4 (BatchNorm1d): the
    second call of bn1 follows the first with no other norm between, and its input depends on the first call's
    statistics."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(C, C, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(C * 4, 6)
        self.bn1, self.bn3 = nn.BatchNorm2d(C, eps=EPS), nn.BatchNorm2d(C, eps=EPS)
        self.bn4 = nn.BatchNorm1d(6, eps=EPS)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 + 0.2)
        self.double().train()

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = F.relu(self.bn1(self.c2(y) * 2 + 1))
        y = F.relu(self.bn3(self.c3(y)))
        return self.bn4(self.fc(F.adaptive_avg_pool2d(y, 2).flatten(1)))


def _reused_in_a_row_reference(model, x):
    """The float64 training forward of the population ``x`` as one batch, written from BN's definition
    (every call normalized with the mean / biased variance of all its inputs): per layer, the inputs of all its
    calls (the statistics PreciseBN must write pool them)."""
    inputs = {"bn1": [], "bn3": [], "bn4": []}

    def bn(name, t):
        inputs[name].append(t)
        m = getattr(model, name)
        dims = [0] + list(range(2, t.dim()))
        mu = t.mean(dims, keepdim=True)
        var = ((t - mu) ** 2).mean(dims, keepdim=True)
        shape = [1, -1] + [1] * (t.dim() - 2)
        return (t - mu) / torch.sqrt(var + EPS) * m.weight.view(shape) + m.bias.view(shape)

    with torch.no_grad():
        y = F.relu(bn("bn1", F.conv2d(x, model.c1.weight, model.c1.bias, padding=1)))
        y = F.relu(bn("bn1", F.conv2d(y, model.c2.weight, model.c2.bias, padding=1) * 2 + 1))
        y = F.relu(bn("bn3", F.conv2d(y, model.c3.weight, model.c3.bias, padding=1)))
        bn("bn4", F.linear(F.adaptive_avg_pool2d(y, 2).flatten(1), model.fc.weight, model.fc.bias))
    out = {}
    for name, ts in inputs.items():
        flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in ts], dim=1)
        out[name] = (flat.mean(1), flat.var(1, unbiased=True))
    return out


def test_layer_reused_in_a_row_exact_with_several_batches_equals_population_forward():
    """N = 60 samples in loader batches of 8 (B = 8, the last 4): several batches, so the non-exact pass is
    not exact; the exact layer-wise pass must equal the independent one-batch population forward."""
    model = ReusedInARow()
    x = _data(60, seed=3)
    ref = _reused_in_a_row_reference(model, x)
    loader = [x[i:i + 8] for i in range(0, 60, 8)]
    exact = copy.deepcopy(model)
    recompute_population_stats(exact, loader, num_samples=60, batch_size=8, exact_layerwise=True, progress=False)
    approx = copy.deepcopy(model)
    recompute_population_stats(approx, loader, num_samples=60, batch_size=8, progress=False)
    for name, (mean, var) in ref.items():
        torch.testing.assert_close(getattr(exact, name).running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(getattr(exact, name).running_var, var, rtol=1e-10, atol=1e-12)
    # the test can fail: with B < N the non-exact pass is measurably off after the reused layer
    for name in ("bn3", "bn4"):
        off = ((getattr(approx, name).running_var - ref[name][1]).abs() / ref[name][1]).max()
        assert off > 1e-5, (name, float(off))


def test_reused_layer_with_varying_calls_is_refused_naming_the_layer():
    model = Reused(extra_call_if_odd=True)
    x = _data(7, seed=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'a' was called 3 time\(s\).*but 2 time\(s\)"):
        recompute_population_stats(model, [x], num_samples=7, batch_size=2, exact_layerwise=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _varying_calls_worker(rank, world_size, data, state):
    model = Reused(extra_call_if_odd=True)
    model.load_state_dict(state)
    # 7 samples, B=2: rank 0 forwards batches of 2 and 2, rank 1 of 2 and 1 (only rank 1 sees the extra call)
    mine = data[:4] if rank == 0 else data[4:]
    try:
        recompute_population_stats(model, [mine], num_samples=7, batch_size=2, exact_layerwise=True,
                                   progress=False)
    except ValueError as e:
        return {"error": str(e), "unchanged": all(torch.equal(v, state[k]) for k, v in model.state_dict().items())}
    return {"error": None}


@pytest.mark.slow
def test_reused_layer_with_varying_calls_on_one_rank_fails_on_every_rank():
    from dist_utils import run_distributed

    model = Reused(extra_call_if_odd=True)
    state = copy.deepcopy(model.state_dict())
    # a rank left waiting in a collective would make the group time out (DistributedTestError), not raise this
    results = run_distributed(_varying_calls_worker, world_size=2, args=(_data(7, seed=2), state), timeout=30)
    for r in results:
        assert r["error"] is not None
        assert re.search(r"layer 'a' was called 3 time\(s\) in the forward of batch 1 of rank 1 .*but 2 time\(s\)",
                         r["error"]), r["error"]
        assert r["unchanged"]
    assert results[0]["error"] == results[1]["error"]
