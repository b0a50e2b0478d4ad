"""DomainBN: rethinking §5.2, Table 5, Alg. 1 (per-domain statistics / affine for layers shared by domains)."""
import itertools
import logging
import threading

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm  # noqa: F401
import d2norm.layers.domain_bn  # noqa: F401  (registers "DomainBN")
from d2norm.layers.domain_bn import DomainBatchNorm2d, current_domain, domain_scope
from d2norm.layers.registry import get_norm, norm_options

from helpers import TABLE5_ROWS, buffers, d2norm_cfg

C, K = 3, 3
LAYOUTS = list(itertools.product(("per_domain", "shared"), ("per_domain", "shared"), (False, True)))
TABLE5 = TABLE5_ROWS  # Table 5 rows as (train_stats, pop_stats, affine_per_domain)


def _xs(seed=0, dtype=torch.float64, sizes=((2, 6, 5), (2, 3, 3), (2, 2, 1))):
    """One input per domain, different H, W and clearly different statistics per domain."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (n, h, w) in enumerate(sizes):
        x = torch.randn(n, C, h, w, generator=g, dtype=torch.float64) * (1.5 + k) + (2.0 - 1.5 * k)
        out.append(x.to(dtype))
    return out


def _layer(train_stats, pop_stats, affine_per_domain, momentum=0.3, dtype=torch.float64, seed=1, k=K):
    m = DomainBatchNorm2d(C, k, train_stats=train_stats, pop_stats=pop_stats,
                          affine_per_domain=affine_per_domain, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 3 + 0.5)
    return m


def _ref(xs, ks, w, b, state, *, training, train_stats, pop_stats, affine_per_domain, momentum, eps=1e-5):
    """float64 reference written from rethinking §5.2 / Table 5 / Alg. 1 and the documented EMA rules.

    state = dict(running_mean, running_var, num_batches_tracked) (cloned, updated and returned)."""
    st = {k: v.clone() for k, v in state.items()}
    per_pop = pop_stats == "per_domain"

    def aff(k):
        return (w[k], b[k]) if affine_per_domain else (w, b)

    def flat(x):
        return x.transpose(0, 1).reshape(C, -1)

    def moments(f):
        mean = f.mean(1)
        return mean, ((f - mean[:, None]) ** 2).mean(1), f.shape[1]

    def normalize(x, mean, var, k):
        wk, bk = aff(k)
        return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps) * wk.view(
            1, -1, 1, 1
        ) + bk.view(1, -1, 1, 1)

    def ema(k, mean, var, n):
        idx = (k,) if per_pop else ()
        st["num_batches_tracked"][idx] += 1
        m = momentum if momentum is not None else 1.0 / float(st["num_batches_tracked"][idx])
        st["running_mean"][idx] = (1 - m) * st["running_mean"][idx] + m * mean.detach()
        st["running_var"][idx] = (1 - m) * st["running_var"][idx] + m * var.detach() * n / (n - 1)

    if not training:
        ys = []
        for x, k in zip(xs, ks):
            idx = (k,) if per_pop else ()
            ys.append(normalize(x, st["running_mean"][idx], st["running_var"][idx], k))
        return ys, st
    if train_stats == "per_domain":  # Fig. 7a: each domain by its own statistics
        ys = []
        for x, k in zip(xs, ks):
            mean, var, n = moments(flat(x))
            ys.append(normalize(x, mean, var, k))
            ema(k, mean, var, n)  # per-domain row, or the single set once per domain call (Alg. 1 Row3)
        return ys, st
    # Fig. 7b / Alg. 1 Row1: one set of statistics over all features flattened and concatenated
    mean, var, n = moments(torch.cat([flat(x) for x in xs], dim=1))
    ys = [normalize(x, mean, var, k) for x, k in zip(xs, ks)]
    if per_pop:
        for x, k in zip(xs, ks):
            ema(k, *moments(flat(x)))
    else:
        ema(None, mean, var, n)
    return ys, st


def _check_against_ref(m, xs, ks, training, momentum, atol=1e-10, use_forward_domains=True, scope=False):
    m.train(training)
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    state = buffers(m)
    if use_forward_domains:
        ys = m.forward_domains(xs, ks)
    elif scope:
        ys = []
        for x, k in zip(xs, ks):
            with domain_scope(k):
                ys.append(m(x))
    else:
        ys = [m(x, domain=k) for x, k in zip(xs, ks)]
    gs = [torch.randn_like(y) for y in ys]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()

    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    wr = m.weight.detach().clone().requires_grad_(True)
    br = m.bias.detach().clone().requires_grad_(True)
    yr, st = _ref(xr, ks, wr, br, state, training=training, train_stats=m.train_stats, pop_stats=m.pop_stats,
                  affine_per_domain=m.affine_per_domain, momentum=momentum)
    sum((y * g).sum() for y, g in zip(yr, gs)).backward()
    for y, r in zip(ys, yr):
        assert y.shape == r.shape
        torch.testing.assert_close(y, r, rtol=0, atol=atol)
    for x, r in zip(xs, xr):
        torch.testing.assert_close(x.grad, r.grad, rtol=0, atol=atol)
    torch.testing.assert_close(m.weight.grad, wr.grad, rtol=0, atol=atol)
    torch.testing.assert_close(m.bias.grad, br.grad, rtol=0, atol=atol)
    after = buffers(m)
    for k in st:  # exactly the documented buffer updates (and none in eval)
        torch.testing.assert_close(after[k], st[k], rtol=0, atol=atol)
    if not training:
        for k in state:
            assert torch.equal(after[k], state[k]), k
    m.zero_grad()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("momentum", [0.3, None])
def test_train_matches_reference_every_layout(layout, momentum):
    m = _layer(*layout, momentum=momentum)
    for step in range(2):  # two steps: EMA and counters accumulate
        _check_against_ref(m, _xs(seed=step), [0, 1, 2], True, momentum)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_eval_matches_reference_every_layout(layout):
    m = _layer(*layout)
    _check_against_ref(m, _xs(), [0, 1, 2], False, 0.3)
    _check_against_ref(m, _xs(seed=3)[:2], [2, 0], False, 0.3)  # explicit domains, any order
    _check_against_ref(m, _xs(seed=4), [0, 1, 2], False, 0.3, use_forward_domains=False)
    _check_against_ref(m, _xs(seed=5), [0, 1, 2], False, 0.3, use_forward_domains=False, scope=True)


@pytest.mark.parametrize("affine_per_domain", [False, True])
@pytest.mark.parametrize("pop_stats", ["per_domain", "shared"])
def test_per_domain_training_single_calls_equal_forward_domains(pop_stats, affine_per_domain):
    m = _layer("per_domain", pop_stats, affine_per_domain)
    _check_against_ref(m, _xs(), [2, 0, 1], True, 0.3, use_forward_domains=False)
    _check_against_ref(m, _xs(seed=1), [1, 2, 0], True, 0.3, use_forward_domains=False, scope=True)


def test_shared_training_with_different_batch_sizes():
    m = _layer("shared", "per_domain", True)
    _check_against_ref(m, _xs(sizes=((3, 4, 4), (1, 2, 5), (2, 1, 3))), [0, 1, 2], True, 0.3)


def test_alg1_reference_implementations_with_nn_batchnorm():
    """Rows 1, 3, 6 against the paper's own pseudo-code (Alg. 1) built from nn.BatchNorm2d."""
    xs = _xs(sizes=((2, 4, 4), (2, 2, 3), (2, 1, 2)))
    # Row 1: one BN on all features flattened and concatenated
    m = _layer("shared", "shared", False)
    bn = nn.BatchNorm2d(C, momentum=0.3).double()
    bn.load_state_dict(m.state_dict())
    shapes = [x.shape for x in xs]
    cat = torch.cat([x.flatten(2) for x in xs], dim=2).unsqueeze(3)
    ref = [y.view(s) for s, y in zip(shapes, bn(cat).split([s[2] * s[3] for s in shapes], dim=2))]
    for y, r in zip(m.forward_domains(xs), ref):
        torch.testing.assert_close(y, r, rtol=0, atol=1e-10)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-12)
    # Row 3: one BN applied to every level in turn
    m = _layer("per_domain", "shared", False)
    bn = nn.BatchNorm2d(C, momentum=0.3).double()
    bn.load_state_dict(m.state_dict())
    for y, x in zip(m.forward_domains(xs), xs):
        torch.testing.assert_close(y, bn(x), rtol=0, atol=1e-10)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-12)
    # Row 6: one BN per level
    m = _layer("per_domain", "per_domain", True)
    bns = [nn.BatchNorm2d(C, momentum=0.3).double() for _ in range(K)]
    for k, b in enumerate(bns):
        b.load_state_dict({n: v[k] for n, v in m.state_dict().items()})
    for y, x, b in zip(m.forward_domains(xs), xs, bns):
        torch.testing.assert_close(y, b(x), rtol=0, atol=1e-10)
    for k, b in enumerate(bns):
        for n, v in b.state_dict().items():
            torch.testing.assert_close(m.state_dict()[n][k], v, rtol=0, atol=1e-12)
    m.eval()
    for b in bns:
        b.eval()
    for k, (x, b) in enumerate(zip(xs, bns)):
        torch.testing.assert_close(m(x, domain=k), b(x), rtol=0, atol=1e-12)


