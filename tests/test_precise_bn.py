"""PreciseBN (rethinking §3.2, A.2, A.3, A.10): estimators, recomputation, side effects, distributed, hook.

References are written from the paper's equations in float64, independently of d2norm.stats.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2norm
import d2norm.engine.hooks  # noqa: F401
import d2norm.stats  # noqa: F401
from d2norm.layers.batch_group_norm import BatchGroupNorm
from d2norm.layers.batch_stats_bn import BatchStatsBatchNorm2d
from d2norm.layers.domain_bn import DomainBatchNorm2d, domain_scope
from d2norm.layers.evalnorm import EvalNorm2d
from d2norm.layers.example_weighted_bn import ExampleWeightedBatchNorm2d
from d2norm.layers.ghost_bn import GhostBatchNorm2d
from d2norm.layers.mabn import MABN2d
from d2norm.layers.sync_bn import AnySyncBatchNorm2d
from d2norm.stats import (
    MomentAccumulator,
    batch_moments,
    mean_of_batch_var_estimate,
    population_estimate,
    recompute_population_stats,
)

from dist_utils import run_distributed
from helpers import tiny_retinanet_cfg, tiny_training_opts

DIMS = (0, 2, 3)


def _data(n, c=3, h=6, w=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype) * 3 + 2)


def _ref_pop(xs):
    """float64 population statistics of all values of the list of inputs: mean, unbiased var, E[x²]."""
    flat = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    return flat.mean(1), flat.var(1, unbiased=True), (flat * flat).mean(1)


# ---- independent state snapshot (state_dict + plain __dict__ attributes) -------------------------------------
def _plain(v):
    if isinstance(v, torch.Tensor):
        return ("T", v.detach().clone())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_plain(e) for e in v])
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return ("obj", type(v).__name__)


def snapshot(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    attrs = {}
    for name, m in model.named_modules():
        attrs[name] = {
            k: _plain(v)
            for k, v in m.__dict__.items()
            if k not in ("_parameters", "_buffers", "_modules") and "hook" not in k
        }
    return sd, attrs


def _same(a, b):
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "T":
        return isinstance(b, tuple) and b[0] == "T" and a[1].shape == b[1].shape and torch.equal(a[1], b[1])
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], list):
        return isinstance(b, tuple) and len(a[1]) == len(b[1]) and all(_same(x, y) for x, y in zip(a[1], b[1]))
    return a == b


def state_diff(before, after):
    """Names of everything that differs (state_dict keys and module attributes)."""
    sd0, at0 = before
    sd1, at1 = after
    diff = {k for k in sd0.keys() | sd1.keys() if k not in sd0 or k not in sd1 or not torch.equal(sd0[k], sd1[k])}
    for mod in at0.keys() | at1.keys():
        a, b = at0.get(mod, {}), at1.get(mod, {})
        for k in a.keys() | b.keys():
            if k not in a or k not in b or not _same(a[k], b[k]):
                diff.add(f"{mod}.__dict__[{k}]")
    return diff


# ---- estimators --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [2.0, 1e4])
def test_eq2_matches_float64_reference_over_uneven_batches(offset):
    sizes = [3, 7, 1, 12, 2]
    xs = [(_data(n, c=4, seed=i, dtype=torch.float32) + offset) for i, n in enumerate(sizes)]
    acc = MomentAccumulator(4)
    counts, means, vars_ = [], [], []
    for x in xs:
        n, m, v = batch_moments(x, DIMS)
        acc.add(n, m, v)
        counts.append(n), means.append(m), vars_.append(v)
    acc.add(0, torch.zeros(4), torch.zeros(4))  # empty batch: ignored
    mean, var, sq = _ref_pop(xs)
    for est in (acc.estimate("population"), population_estimate(counts, means, vars_)):
        assert est.count == sum(n * 30 for n in sizes) and est.num_batches == len(sizes)
        torch.testing.assert_close(est.mean, mean, rtol=0, atol=1e-6 * (1 + offset))
        torch.testing.assert_close(est.var, var, rtol=2e-5, atol=0)  # float32 batch moments, float64 merge
        torch.testing.assert_close(est.var_biased, var * (est.count - 1) / est.count, rtol=2e-5, atol=0)
        torch.testing.assert_close(est.sq_mean, sq, rtol=1e-6, atol=0)


def test_eq2_literal_form_with_equal_batches():
    """With equal batch sizes the merge is eq 2 verbatim: N/(N-1)[mean_i(μ_i²+σ_i²) − mean_i(μ_i)²]."""
    xs = [_data(4, seed=i) for i in range(5)]
    mu = torch.stack([x.mean(DIMS) for x in xs])
    s2 = torch.stack([x.var(DIMS, unbiased=False) for x in xs])
    N = 5 * 4 * 30
    eq2 = N / (N - 1) * ((mu ** 2 + s2).mean(0) - mu.mean(0) ** 2)
    est = population_estimate([120] * 5, mu, s2)
    torch.testing.assert_close(est.var, eq2, rtol=1e-12, atol=0)
    torch.testing.assert_close(est.mean, mu.mean(0), rtol=1e-12, atol=0)


def test_mean_of_batch_var_estimator():
    sizes = [2, 9, 1, 4]
    xs = [_data(n, seed=10 + i) for i, n in enumerate(sizes)]
    acc = MomentAccumulator(3)
    for x in xs:
        acc.add(*batch_moments(x, DIMS))
    est = acc.estimate("mean_of_batch_var")
    # eq 3: every batch weighted equally, Bessel-corrected per batch
    torch.testing.assert_close(est.mean, torch.stack([x.mean(DIMS) for x in xs]).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(est.var, torch.stack([x.var(DIMS, unbiased=True) for x in xs]).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(est.sq_mean, torch.stack([(x * x).mean(DIMS) for x in xs]).mean(0), rtol=1e-12, atol=0)
    ref = mean_of_batch_var_estimate([x.numel() // 3 for x in xs], [x.mean(DIMS) for x in xs],
                                     [x.var(DIMS, unbiased=False) for x in xs])
    torch.testing.assert_close(ref.var, est.var)
    # differs from eq 2 on uneven batches (the test can tell them apart)
    assert not torch.allclose(est.mean, acc.estimate("population").mean, rtol=1e-3)
    with pytest.raises(ValueError, match="mean_of_batch_var"):
        acc.estimate("ema")


# ---- recomputation on small models ---------------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self, norms):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList(norms)
        c = 3
        for n in norms:
            self.convs.append(nn.Conv2d(c, 4, 3, padding=1))
            c = 4

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return x


def _chain(seed=0, dtype=torch.float64, kinds=("bn", "bn")):
    torch.manual_seed(seed)
    make = {
        "bn": lambda: nn.BatchNorm2d(4),
        "ghost": lambda: GhostBatchNorm2d(4, ghost_size=2),
        "bgn": lambda: BatchGroupNorm(4, num_groups=2, example_group_size=2, alpha=0.5),
        "mabn": lambda: MABN2d(4, buffer_size=3, warmup_iters=0),
    }
    m = Chain([make[k]() for k in kinds]).to(dtype)
    with torch.no_grad():
        for n in m.norms:  # non-trivial affine and buffers, so "written" and "normalized with" are visible
            if hasattr(n, "weight"):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)
    return m.train()


def _ref_forward_stats(model, batches):
    """float64 reference of the non-exact pass: each batch forwarded with every norm normalizing by that
    batch's statistics (kinds bn/ghost/bgn/mabn), inputs of each norm collected."""
    seen = [[] for _ in model.norms]
    for x in batches:
        x = x.double()
        for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            h = F.conv2d(x, conv.weight.double(), conv.bias.double(), padding=1)
            seen[i].append(h)
            w, b = norm.weight.double().view(1, -1, 1, 1), norm.bias.double().view(1, -1, 1, 1)
            if isinstance(norm, BatchGroupNorm):
                g = h.unflatten(1, (norm.num_groups, -1))
                mu = g.mean(dim=(0, 2, 3, 4), keepdim=True)
                var = g.var(dim=(0, 2, 3, 4), unbiased=False, keepdim=True)
                y = ((g - mu) / torch.sqrt(var + norm.eps)).flatten(1, 2) * w + b
            elif isinstance(norm, MABN2d):
                chi = torch.sqrt((h * h).mean(DIMS, keepdim=True) + norm.eps)  # mabn eq 15, χ_B
                y = h / chi * w + b
            else:
                mu, var = h.mean(DIMS, keepdim=True), h.var(DIMS, unbiased=False, keepdim=True)
                y = (h - mu) / torch.sqrt(var + norm.eps) * w + b
            x = F.relu(y)
    return seen


