"""The "Adding a norm" example of CONTRIBUTING.md, verbatim: registered with nothing else, it is a detectron2
NORM name, trains as BN (float64 reference), and PreciseBN, the FrozenBN switch, convert_norm, fold_norms and
WEIGHT_DECAY_NORM handle it through the layer protocol."""
import copy
import os
import re

import pytest
import torch
from detectron2.layers import get_norm as d2_get_norm
from torch import nn

from d2norm import options
from d2norm.config import add_d2norm_config
from d2norm.deploy import fold_norms
from d2norm.layers import NORM_REGISTRY, convert_norm, norm_options
from d2norm.layers.frozen import FrozenBatchNorm, freeze_bn_layers
from d2norm.solver import build_optimizer
from d2norm.stats import recompute_population_stats

from helpers import batch_moments, bn_normalize, bn_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def my_bn():
    """The class defined by executing the example's code block (the registry has no removal: names are global;
    the entry is taken out again afterwards so other tests see the real set of layers)."""
    text = open(os.path.join(ROOT, "CONTRIBUTING.md")).read()
    code = re.search(r"## Adding a norm.*?```python\n(.*?)```", text, re.S).group(1)
    assert len([ln for ln in code.splitlines() if ln.strip() and not ln.startswith("#")]) <= 16
    code = (code.replace("from .base", "from d2norm.layers.base").replace("from .registry", "from d2norm.layers.registry")
            .replace("from ..options", "from d2norm.options"))
    ns = {}
    exec(compile(code, "CONTRIBUTING.md", "exec"), ns)
    try:
        yield ns["MyBatchNorm2d"]
    finally:
        NORM_REGISTRY._classes.pop("MyBN", None)
        options._NODES.pop("MY_BN", None)


def _x(n=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 5, 5, generator=g, dtype=torch.float64) * 2 + 1


def test_example_is_a_detectron2_norm_that_trains_as_bn(my_bn, d2cfg):
    d2cfg.D2NORM.BN.EPS, d2cfg.D2NORM.BN.MOMENTUM = 1e-3, 0.3
    with norm_options(d2cfg):
        m = d2_get_norm("MyBN", 4).double()  # detectron2's own get_norm resolves the name
    assert type(m) is my_bn and m.eps == 1e-3 and m.momentum == 0.3
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    x = _x().requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    yr, mu, unbiased = bn_train(xr, m.weight.detach(), m.bias.detach(), 1e-3)
    (yr * g).sum().backward()
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.running_mean, 0.3 * mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.7 + 0.3 * unbiased, rtol=0, atol=1e-12)
    m.eval()
    torch.testing.assert_close(m(x), bn_normalize(x, m.running_mean, m.running_var, 1e-3, m.weight, m.bias))


def test_example_option_is_a_cfg_key_a_default_and_a_check_without_editing_config_py(my_bn):
    from detectron2.config import get_cfg

    from d2norm.layers import norm_layer

    cfg = add_d2norm_config(get_cfg())
    assert cfg.D2NORM.MY_BN.INIT_GAMMA == 1.0  # the declared default, as a cfg key
    assert "INIT_GAMMA" not in open(os.path.join(ROOT, "d2norm", "config.py")).read()
    with norm_options(cfg):
        assert torch.equal(d2_get_norm("MyBN", 3).weight, torch.ones(3))
    cfg.merge_from_list(["D2NORM.MY_BN.INIT_GAMMA", "0.25"])  # a yaml / command-line override reaches the layer
    with norm_options(cfg):
        m = d2_get_norm("MyBN", 3)
    assert torch.equal(m.weight.detach(), torch.full((3,), 0.25)) and m.eps == cfg.D2NORM.BN.EPS
    assert torch.equal(my_bn(3).weight.detach(), torch.ones(3))  # constructor default = the declared one
    assert torch.equal(norm_layer("MyBN", init_gamma=0.0)(3).weight.detach(), torch.zeros(3))
    cfg.D2NORM.MY_BN.INIT_GAMMA = float("nan")
    with norm_options(cfg), pytest.raises(ValueError, match=r"MyBN: init_gamma \(D2NORM.MY_BN.INIT_GAMMA\) must be "
                                                             r"a finite number, got nan"):
        d2_get_norm("MyBN", 3)
    bad = add_d2norm_config(get_cfg())
    bad.D2NORM.MY_BN.INIT_GAMMA = "x"  # the setup check of a launch (validate_launch) names the key
    with pytest.raises(ValueError, match=r"D2NORM.MY_BN.INIT_GAMMA must be a finite number, got 'x'"):
        options.check_cfg(bad)


def test_example_is_handled_by_every_consumer(my_bn, d2cfg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), my_bn(**my_bn.from_config(d2cfg, 4))).double().train()
    data = [_x(c=3, seed=s) for s in range(3)]
    # PreciseBN (rethinking eq 2): the population statistics of the layer's inputs over all 18 samples
    recompute_population_stats(net, iter(data), 18, progress=False)
    with torch.no_grad():
        mu, var, m = batch_moments([net[0](x) for x in data])
    torch.testing.assert_close(net[1].running_mean, mu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net[1].running_var, var * m / (m - 1), rtol=1e-10, atol=1e-10)
    # FrozenBN switch, folding, convert_norm, WEIGHT_DECAY_NORM
    frozen = copy.deepcopy(net)
    assert freeze_bn_layers(frozen).converted == {"1": "MyBatchNorm2d"} and isinstance(frozen[1], FrozenBatchNorm)
    folded = copy.deepcopy(net).eval()
    fold_norms(folded)
    assert isinstance(folded[1], nn.Identity)  # folded into the convolution
    x = _x(c=3, seed=9)
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=1e-10, atol=1e-10)
    src = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    _, report = convert_norm(src, "MyBN", d2cfg)
    assert report.converted == {"1": "BatchNorm2d"} and not report.unmapped_source and type(src[1]) is my_bn
    d2cfg.SOLVER.WEIGHT_DECAY, d2cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 0.0
    groups = build_optimizer(d2cfg, net).param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(net[1].weight)] == decay[id(net[1].bias)] == 0.0 and decay[id(net[0].weight)] == 1e-4