def test_shared_train_stats_gradcheck():
    m = _layer("shared", "per_domain", True)
    xs = [x.requires_grad_(True) for x in _xs(sizes=((2, 2, 2), (1, 2, 1)))[:2]]
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)

    def f(x0, x1, w, b):
        return tuple(_call_forward_domains(m, w, b, [x0, x1], [0, 2]))

    assert torch.autograd.gradcheck(f, (*xs, w, b))


def _call_forward_domains(m, w, b, xs, ks):
    saved = m.weight, m.bias
    try:
        del m.weight, m.bias  # plain tensors in place of the parameters, so gradcheck can perturb them
        m.weight, m.bias = w, b
        return m.forward_domains(xs, ks)
    finally:
        del m.weight, m.bias
        m.weight, m.bias = saved


def test_per_domain_ema_touches_only_the_selected_domain():
    m = _layer("per_domain", "per_domain", True)
    before = buffers(m)
    x = _xs()[0]
    y = m(x, domain=1)
    after = buffers(m)
    assert after["num_batches_tracked"].tolist() == [0, 1, 0]
    for k in ("running_mean", "running_var"):
        assert torch.equal(after[k][[0, 2]], before[k][[0, 2]])
        assert not torch.allclose(after[k][1], before[k][1])
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(after["running_mean"][1], 0.7 * before["running_mean"][1] + 0.3 * mean)
    # only domain 1's affine receives gradient
    y.sum().backward()
    assert m.weight.grad[[0, 2]].abs().sum() == 0 and m.bias.grad[[0, 2]].abs().sum() == 0
    assert m.bias.grad[1].abs().sum() > 0