def _expected_buffers(norm, inputs):
    if isinstance(norm, BatchGroupNorm):
        g = [x.unflatten(1, (norm.num_groups, -1)).flatten(2, 3) for x in inputs]
        mean, _, sq = _ref_pop(g)
        return {"running_mean": mean, "running_var": sq - mean * mean}  # m_{x²} − m_x² of eq 3
    mean, var, sq = _ref_pop(inputs)
    if isinstance(norm, MABN2d):
        return {"running_chi": torch.sqrt(sq + norm.eps)}
    return {"running_mean": mean, "running_var": var}


def _check_buffers(norm, expected, rtol=1e-9, atol=1e-9):
    for k, v in expected.items():
        torch.testing.assert_close(getattr(norm, k).double(), v, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_recompute_chain_rebatches_and_uses_eq2():
    model = _chain(kinds=("bn", "ghost", "bgn", "mabn"))
    data = _data(12, seed=1)
    loader = [data[i : i + 5] for i in range(0, 12, 5)]  # loader batches of 5, 5, 2
    before = snapshot(model)
    res = recompute_population_stats(model, loader, num_samples=10, batch_size=4, progress=False)
    # B=4 independent of the loader's 5: batches of 4, 4, 2 from the first 10 samples
    seen = _ref_forward_stats(model, [data[0:4], data[4:8], data[8:10]])
    for norm, inputs in zip(model.norms, seen):
        _check_buffers(norm, _expected_buffers(norm, inputs))
    assert set(res) == {f"norms.{i}" for i in range(4)} and all(r[0].num_batches == 3 for r in res.values())
    changed = state_diff(before, snapshot(model))
    assert changed == {
        "norms.0.running_mean", "norms.0.running_var", "norms.1.running_mean", "norms.1.running_var",
        "norms.2.running_mean", "norms.2.running_var", "norms.3.running_chi",
    }


def test_mean_of_batch_var_option_in_recompute():
    model = _chain(kinds=("bn",))
    data = _data(10, seed=2)
    recompute_population_stats(model, [data], num_samples=10, batch_size=4, estimator="mean_of_batch_var",
                               progress=False)
    h = [F.conv2d(data[a:b], model.convs[0].weight.double(), model.convs[0].bias.double(), padding=1)
         for a, b in ((0, 4), (4, 8), (8, 10))]
    torch.testing.assert_close(model.norms[0].running_mean, torch.stack([x.mean(DIMS) for x in h]).mean(0))
    torch.testing.assert_close(model.norms[0].running_var, torch.stack([x.var(DIMS) for x in h]).mean(0))


def test_exact_layerwise_equals_whole_population_as_one_batch():
    """rethinking A.3: with EXACT_LAYERWISE, any B gives the statistics of the population forwarded as one batch."""
    kinds = ("bn", "ghost", "bgn", "mabn")
    model = _chain(kinds=kinds)
    data = _data(9, seed=3)
    seen_one_batch = _ref_forward_stats(model, [data])  # the definition: B = N
    exact = copy.deepcopy(model)
    recompute_population_stats(exact, [data[:5], data[5:]], 9, batch_size=4, exact_layerwise=True, progress=False)
    for norm, inputs in zip(exact.norms, seen_one_batch):
        _check_buffers(norm, _expected_buffers(norm, inputs), rtol=1e-9, atol=1e-10)
    # the plain split-and-aggregate approximation with B=4 differs in deeper layers (so this test can fail)
    approx = copy.deepcopy(model)
    recompute_population_stats(approx, [data], 9, batch_size=4, progress=False)
    torch.testing.assert_close(approx.norms[0].running_var, exact.norms[0].running_var)  # first layer: exact
    assert not torch.allclose(approx.norms[3].running_chi, exact.norms[3].running_chi, rtol=1e-6, atol=0)


class SharedHead(nn.Module):
    """One BN applied to three inputs of different sizes per forward (a shared head over FPN levels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        levels = [x, F.avg_pool2d(x, 2), x[:, :, :1, :3] * 2 - 1]
        return [self.bn(self.conv(lv)) for lv in levels]


def test_shared_layer_called_several_times_per_forward():
    torch.manual_seed(0)
    model = SharedHead().double().train()
    data = _data(7, seed=4)
    inputs = []
    model.bn.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].clone()))
    res = recompute_population_stats(model, [data], num_samples=7, batch_size=3, progress=False)
    assert len(inputs) == 9  # 3 forwards (3, 3, 1 samples) x 3 levels
    mean, var, _ = _ref_pop(inputs)
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-10, atol=1e-10)
    assert res["bn"][0].num_batches == 9  # every call is one batch with its own size
    # eq 3 averages the 9 calls with equal weight
    m2 = SharedHead().double().train()
    m2.load_state_dict(model.state_dict())
    recompute_population_stats(m2, [data], 7, batch_size=3, estimator="mean_of_batch_var", progress=False)
    torch.testing.assert_close(m2.bn.running_var, torch.stack([x.var(DIMS) for x in inputs]).mean(0))


def test_frozen_layers_untouched():
    from detectron2.layers import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4),
                          nn.BatchNorm2d(4, track_running_stats=False)).double().train()
    model[1].running_mean.fill_(0.3)
    model[2].eval()  # frozen by design: runs its eval forward, statistics kept
    before = snapshot(model)
    res = recompute_population_stats(model, [_data(4)], 4, batch_size=2, progress=False)
    assert set(res) == {"3"}
    assert state_diff(before, snapshot(model)) == {"3.running_mean", "3.running_var"}
    assert model[2].training is False


# ---- every d2norm layer type, side effects ---------------------------------------------------------------------
class Zoo(nn.Module):
    """Every norm family on branches of the raw input, so each layer's population is the data itself."""

    def __init__(self):
        super().__init__()
        self.evalnorm = EvalNorm2d(3, mode="online")
        self.mabn = MABN2d(3, buffer_size=2, warmup_iters=1)
        self.bgn = BatchGroupNorm(3, num_groups=3, example_group_size=2)
        self.ghost = GhostBatchNorm2d(3, ghost_size=2)
        self.ewbn = ExampleWeightedBatchNorm2d(3, alpha=0.3)
        self.bsbn = BatchStatsBatchNorm2d(3)
        self.anysync = AnySyncBatchNorm2d(3)
        self.dom = DomainBatchNorm2d(3, num_domains=2, pop_stats="per_domain", affine_per_domain=True)
        self.dom_shared = DomainBatchNorm2d(3, num_domains=2, train_stats="shared", pop_stats="shared")
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        outs = [m(x) for m in (self.evalnorm, self.mabn, self.bgn, self.ghost, self.ewbn, self.bsbn, self.anysync)]
        with domain_scope(0):
            outs.append(self.dom(x))
        with domain_scope(1):
            outs.append(self.dom(2 * x + 1))
        outs += self.dom_shared.forward_domains([x, 3 * x[:, :, :2] - 2])
        return sum(o.sum() for o in outs) * self.scale


def test_every_layer_type_recomputed_and_nothing_else_changes():
    torch.manual_seed(0)
    model = Zoo().double().train()
    data = _data(7, seed=5)
    model(data[:4]).backward()  # some training state: rings, EMA, aux terms, seen_batch_size
    before = snapshot(model)
    # sanity: a plain training-mode forward (even without grad) mutates state — the snapshot can see it
    probe = Zoo().double().train()
    probe.load_state_dict(model.state_dict())
    probe_before = snapshot(probe)
    with torch.no_grad():
        probe(data[:2])
    assert len(state_diff(probe_before, snapshot(probe))) > 10
    assert len(model.evalnorm._aux_terms) == 1  # a pending aux-loss term: must survive the pass unchanged

    recompute_population_stats(model, [data[:3], data[3:]], 7, batch_size=3, progress=False)
    mean, var, sq = _ref_pop([data])
    for name in ("evalnorm", "ghost", "ewbn", "bsbn", "anysync"):
        _check_buffers(getattr(model, name), {"running_mean": mean, "running_var": var})
    _check_buffers(model.mabn, {"running_chi": torch.sqrt(sq + model.mabn.eps)})
    _check_buffers(model.bgn, {"running_mean": mean, "running_var": sq - mean * mean})  # 1 channel per group
    m1, v1, _ = _ref_pop([2 * data + 1])
    torch.testing.assert_close(model.dom.running_mean, torch.stack([mean, m1]))
    torch.testing.assert_close(model.dom.running_var, torch.stack([var, v1]))
    ms, vs, _ = _ref_pop([data, 3 * data[:, :, :2] - 2])
    torch.testing.assert_close(model.dom_shared.running_mean, ms)
    torch.testing.assert_close(model.dom_shared.running_var, vs)

    expected = {f"{n}.running_mean" for n in ("evalnorm", "ghost", "ewbn", "bsbn", "anysync", "bgn", "dom",
                                                 "dom_shared")}
    expected |= {f"{n}.running_var" for n in ("evalnorm", "ghost", "ewbn", "bsbn", "anysync", "bgn", "dom",
                                               "dom_shared")}
    expected |= {"mabn.running_chi"}
    assert state_diff(before, snapshot(model)) == expected


def test_bf16_input_statistics_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3)).train()
    data = _data(6, dtype=torch.float32).bfloat16()
    recompute_population_stats(model, [data], 6, batch_size=4, forward_fn=lambda m, b: m(b), progress=False)
    mean, var, _ = _ref_pop([data.float()])
    assert model[0].running_mean.dtype == torch.float32
    torch.testing.assert_close(model[0].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = _chain(kinds=("bn",))
    with pytest.raises(ValueError, match="estimator.*'ema'"):
        recompute_population_stats(model, [_data(2)], 2, estimator="ema")
    with pytest.raises(ValueError, match="num_samples.*0"):
        recompute_population_stats(model, [_data(2)], 0)
    with pytest.raises(ValueError, match="batch_size.*-1"):
        recompute_population_stats(model, [_data(2)], 2, batch_size=-1)


# ---- detectron2 RetinaNet: A.10 unintended updates ----------------------------------------------------------
def _retinanet_cfg(norm="GhostBN"):
    # ghost size 2 with 2 images: a ghost batch of one example would give P7 (1x1 at 64 px) one value per channel,
    # which GhostBN rejects in training as torch's BN does
    return tiny_retinanet_cfg(norm, ["D2NORM.GHOST_BN.SIZE", 2])


def _det_batch(n, seed, size=64):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(2, 2, generator=g) * size * 0.5
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(2, 2, generator=g) * size * 0.4], 1))
        inst.gt_classes = torch.randint(0, 3, (2,), generator=g)
        out.append({"image": (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8), "height": size,
                    "width": size, "instances": inst})
    return out


