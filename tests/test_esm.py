"""Estimation shift magnitude (estimation-shift Def. 1-2) and the rethinking Fig. 2 data gathering
(d2norm/stats/esm.py, d2norm/stats/probe.py) against float64 references written from the definitions."""
import math

import pytest
import torch
from torch import nn

from d2norm.stats import recompute_population_stats
from d2norm.stats.esm import estimation_shift_magnitude, layer_esm, model_layer_esm
from d2norm.stats.estimators import PopulationEstimate
from d2norm.stats.probe import batch_statistics, expected_population_stats, probed_layers


def _ref_esm(mu_hat, var_hat, mu_exp, var_exp):
    """Def. 2 literally: ‖μ̂ − μ̃‖₂ and ‖sqrt(σ̂²) − sqrt(σ̃²)‖₂ with Python floats."""
    a = math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(mu_hat, mu_exp)))
    b = math.sqrt(sum((math.sqrt(float(x)) - math.sqrt(float(y))) ** 2 for x, y in zip(var_hat, var_exp)))
    return a, b


def test_esm_matches_definition_2():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        mu_hat, mu_exp = torch.randn(7, generator=g) * 3 + 2, torch.randn(7, generator=g) * 3 + 2
        var_hat, var_exp = torch.rand(7, generator=g) * 4 + 0.1, torch.rand(7, generator=g) * 4 + 0.1
        got = estimation_shift_magnitude(mu_hat.to(dtype), var_hat.to(dtype), mu_exp, var_exp)
        ref = _ref_esm(mu_hat.to(dtype), var_hat.to(dtype), mu_exp, var_exp)
        assert got == pytest.approx(ref, rel=1e-12)
    assert estimation_shift_magnitude(mu_hat, var_hat, mu_hat, var_hat) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        estimation_shift_magnitude(mu_hat, var_hat, mu_exp[:3], var_exp)


def test_layer_esm_per_slot_and_order():
    g = torch.Generator().manual_seed(1)
    est = {"b": [(torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5) for _ in range(2)],
           "a": [(torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5)]}

    def pe(m, v):
        return PopulationEstimate(m.double(), v.double(), v.double(), v.double() + m.double() ** 2, 10.0, 1)

    exp = {"b": [pe(torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5), None],
           "a": [pe(torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5)]}
    rows = layer_esm(est, exp, ["a", "b"])
    assert [r["layer"] for r in rows] == ["a", "b"] and [r["depth"] for r in rows] == [0, 1]
    ref_b = _ref_esm(est["b"][0][0], est["b"][0][1], exp["b"][0].mean, exp["b"][0].var)
    assert (rows[1]["esm_mu"], rows[1]["esm_sigma"]) == pytest.approx(ref_b, rel=1e-12)
    assert [s["slot"] for s in rows[1]["slots"]] == [0]  # the slot without test data is left out


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def _net(seed=0):
    torch.manual_seed(seed)
    net = _Net().double()
    with torch.no_grad():  # some EMA history, away from the (0, 1) init
        for i in range(3):
            net(torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 + 1)
    return net


def _ref_expected(net, batches):
    """Def. 1: inputs of each BN over all test data, the net in eval mode (earlier BNs use their EMA)."""
    net = net.eval()
    acts = {"bn1": [], "bn2": [], "bn3": []}
    with torch.no_grad():
        for x in batches:
            h = net.conv1(x)
            acts["bn1"].append(h)
            h = net.conv2(torch.relu(net.bn1(h)))
            acts["bn2"].append(h)
            h = net.conv3(torch.relu(net.bn2(h)))
            acts["bn3"].append(h)
    out = {}
    for n, hs in acts.items():
        v = torch.cat(hs).transpose(0, 1).reshape(hs[0].shape[1], -1)
        out[n] = (v.mean(1), v.var(1, unbiased=True))
    return out