def test_shared_train_with_per_domain_pop_updates_each_row_from_its_domain():
    """Table 5 row 2: SGD statistics shared, but each domain's EMA row from its own statistics."""
    m = _layer("shared", "per_domain", False, momentum=1.0)
    xs = _xs()
    m.forward_domains(xs)
    for k, x in enumerate(xs):
        torch.testing.assert_close(m.running_mean[k], x.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(m.running_var[k], x.var(dim=(0, 2, 3), unbiased=True))
    assert m.num_batches_tracked.tolist() == [1, 1, 1]


def test_buffer_and_parameter_shapes_per_layout():
    bn_keys = list(nn.BatchNorm2d(C).state_dict().keys())
    for train_stats, pop_stats, affine_per_domain in LAYOUTS:
        m = DomainBatchNorm2d(C, 4, train_stats, pop_stats, affine_per_domain)
        assert list(m.state_dict().keys()) == bn_keys
        stat = (4, C) if pop_stats == "per_domain" else (C,)
        assert m.running_mean.shape == stat and m.running_var.shape == stat
        assert m.num_batches_tracked.shape == ((4,) if pop_stats == "per_domain" else ())
        aff = (4, C) if affine_per_domain else (C,)
        assert m.weight.shape == aff and m.bias.shape == aff
        assert torch.equal(m.running_var, torch.ones(stat)) and torch.equal(m.weight, torch.ones(aff))
        assert sorted(n for n, _ in m.named_parameters()) == ["bias", "weight"]
        if pop_stats == "shared" and not affine_per_domain:
            assert {k: v.shape for k, v in m.state_dict().items()} == {
                k: v.shape for k, v in nn.BatchNorm2d(C).state_dict().items()
            }


@pytest.mark.parametrize("bad", [K, -1, 1.0, True, "0", None])
def test_domain_index_validation(bad):
    m = _layer("per_domain", "per_domain", False)
    x = _xs()[0]
    if bad is None:
        with pytest.raises(ValueError, match="domain_scope"):
            m(x)
        m.eval()
        with pytest.raises(ValueError, match="domain_scope"):
            m(x)
        return
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        m(x, domain=bad)
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        m.forward_domains([x], [bad])
    if bad == K:
        with domain_scope(bad):  # scope indices are checked against each layer's NUM_DOMAINS at call time
            with pytest.raises(ValueError, match="NUM_DOMAINS=3"):
                m(x)
    else:
        with pytest.raises(ValueError):
            with domain_scope(bad):
                pass


def test_forward_domains_argument_errors():
    m = _layer("shared", "shared", False)
    xs = _xs()
    with pytest.raises(ValueError, match="NUM_DOMAINS=3"):
        m.forward_domains(xs[:2])
    with pytest.raises(ValueError, match="distinct"):
        m.forward_domains(xs[:2], [1, 1])
    with pytest.raises(ValueError, match="forward_domains"):
        m(xs[0], domain=0)  # shared SGD statistics need every domain at once
    with pytest.raises(ValueError, match="C=3"):
        m.forward_domains([xs[0], xs[1], torch.randn(2, 4, 2, 2, dtype=torch.float64)])


def test_domain_needed_only_when_something_is_domain_specific():
    x = _xs()[0]
    shared = _layer("per_domain", "shared", False).eval()
    torch.testing.assert_close(shared(x), shared(x, domain=2), rtol=0, atol=0)
    for layout in [("per_domain", "per_domain", False), ("per_domain", "shared", True)]:
        with pytest.raises(ValueError, match="NUM_DOMAINS=3 got no domain"):
            _layer(*layout).eval()(x)
    single = _layer("shared", "per_domain", True, k=1)
    single(x)  # K = 1: the one domain, also with shared SGD statistics
    assert single.num_batches_tracked.tolist() == [1]


def test_domain_scope_semantics():
    m = _layer("per_domain", "per_domain", True).eval()
    x = _xs()[0]
    assert current_domain() is None
    with domain_scope(2):
        assert current_domain() == 2
        torch.testing.assert_close(m(x), m(x, domain=2), rtol=0, atol=0)
        with domain_scope(0):  # nested
            torch.testing.assert_close(m(x), m(x, domain=0), rtol=0, atol=0)
        assert current_domain() == 2
        # explicit argument wins over the scope; works through containers that call forward(x)
        torch.testing.assert_close(m(x, domain=1), m.forward_domains([x], [1])[0], rtol=0, atol=0)
        seq = nn.Sequential(nn.Identity(), m)
        torch.testing.assert_close(seq(x), m(x, domain=2), rtol=0, atol=0)
        seen = []
        t = threading.Thread(target=lambda: seen.append(current_domain()))
        t.start()
        t.join()
        assert seen == [None]  # other threads do not see this scope
    assert current_domain() is None
    with pytest.raises(RuntimeError):
        with domain_scope(1):
            raise RuntimeError("boom")
    assert current_domain() is None


def test_zero_size_inputs():
    m = _layer("shared", "per_domain", True)
    xs = _xs()
    xs[1] = torch.zeros(0, C, 3, 3, dtype=torch.float64)
    before = buffers(m)
    ys = m.forward_domains(xs)
    assert ys[1].shape == xs[1].shape
    assert m.num_batches_tracked.tolist() == [1, 0, 1]
    assert torch.equal(m.running_mean[1], before["running_mean"][1])
    # statistics over the non-empty domains only
    ref, _ = _ref([xs[0], xs[2]], [0, 2], m.weight, m.bias, before, training=True, train_stats="shared",
                  pop_stats="per_domain", affine_per_domain=True, momentum=0.3)
    torch.testing.assert_close(ys[0], ref[0])
    torch.testing.assert_close(ys[2], ref[1])
    for layout in LAYOUTS:
        m = _layer(*layout)
        before = buffers(m)
        empty = [torch.zeros(0, C, 4, 4, dtype=torch.float64) for _ in range(K)]
        for training in (True, False):
            m.train(training)
            ys = m.forward_domains(empty)
            assert [y.shape for y in ys] == [e.shape for e in empty]
            if layout[0] == "per_domain" or not training:
                assert m(empty[0], domain=1).shape == empty[0].shape
        for k, v in buffers(m).items():
            assert torch.isfinite(v.double()).all() and torch.equal(v, before[k]), (layout, k)


def test_single_value_domains():
    """Shared SGD statistics: a 1-value domain is normalized but does not update its own EMA row;
    per-domain statistics reject it like nn.BatchNorm2d (its variance is undefined)."""
    m = _layer("shared", "per_domain", False)
    before = buffers(m)
    xs = _xs(sizes=((2, 3, 3), (1, 1, 1), (2, 2, 2)))
    ys = m.forward_domains(xs)
    assert all(torch.isfinite(y).all() for y in ys)
    assert m.num_batches_tracked.tolist() == [1, 0, 1]
    assert torch.equal(m.running_var[1], before["running_var"][1])
    ref, _ = _ref(xs, [0, 1, 2], m.weight, m.bias, before, training=True, train_stats="shared",
                  pop_stats="shared", affine_per_domain=False, momentum=0.3)
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r)
    m = _layer("per_domain", "per_domain", False)
    with pytest.raises(ValueError, match="more than 1 value"):
        m(xs[1], domain=1)
    assert m.num_batches_tracked.tolist() == [0, 0, 0]