@pytest.mark.slow
def test_retinanet_only_population_statistics_change():
    from detectron2.utils.events import EventStorage

    from d2norm.layers import build_model

    torch.manual_seed(0)
    model = build_model(_retinanet_cfg()).train()
    with EventStorage():
        model(_det_batch(2, 0))  # creates loss_normalizer (detectron2's EMA of #foreground anchors)
    head_bn = model.head.cls_subnet[1]
    assert isinstance(head_bn, GhostBatchNorm2d)  # one layer shared by the 5 FPN levels
    inputs = []
    head_bn.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].double().clone()))
    before = snapshot(model)
    # sanity: a plain training forward (no grad) changes loss_normalizer and the BN EMA (A.10)
    probe = copy.deepcopy(model)
    with torch.no_grad(), EventStorage():
        probe(_det_batch(2, 1))
    assert "__dict__[loss_normalizer]" in " ".join(state_diff(before, snapshot(probe)))
    inputs.clear()

    rng = torch.get_rng_state()
    recompute_population_stats(model, [_det_batch(3, 2), _det_batch(2, 3)], num_samples=4, batch_size=2,
                               progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert len(inputs) == 2 * 5  # 2 forwards x 5 FPN levels
    mean, var, _ = _ref_pop(inputs)
    torch.testing.assert_close(head_bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head_bn.running_var.double(), var, rtol=1e-5, atol=1e-5)

    changed = state_diff(before, snapshot(model))
    assert changed, "PreciseBN changed nothing"
    norm_names = {n for n, m in model.named_modules() if isinstance(m, GhostBatchNorm2d)}
    allowed = {f"{n}.{b}" for n in norm_names for b in ("running_mean", "running_var")}
    assert changed <= allowed, changed - allowed
    assert "head.cls_subnet.1.running_var" in changed and "backbone.bottom_up.stem.conv1.norm.running_mean" in changed


# ---- distributed ------------------------------------------------------------------------------------------
def _dist_worker(rank, world, data, state, bs):
    model = _chain(kinds=("bn", "ghost", "bgn", "mabn"), dtype=torch.float32)
    model.load_state_dict(state)
    share = [6, 5][rank]  # rank_share(11, r, 2)
    start = 0 if rank == 0 else 6
    mine = data[start : start + share]
    out = {}
    for est in ("population", "mean_of_batch_var"):
        for exact in (False, True):
            m = copy.deepcopy(model)
            recompute_population_stats(m, [mine], 11, batch_size=bs, estimator=est, exact_layerwise=exact,
                                       progress=False)
            out[(est, exact)] = {k: v for k, v in m.state_dict().items()}
    # a rank with no data at all still joins the collectives
    m = copy.deepcopy(model)
    recompute_population_stats(m, [data[:1]] if rank == 0 else [], 1, batch_size=bs, progress=False)
    out["one"] = m.state_dict()
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_rank_over_union():
    model = _chain(kinds=("bn", "ghost", "bgn", "mabn"), dtype=torch.float32)
    state = copy.deepcopy(model.state_dict())
    data = _data(11, seed=6, dtype=torch.float32)
    results = run_distributed(_dist_worker, world_size=2, args=(data, state, 3))
    for key in [("population", False), ("population", True), ("mean_of_batch_var", False),
                ("mean_of_batch_var", True), "one"]:
        r0, r1 = results[0][key], results[1][key]
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (key, k)  # every rank ends with identical statistics
        m = copy.deepcopy(model)
        if key == "one":
            recompute_population_stats(m, [data[:1]], 1, batch_size=3, progress=False)
        else:
            # one rank over the union, same batches: rank 0's [0:3], [3:6], rank 1's [6:9], [9:11]
            loader = [data[0:3], data[3:6], data[6:9], data[9:11]]
            recompute_population_stats(m, loader, 11, batch_size=None, estimator=key[0], exact_layerwise=key[1],
                                       progress=False)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6, msg=lambda s: f"{key} {k}: {s}")


