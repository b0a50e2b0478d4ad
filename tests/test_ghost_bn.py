"""GhostBN vs a float64 reference of four-things eq 4 (rethinking A.5)."""
import pytest
import torch
from torch import nn

from d2norm.layers.ghost_bn import GhostBatchNorm2d, ghost_batch_sizes
from d2norm.layers.registry import get_norm, norm_options

from helpers import assert_matches_reference


def reference_ghost_bn(x, weight, bias, sizes, eps):
    """Eq 4 literally: each example normalized by the mean / biased variance of its own sub-batch."""
    out = torch.empty_like(x)
    start = 0
    for s in sizes:
        xb = x[start : start + s]
        mu = xb.mean(dim=(0, 2, 3), keepdim=True)
        var = (xb * xb).mean(dim=(0, 2, 3), keepdim=True) - mu * mu
        out[start : start + s] = (xb - mu) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        start += s
    return out


def ref_sizes(n, ghost):
    """The documented partition, written out: ceil(n/ghost) contiguous sub-batches whose sizes differ by at most
    one, larger ones first (rethinking A.5; README "balanced")."""
    k = -(-n // ghost)
    return [n // k + (1 if j < n % k else 0) for j in range(k)] if n else []


def _rand(n, c=3, h=4, w=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=dtype) * 3 + 2


def test_sizes_rule():
    assert ghost_batch_sizes(8, 4) == [4, 4]
    assert ghost_batch_sizes(10, 4) == [4, 3, 3]
    assert ghost_batch_sizes(5, 16) == [5]
    assert ghost_batch_sizes(0, 4) == []
    assert sum(ghost_batch_sizes(37, 5)) == 37 and max(ghost_batch_sizes(37, 5)) <= 5
    with pytest.raises(ValueError, match="not a multiple of ghost size 4"):
        ghost_batch_sizes(10, 4, "error")
    with pytest.raises(ValueError, match=r"ghost_size \(D2NORM.GHOST_BN.SIZE\) must be an integer >= 1, got 0"):
        ghost_batch_sizes(4, 0)
    with pytest.raises(ValueError, match=r"remainder \(D2NORM.GHOST_BN.REMAINDER\) must be one of"):
        GhostBatchNorm2d(3, ghost_size=2, remainder="drop")


@pytest.mark.parametrize("n,ghost", [(8, 4), (10, 4), (7, 2), (3, 8)])
def test_train_forward_backward_matches_reference(n, ghost):
    torch.manual_seed(n)
    layer = GhostBatchNorm2d(3, ghost_size=ghost).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1, 1)
    sizes = ref_sizes(n, ghost)
    assert sizes == {(8, 4): [4, 4], (10, 4): [4, 3, 3], (7, 2): [2, 2, 2, 1], (3, 8): [3]}[(n, ghost)]
    assert_matches_reference(layer, _rand(n, seed=n), lambda x, w, b: reference_ghost_bn(x, w, b, sizes, layer.eps),
                             grad_tol=(1e-9, 1e-9))


def test_running_stats_update_rule():
    """Two forwards (momentum 0.25, torch's convention), sub-batches [0:4], [4:7], [7:10] of 10 examples: the EMA
    takes the element-count-weighted average of the sub-batch means and unbiased variances (documented rule)."""
    layer = GhostBatchNorm2d(3, ghost_size=4, momentum=0.25).double()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(2):
        x = _rand(10, seed=3 + step)
        layer(x)
        parts = [x[0:4], x[4:7], x[7:10]]
        counts = [p.shape[0] * p.shape[2] * p.shape[3] for p in parts]
        means = [p.transpose(0, 1).reshape(3, -1).mean(1) for p in parts]
        uvars = [p.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for p in parts]
        mean = sum(c * m for c, m in zip(counts, means)) / sum(counts)
        var = sum(c * v for c, v in zip(counts, uvars)) / sum(counts)
        rm, rv = 0.75 * rm + 0.25 * mean, 0.75 * rv + 0.25 * var
        torch.testing.assert_close(layer.running_mean, rm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, rv, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == step + 1


def test_equals_batchnorm_when_batch_fits_and_in_eval():
    torch.manual_seed(0)
    bn, gbn = nn.BatchNorm2d(3).double(), GhostBatchNorm2d(3, ghost_size=8).double()
    gbn.load_state_dict(bn.state_dict())
    x = _rand(6, seed=1)
    torch.testing.assert_close(gbn(x), bn(x))
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    gbn.eval(), bn.eval()
    before = {k: v.clone() for k, v in gbn.state_dict().items()}
    x = _rand(20, seed=2)
    torch.testing.assert_close(gbn(x), bn(x))
    for k, v in gbn.state_dict().items():
        assert torch.equal(v, before[k]), f"eval mutated {k}"


def test_zero_size_and_bf16():
    layer = GhostBatchNorm2d(3, ghost_size=2)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4, 4)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert int(layer.num_batches_tracked) == 0
    x = (torch.randn(8, 3, 4, 4) * 3 + 2).to(torch.bfloat16)
    layer, layer32 = GhostBatchNorm2d(3, ghost_size=4), GhostBatchNorm2d(3, ghost_size=4)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer32(x.float()), rtol=2e-2, atol=2e-2)
    assert layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, layer32.running_mean, rtol=1e-5, atol=1e-6)


def test_loads_batchnorm_and_frozenbn_state():
    from detectron2.layers import FrozenBatchNorm2d

    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2), bn.weight.data.uniform_()
    layer = GhostBatchNorm2d(3, ghost_size=2)
    layer.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v)
    frozen = FrozenBatchNorm2d(3)
    frozen.running_mean.uniform_()
    layer = GhostBatchNorm2d(3, ghost_size=2)
    layer.load_state_dict(frozen.state_dict())  # strict: the counter FrozenBN lacks keeps its value (warned)
    assert torch.equal(layer.running_mean, frozen.running_mean) and int(layer.num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"momentum \(D2NORM.BN.MOMENTUM\) must be a number in"):
        GhostBatchNorm2d(3, momentum=2.0)


def test_registry_options_from_cfg(d2cfg):
    cfg2 = d2cfg.clone()
    cfg2.D2NORM.GHOST_BN.SIZE = 5
    cfg2.D2NORM.BN.EPS = 1e-3
    with norm_options(d2cfg):
        a = get_norm("GhostBN", 8)
    with norm_options(cfg2):
        b = get_norm("GhostBN", 8)
    assert isinstance(a, GhostBatchNorm2d) and isinstance(b, GhostBatchNorm2d)
    assert (a.ghost_size, a.eps) == (16, 1e-5)
    assert (b.ghost_size, b.eps) == (5, 1e-3)


def test_training_normalization_batch_is_the_ghost_size_other_layers_none():
    """The B of EvalNorm's 1/B² rule for a converted layer (evalnorm §3.3): GhostBN fixes it (four-things eq 4),
    BN-derived layers trained on the whole per-process batch say None."""
    from d2norm.layers import NORM_REGISTRY, AnySyncBatchNorm2d, D2NormModule, ExampleWeightedBatchNorm2d

    assert GhostBatchNorm2d(8, ghost_size=3).training_normalization_batch() == 3
    assert GhostBatchNorm2d(8, ghost_size=16).training_normalization_batch() == 16
    for cls in (AnySyncBatchNorm2d, ExampleWeightedBatchNorm2d):
        assert cls(8).training_normalization_batch() is None
    overriding = {n for n, cls in NORM_REGISTRY
                  if cls.training_normalization_batch is not D2NormModule.training_normalization_batch}
    assert overriding == {"GhostBN"}