@pytest.mark.parametrize("layout", [TABLE5[1], TABLE5[2], TABLE5[6]], ids=["row1", "row2", "row6"])
def test_bf16_inputs_float32_statistics(layout):
    m = _layer(*layout, dtype=torch.float32)
    ref = _layer(*layout, dtype=torch.float32)
    xf = [x.bfloat16().float() for x in _xs(dtype=torch.float32)]
    for training in (True, False):
        m.train(training), ref.train(training)
        ys = m.forward_domains([x.bfloat16() for x in xf])
        rs = ref.forward_domains(xf)
        for y, r in zip(ys, rs):
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), r, rtol=2e-2, atol=3e-2)
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-4, atol=1e-4)


def test_state_dict_roundtrip():
    m = _layer("shared", "per_domain", True)
    m.forward_domains(_xs())
    m2 = DomainBatchNorm2d(C, K, "shared", "per_domain", True).double()
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    m.eval(), m2.eval()
    x = _xs()[1]
    assert torch.equal(m(x, domain=1), m2(x, domain=1))


def _frozen_and_bn():
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
        bn.running_mean.copy_(torch.randn(C))
        bn.running_var.copy_(torch.rand(C) + 0.5)
        bn.num_batches_tracked.fill_(7)
    frozen = FrozenBatchNorm2d(C)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    return bn, frozen


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_loads_plain_bn_and_frozen_bn_state(layout, caplog):
    bn, frozen = _frozen_and_bn()
    bn.eval()
    x = _xs(dtype=torch.float32)[0]
    m = DomainBatchNorm2d(C, K, *layout).eval()
    with caplog.at_level(logging.WARNING):
        m.load_state_dict(bn.state_dict())
    per_domain = layout[1] == "per_domain" or layout[2]
    assert ("copied it into all 3 domains" in caplog.text) == per_domain
    for k in range(K):  # every domain now behaves like the BN
        torch.testing.assert_close(m(x, domain=k), bn(x), rtol=0, atol=0)
    nbt = m.num_batches_tracked
    assert nbt.tolist() == ([7] * K if layout[1] == "per_domain" else 7)

    m = DomainBatchNorm2d(C, K, *layout).eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m.load_state_dict(frozen.state_dict())
    assert "num_batches_tracked" in caplog.text  # FrozenBN has no counter: reported, current value kept
    assert m.num_batches_tracked.sum().item() == 0
    for k in range(K):
        torch.testing.assert_close(m(x, domain=k), frozen(x), rtol=1e-6, atol=1e-6)