# ---- cfg and hook --------------------------------------------------------------------------------------------
def test_cfg_validation(d2cfg):
    from d2norm.engine.hooks import check_precise_bn_cfg

    check_precise_bn_cfg(d2cfg)
    for key, bad, match in [("ESTIMATOR", "ema", "population"), ("NUM_SAMPLES", 0, "NUM_SAMPLES"),
                            ("BATCH_SIZE", 2.5, "BATCH_SIZE"), ("PERIOD", -2, "PERIOD"),
                            ("EXACT_LAYERWISE", 1, "EXACT_LAYERWISE")]:
        c = d2cfg.clone()
        c.D2NORM.PRECISE_BN[key] = bad
        with pytest.raises(ValueError, match=match):
            check_precise_bn_cfg(c)
    c = d2cfg.clone()
    c.D2NORM.PRECISE_BN.ENABLED = True
    c.TEST.PRECISE_BN.ENABLED = True
    with pytest.raises(ValueError, match="TEST.PRECISE_BN"):
        check_precise_bn_cfg(c)


@pytest.mark.slow
def test_hook_runs_at_period_and_after_last_iteration(tmp_path):
    from detectron2.engine import hooks as d2hooks

    from d2norm.data import prepare_datasets
    from d2norm.engine import Trainer
    from d2norm.engine.hooks import PreciseBNHook

    cfg = _retinanet_cfg(norm="BN")
    cfg.merge_from_list([
        *tiny_training_opts(tmp_path, 5, warmup_iters=1), "D2NORM.PRECISE_BN.ENABLED", True, "D2NORM.PRECISE_BN.PERIOD", 2, "D2NORM.PRECISE_BN.NUM_SAMPLES", 3,
        "D2NORM.PRECISE_BN.BATCH_SIZE", 2,
    ])
    prepare_datasets(cfg)
    trainer = Trainer(cfg)
    pbn = [h for h in trainer._hooks if isinstance(h, PreciseBNHook)]
    assert len(pbn) == 1 and pbn[0].period == 2 and pbn[0].batch_size == 2
    names = [type(h) for h in trainer._hooks]
    assert names.index(PreciseBNHook) < names.index(d2hooks.PeriodicCheckpointer)
    runs = []
    orig = pbn[0].update_stats

    def spy():
        bn = trainer.model.head.cls_subnet[1][0]  # detectron2's per-level BN (CycleBatchNormList), level 0
        ema = bn.running_var.clone()
        out = orig()
        assert not torch.equal(ema, bn.running_var)  # the run replaced the EMA
        runs.append((trainer.iter + 1, bn.running_var.clone(), bn.num_batches_tracked.clone()))
        return out

    pbn[0].update_stats = spy
    trainer.train()
    assert [r[0] for r in runs] == [2, 4, 5]
    assert pbn[0].num_runs == 3
    # PreciseBN does not count as an EMA update, and the final statistics are the last run's
    assert int(runs[-1][2]) == 5
    assert torch.equal(runs[-1][1], trainer.model.head.cls_subnet[1][0].running_var)
    assert "precise_bn/time" in trainer.storage.histories()