def test_expected_stats_and_esm_vs_reference():
    net = _net().train()
    test = [torch.randn(n, 3, 6, 6, dtype=torch.float64) * 3 - 1 for n in (3, 1, 4)]  # uneven batches, shifted
    before = {k: v.clone() for k, v in net.state_dict().items()}
    exp = expected_population_stats(net, test)
    assert net.training and all(m.training for m in net.modules())  # flags restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing mutated
    assert exp.order == ["bn1", "bn2", "bn3"] and exp.num_samples == 8
    ref = _ref_expected(net, test)
    for n, (mu, var) in ref.items():
        torch.testing.assert_close(exp.estimates[n][0].mean, mu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(exp.estimates[n][0].var, var, rtol=1e-10, atol=1e-10)
    rows = model_layer_esm(net, exp)
    for r in rows:
        bn = getattr(net, r["layer"])
        mu, var = ref[r["layer"]]
        assert (r["esm_mu"], r["esm_sigma"]) == pytest.approx(
            _ref_esm(bn.running_mean, bn.running_var, mu, var), rel=1e-9)
        assert r["esm_mu"] > 0.1 and r["type"] == "BatchNorm2d"
    # num_samples restricts to the first samples
    exp4 = expected_population_stats(net, test, num_samples=4)
    ref4 = _ref_expected(net, [torch.cat(test)[:4]])
    torch.testing.assert_close(exp4.estimates["bn3"][0].mean, ref4["bn3"][0], rtol=1e-10, atol=1e-10)


def test_esm_vanishes_after_exact_layerwise_precise_bn_on_the_test_set():
    """Def. 1's expected statistics are those of the test set through the eval-mode model; A.3 layer-wise
    PreciseBN on that set writes exactly them, so ESM ≈ 0 in every layer (exactly 0 for the mean of the first
    layer; later layers differ by O(1/N): A.3 normalizes with the biased variance, eval with the unbiased one)."""
    net = _net(1).train()
    test = [torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 + 3 for _ in range(3)]
    rows0 = model_layer_esm(net, expected_population_stats(net, test))
    assert min(r["esm_mu"] for r in rows0) > 1e-2
    recompute_population_stats(net, test, 12, batch_size=4, exact_layerwise=True, progress=False)
    rows = model_layer_esm(net, expected_population_stats(net, test))
    assert rows[0]["layer"] == "bn1" and rows[0]["esm_mu"] < 1e-9
    for r, r0 in zip(rows, rows0):
        assert r["esm_mu"] < 0.02 * r0["esm_mu"] and r["esm_sigma"] < 0.02 * r0["esm_sigma"], (r, r0)


def test_batch_statistics_fig2_data_and_no_state_change():
    net = _net(2).train()
    data = [torch.randn(n, 3, 6, 6, dtype=torch.float64) * 2 + 1 for n in (3, 3, 2, 4)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    stats = batch_statistics(net, data, num_batches=3, batch_size=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # EMA updates undone (A.10)
    assert torch.equal(torch.get_rng_state(), rng)
    # reference: re-chunked batches of 3 samples, training-mode forward of the unchanged model
    flat = torch.cat(data)
    ref_net = _net(2).train()
    ref_net.load_state_dict(before)
    seen = {"bn1": [], "bn3": []}
    for n in seen:
        getattr(ref_net, n).register_forward_pre_hook(lambda m, i, n=n: seen[n].append(i[0]))
    with torch.no_grad():
        for k in range(3):
            ref_net.load_state_dict(before)
            ref_net(flat[3 * k: 3 * k + 3])
    for n in seen:
        s = stats[n]
        assert s.batch_means.shape == (3, 1, getattr(net, n).num_features)
        for k, x in enumerate(seen[n]):
            torch.testing.assert_close(s.batch_means[k, 0], x.mean((0, 2, 3)), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(s.batch_vars[k, 0], x.var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.mean_of_batch_means[0], torch.stack([x.mean((0, 2, 3)) for x in seen[n]]).mean(0))
        allx = torch.cat(seen[n]).transpose(0, 1).reshape(s.batch_means.shape[-1], -1)
        torch.testing.assert_close(s.population[0].mean, allx.mean(1), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.ema_mean[0], before[f"{n}.running_mean"])
    with pytest.raises(ValueError, match="ran out"):
        batch_statistics(net, data[:1], num_batches=2, batch_size=3)
    with pytest.raises(ValueError, match="not BN layers"):
        batch_statistics(net, data, num_batches=1, layers=["conv1"])


def test_domain_bn_slots_through_forward_domains():
    """Per-level statistics (rethinking Table 5 rows 2/4/6 layout): slot k = the inputs of domain k."""
    from d2norm.layers.domain_bn import DomainBatchNorm2d

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = DomainBatchNorm2d(3, num_domains=2, pop_stats="per_domain").double()

        def forward(self, xs):
            return self.norm.forward_domains(xs)

    head = Head()
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.tensor([[1.0, 2, 3], [-1, 0, 1]]))
    data = [[torch.randn(2, 3, 4, 4, dtype=torch.float64) + 5, torch.randn(2, 3, 2, 2, dtype=torch.float64) * 3]
            for _ in range(2)]
    layers = probed_layers(head)
    assert list(layers) == ["norm"]
    exp = expected_population_stats(head, data)
    for k in range(2):
        x = torch.cat([d[k] for d in data]).transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(exp.estimates["norm"][k].mean, x.mean(1), rtol=1e-10, atol=1e-10)
    rows = model_layer_esm(head, exp)
    assert [s["slot"] for s in rows[0]["slots"]] == [0, 1]
    rm, rv = head.norm.running_mean.double(), head.norm.running_var.double()
    flat_ref = _ref_esm(rm.reshape(-1), rv.reshape(-1), torch.cat([e.mean for e in exp.estimates["norm"]]),
                        torch.cat([e.var for e in exp.estimates["norm"]]))
    assert (rows[0]["esm_mu"], rows[0]["esm_sigma"]) == pytest.approx(flat_ref, rel=1e-10)