def test_per_domain_state_does_not_load_into_shared_layout():
    src = DomainBatchNorm2d(C, K, "per_domain", "per_domain", True)
    dst = DomainBatchNorm2d(C, K, "per_domain", "shared", False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        dst.load_state_dict(src.state_dict())


def _cfg(**domain):
    return d2norm_cfg("DOMAIN_BN", **domain)


def test_registry_builds_with_options_from_two_cfgs():
    with norm_options(_cfg(NUM_DOMAINS=3, TRAIN_STATS="shared", POP_STATS="shared", AFFINE_PER_DOMAIN=True)):
        a = get_norm("DomainBN", 8)
    with norm_options(_cfg(NUM_DOMAINS=5)):
        b = get_norm("DomainBN", 8)
    assert type(a) is DomainBatchNorm2d and type(b) is DomainBatchNorm2d
    assert (a.num_domains, a.train_stats, a.pop_stats, a.affine_per_domain) == (3, "shared", "shared", True)
    # defaults = Table 5 row 4
    assert (b.num_domains, b.train_stats, b.pop_stats, b.affine_per_domain) == (5, "per_domain", "per_domain", False)
    assert a.weight.shape == (3, 8) and a.running_mean.shape == (8,)
    assert b.weight.shape == (8,) and b.running_mean.shape == (5, 8)


@pytest.mark.parametrize(
    "key,value",
    [("NUM_DOMAINS", 0), ("NUM_DOMAINS", 2.5), ("TRAIN_STATS", "concat"), ("POP_STATS", "global"),
     ("AFFINE_PER_DOMAIN", "yes")],
)
def test_bad_options_raise_value_error(key, value):
    with norm_options(_cfg(**{key: value})):
        with pytest.raises(ValueError, match=key + ".*" + repr(value).replace(".", r"\.")):
            get_norm("DomainBN", 4)


def test_weight_decay_norm_applies_to_affine():
    from d2norm.solver import get_optimizer_params

    model = nn.Sequential(nn.Conv2d(C, C, 1), DomainBatchNorm2d(C, K, "per_domain", "per_domain", True))
    groups = get_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model[1].weight)] == 0.0 and decay[id(model[1].bias)] == 0.0
    assert decay[id(model[0].weight)] == 1e-4