# ---- non-finite batch statistics -----------------------------------------------------------------------------
def _nan_data():
    data = _data(32, seed=7)
    data[13, 1, 2, 3] = float("nan")  # one NaN pixel in sample 13, i.e. in the second batch of 8
    return data


@pytest.mark.parametrize("exact", [False, True])
def test_one_nan_pixel_fails_naming_layer_and_batch(exact):
    model = _chain(kinds=("ghost", "bn"))
    before = snapshot(model)
    with pytest.raises(d2norm.stats.NonFiniteStatsError, match=r"layer 'norms\.0' in batch 1 of rank 0 "
                       r"\(its samples 8\.\.15\).*nonfinite='skip'"):
        recompute_population_stats(model, [_nan_data()], num_samples=32, batch_size=8, progress=False,
                                   exact_layerwise=exact)
    assert state_diff(before, snapshot(model)) == set()  # nothing written


def test_one_nan_pixel_skipped_with_report(caplog):
    model = _chain(kinds=("ghost", "bn"))
    data = _nan_data()
    with caplog.at_level("WARNING", logger="d2norm"):
        res = recompute_population_stats(model, [data], num_samples=32, batch_size=8, progress=False,
                                         nonfinite="skip")
    assert "norms.0: batch 1 of rank 0" in caplog.text
    # the NaN reaches every later layer through the conv: both layers leave batch 1 out
    assert res.nonfinite == {"norms.0": ["batch 1 of rank 0 (its samples 8..15)"],
                             "norms.1": ["batch 1 of rank 0 (its samples 8..15)"]}
    clean = [data[0:8], data[16:24], data[24:32]]
    seen = _ref_forward_stats(model, clean)
    for norm, inputs in zip(model.norms, seen):
        _check_buffers(norm, _expected_buffers(norm, inputs))
        assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert all(r[0].num_batches == 3 for r in res.values())


def test_nonfinite_option_validated(d2cfg):
    from d2norm.engine.hooks import check_precise_bn_cfg

    with pytest.raises(ValueError, match="nonfinite must be one of"):
        recompute_population_stats(_chain(), [_data(4)], 4, nonfinite="ignore", progress=False)
    d2cfg.D2NORM.PRECISE_BN.NONFINITE = "ignore"
    with pytest.raises(ValueError, match=r"D2NORM.PRECISE_BN.NONFINITE must be one of \('error', 'skip'\)"):
        check_precise_bn_cfg(d2cfg)
