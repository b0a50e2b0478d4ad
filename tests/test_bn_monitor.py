"""BN-statistics monitor (rethinking Fig. 2; estimation-shift Def. 2): values against an independent float64
computation from the layers' inputs, no side effects, and the hook's event-storage scalars."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2norm.engine.hooks as H
from d2norm.layers.batch_group_norm import BatchGroupNorm
from d2norm.layers.mabn import MABN2d
from d2norm.stats.monitor import MONITOR_METRICS, bn_statistics_gaps
from d2norm.stats.state import capture_state

from helpers import tiny_retinanet_training_cfg

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), MABN2d(4, buffer_size=2, warmup_iters=0)
        self.c3, self.n3 = nn.Conv2d(4, 4, 1), BatchGroupNorm(4, num_groups=2, alpha=0.5)
        self.shared = nn.BatchNorm2d(4)  # called twice per forward

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = self.n3(self.c3(x))
        return self.shared(x) + self.shared(x * 2 + 1)


def _batches(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 3, 5, 4, generator=g, dtype=torch.float64) * 3 + 2 for i in range(k)]


def _ref(inputs, ema_mean, ema_sigma, kind, eps=None):
    """Def. 2 / Fig. 2 quantities from the raw per-forward inputs (list over forwards of lists over calls)."""
    def stats(xs):  # xs: list of (N, C, H, W) fed in one "batch"
        if kind == "bgn":
            v = torch.cat([x.unflatten(1, (2, -1)).transpose(0, 1).reshape(2, -1) for x in xs], 1)
        else:
            v = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)
        mean = v.mean(1)
        if kind == "mabn":
            return None, ((v * v).mean(1) + eps).sqrt()
        if kind == "bgn":
            return mean, v.var(1, unbiased=False).sqrt()
        return mean, v.var(1, unbiased=True).sqrt()

    pop_m, pop_s = stats([x for xs in inputs for x in xs])
    per = [stats(xs) for xs in inputs]
    n = torch.linalg.vector_norm
    out = {"std_gap": n(ema_sigma - pop_s), "batch_std_gap": sum(n(ema_sigma - s) for _, s in per) / len(per),
           "batch_std_spread": sum(n(s - pop_s) for _, s in per) / len(per)}
    if pop_m is not None:
        out.update(mean_gap=n(ema_mean - pop_m), batch_mean_gap=sum(n(ema_mean - m) for m, _ in per) / len(per),
                   batch_mean_spread=sum(n(m - pop_m) for m, _ in per) / len(per))
    return {k: float(v) for k, v in out.items()}


def test_gaps_equal_direct_computation_and_no_side_effects():
    torch.manual_seed(0)
    net = Net().double().train()
    for x in _batches(3, seed=1):  # training steps: EMAs move
        net(x).sum().backward()
    inputs = {n: [] for n in ("n1", "n2", "n3", "shared")}
    for name in inputs:
        getattr(net, name).register_forward_pre_hook(
            lambda m, inp, name=name: inputs[name][-1].append(inp[0].detach().clone()))
    batches = _batches(4, seed=2)

    def fwd(model, b):
        for v in inputs.values():
            v.append([])
        return model(b)

    before = capture_state(net)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    res = bn_statistics_gaps(net, batches, num_batches=3, forward_fn=fwd)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())  # nothing written
    assert before["attrs"].keys() == capture_state(net)["attrs"].keys()
    assert set(res) == {"n1", "n2", "n3", "shared"}
    assert all(len(v) == 3 for v in inputs.values()) and len(inputs["shared"][0]) == 2
    d = lambda t: t.detach().double()  # noqa: E731
    refs = {
        "n1": _ref(inputs["n1"], d(net.n1.running_mean), d(net.n1.running_var).sqrt(), "bn"),
        "shared": _ref(inputs["shared"], d(net.shared.running_mean), d(net.shared.running_var).sqrt(), "bn"),
        "n2": _ref(inputs["n2"], None, d(net.n2.running_chi), "mabn", eps=net.n2.eps),
        "n3": _ref(inputs["n3"], d(net.n3.running_mean),
                   d(net.n3.running_var).sqrt(), "bgn"),
    }
    for name, ref in refs.items():  # (MABN's moving_std_gap: test_mabn_moving_statistics_gap)
        assert set(res[name]) - {"moving_std_gap"} == set(ref), name
        for k, v in ref.items():
            assert res[name][k] == pytest.approx(v, rel=1e-7, abs=1e-9), (name, k)
    assert set(res["n1"]) == set(MONITOR_METRICS)
    assert res["n1"]["mean_gap"] > 0 and res["n1"]["batch_mean_spread"] > 0
    # layer filter (regular expressions)
    assert set(bn_statistics_gaps(net, batches, 1, layers=["^n[12]$"])) == {"n1", "n2"}
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1, got 0"):
        bn_statistics_gaps(net, batches, 0)


def test_cfg_validation(d2cfg):
    H.check_bn_monitor_cfg(d2cfg)
    for key, val, match in (("PERIOD", 0, "PERIOD must be an integer >= 1, got 0"),
                            ("NUM_BATCHES", -2, "NUM_BATCHES must be an integer >= 1"),
                            ("BATCH_SIZE", -1, "BATCH_SIZE must be an integer >= 0"),
                            ("LAYERS", "stem", "list of regular expressions"), ("ENABLED", 1, "True or False")):
        old = d2cfg.D2NORM.BN_MONITOR[key]
        d2cfg.D2NORM.BN_MONITOR[key] = val
        with pytest.raises(ValueError, match=match):
            H.check_bn_monitor_cfg(d2cfg)
        d2cfg.D2NORM.BN_MONITOR[key] = old


@pytest.mark.slow
def test_hook_writes_scalars_equal_to_direct_computation(tmp_path):
    from d2norm.engine import Trainer

    cfg = tiny_retinanet_training_cfg(tmp_path, 3, opts=[
        "D2NORM.BN_MONITOR.ENABLED", True, "D2NORM.BN_MONITOR.PERIOD", 2, "D2NORM.BN_MONITOR.NUM_BATCHES", 2,
        "D2NORM.BN_MONITOR.LAYERS", ["stem", "cls_subnet"],
    ])
    trainer = Trainer(cfg)
    hook = [h for h in trainer._hooks if isinstance(h, H.BNMonitorHook)][0]
    assert hook.period == 2 and hook.num_batches == 2
    stem = trainer.model.backbone.bottom_up.stem.conv1.norm
    inputs, refs, calls = [], {}, []
    orig = hook.measure

    def spy():
        inputs.clear()
        h = stem.register_forward_pre_hook(lambda m, inp: inputs.append([inp[0].detach().double().clone()]))
        ema = (stem.running_mean.double().clone(), stem.running_var.double().clone())
        try:
            res = orig()
        finally:
            h.remove()
        calls.append(trainer.iter + 1)
        refs.update(_ref(inputs, ema[0], ema[1].sqrt(), "bn"))
        return res

    hook.measure = spy
    trainer.train()
    assert calls == [2] and len(inputs) == 2
    hist = trainer.storage.histories()
    names = {k for k in hist if k.startswith("bn_monitor/")}
    layers = {"backbone.bottom_up.stem.conv1.norm"} | {f"head.cls_subnet.1.{i}" for i in range(5)}
    assert names == {f"bn_monitor/{n}/{m}" for n in layers for m in MONITOR_METRICS} | {"bn_monitor/time"}
    for m, v in refs.items():
        assert hist[f"bn_monitor/backbone.bottom_up.stem.conv1.norm/{m}"].latest() == pytest.approx(v, rel=1e-5)
    assert hist["bn_monitor/backbone.bottom_up.stem.conv1.norm/mean_gap"].values()[0][1] == 1  # iteration 2


def test_ghost_bn_batches_are_its_sub_batches():
    """A layer that trains on fixed sub-batches (GhostBN, ghost size 2; four-things §3.2): the monitor's batch
    statistics b are those of each 2-example sub-batch of every call (what the layer normalizes with in
    training), the population those of all examples -- against a float64 computation from the layer's inputs.
    Batches of 4, 5 and 4 examples: 5 splits into ghost batches of 2, 2 and 1 (the layer's "balanced" rule:
    ceil(5 / 2) = 3 sub-batches whose sizes differ by at most one)."""
    from d2norm.layers import NORM_REGISTRY

    torch.manual_seed(0)
    ghost = NORM_REGISTRY.get("GhostBN")(4, ghost_size=2, remainder="balanced", eps=1e-5, momentum=0.1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ghost).double().train()
    for x in _batches(2, seed=1):
        net(x).sum().backward()
    seen = []
    ghost.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 5, 4, generator=g, dtype=torch.float64) * 3 + 2 for n in (4, 5, 4)]
    res = bn_statistics_gaps(net, batches, num_batches=3)["1"]
    assert len(seen) == 3
    split = {4: [2, 2], 5: [2, 2, 1]}
    sub = [[part] for x in seen for part in x.split(split[x.shape[0]])]
    ref = _ref(sub, ghost.running_mean.double(), ghost.running_var.double().sqrt(), "bn")
    for k, v in ref.items():
        assert res[k] == pytest.approx(v, rel=1e-7, abs=1e-9), k
    assert res["normalization_batch"] == 2
    whole = _ref([[x] for x in seen], ghost.running_mean.double(), ghost.running_var.double().sqrt(), "bn")
    assert res["batch_mean_spread"] > 1.2 * whole["batch_mean_spread"]  # smaller batches, noisier statistics


def test_mabn_moving_statistics_gap():
    """MABN normalizes its training forward with the simple moving average of its last m batches' χ² (mabn eq
    19): ``moving_std_gap`` = ||sqrt(mean of the last m training batches' E[x²] + ε) − χ_pop||, against a float64
    computation from the layer's inputs in the training steps (m = 3 of 5 steps) and in the monitored batches;
    not reported while the layer still trains on batch statistics (warm-up)."""
    torch.manual_seed(0)
    mabn = MABN2d(4, buffer_size=3, warmup_iters=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), mabn).double().train()
    train_in = []
    handle = mabn.register_forward_pre_hook(lambda m, inp: train_in.append(inp[0].detach().clone()))
    batches = _batches(6, seed=4)
    net(batches[0]).sum().backward()  # step 1 of 2 warm-up steps
    assert "moving_std_gap" not in bn_statistics_gaps(net, batches[4:], 2)["1"]
    with torch.no_grad():  # a moved model: the ring holds statistics of older weights
        for b in batches[1:4]:
            net(b).sum()
            net[0].weight.mul_(1.3)
    handle.remove()
    seen = []
    mabn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    res = bn_statistics_gaps(net, batches[4:], 2)["1"]
    chi_sq = lambda x: (x.transpose(0, 1).reshape(4, -1) ** 2).mean(1) + mabn.eps  # noqa: E731
    moving = torch.stack([chi_sq(x) for x in train_in[-3:]]).mean(0).sqrt()
    pop = chi_sq(torch.cat([x.transpose(0, 1).reshape(4, -1) for x in seen], 1).T.reshape(-1, 4, 1, 1)).sqrt()
    assert res["moving_std_gap"] == pytest.approx(float(torch.linalg.vector_norm(moving - pop)), rel=1e-7)
    assert res["moving_std_gap"] > res["batch_std_spread"]  # the weights moved since the ring was filled


def test_ghost_bn_pass_replays_the_training_forward():
    """Two GhostBN layers in a row: the monitor's statistics of the second are those of its inputs in the
    model's real training forward (the first one normalizing each ghost batch by its own statistics), its
    population that of those inputs -- computed here from the layers' own training forward on a copy."""
    import copy

    from d2norm.layers import NORM_REGISTRY

    make = lambda: NORM_REGISTRY.get("GhostBN")(4, ghost_size=2, remainder="balanced", eps=1e-5,  # noqa: E731
                                                momentum=0.1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), make(), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        make()).double().train()
    for x in _batches(2, seed=1):
        net(x).sum().backward()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 3, 5, 4, generator=g, dtype=torch.float64) * 3 + 2 for n in (4, 5)]
    twin, seen = copy.deepcopy(net), []
    twin[4].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            twin(b)  # the real training forward
    res = bn_statistics_gaps(net, batches, num_batches=2)["4"]
    split = {4: [2, 2], 5: [2, 2, 1]}
    ref = _ref([[p] for x in seen for p in x.split(split[x.shape[0]])], net[4].running_mean.double(),
               net[4].running_var.double().sqrt(), "bn")
    for k, v in ref.items():
        assert res[k] == pytest.approx(v, rel=1e-7, abs=1e-9), k
