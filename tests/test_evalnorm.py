"""EvalNorm (evalnorm §3.3-3.4, eqs 5-9): layer, aux loss, offline fit, checkpoints, registry.

References below are written from the paper's equations in float64, independently of the implementation.
"""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2norm  # noqa: F401  (compat + registry)
import d2norm.layers.evalnorm as E
from d2norm.layers.evalnorm import (
    EvalNorm2d,
    evalnorm_alpha_beta,
    evalnorm_aux_loss,
    evalnorm_parameters,
)
from d2norm.stats.evalnorm_fit import fit_evalnorm_offline

from helpers import assert_matches_reference, bn_train, d2norm_cfg

C = 3


def rand_x(n=4, c=C, h=5, w=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-channel offsets/scales so that samples and channels differ
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 3 + 2
    x = x * (1 + torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64)) + torch.randn(
        n, c, 1, 1, generator=g, dtype=torch.float64
    )
    return x.to(dtype)


def randomize(layer, seed=1, alpha=0.3, beta=0.6):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g))
        layer.running_mean.copy_(torch.randn(C, generator=g) * 2 + 1)
        layer.running_var.copy_(torch.rand(C, generator=g) * 4 + 0.5)
        layer.alpha_logit.fill_(torch.logit(torch.tensor(alpha)).item())
        layer.beta_logit.fill_(torch.logit(torch.tensor(beta)).item())
    return layer


# ---- float64 references written from the paper --------------------------------------------------------------
def ref_eval(x, rm, rv, w, b, alpha, beta, eps):
    """eqs 5-6, then the BN affine."""
    mu_i = x.mean(dim=(2, 3), keepdim=True)
    var_i = ((x - mu_i) ** 2).mean(dim=(2, 3), keepdim=True)
    rm, rv = rm.view(1, -1, 1, 1), rv.view(1, -1, 1, 1)
    mu = alpha * mu_i + (1 - alpha) * rm
    var = beta * var_i + (1 - beta) * rv + beta * (1 - beta) * (mu_i - rm) ** 2
    return (x - mu) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def ref_aux(x, rm, rv, alpha, beta, eps):
    """eqs 7-9 with stop-gradient on x and everything derived from it; mean instead of sum (documented)."""
    x = x.detach()
    mu_b = x.mean(dim=(0, 2, 3), keepdim=True)
    var_b = ((x - mu_b) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    target = (x - mu_b) / torch.sqrt(var_b + eps)
    mu_i = x.mean(dim=(2, 3), keepdim=True)
    sigma_i = torch.sqrt(((x - mu_i) ** 2).mean(dim=(2, 3), keepdim=True))
    rm, rv = rm.view(1, -1, 1, 1), rv.view(1, -1, 1, 1)
    mu_hat = alpha * mu_i + (1 - alpha) * rm
    var_hat = beta * sigma_i**2 + (1 - beta) * rv + beta * (1 - beta) * (mu_i - rm) ** 2
    return (target - (x - mu_hat) / torch.sqrt(var_hat + eps)).abs().mean()


def buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


def params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- eval: eqs 5-6 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "offline", "rule"])
def test_eval_matches_reference_forward_backward(mode):
    layer = randomize(EvalNorm2d(C, mode=mode, eps=1e-3)).double().eval()
    with torch.no_grad():
        layer.seen_batch_size.fill_(3.0)
        layer.seen_batches.fill_(7)
    if mode == "rule":
        alpha = beta = 1.0 / 9.0
    else:
        alpha, beta = torch.sigmoid(layer.alpha_logit).item(), torch.sigmoid(layer.beta_logit).item()
        assert alpha == pytest.approx(0.3) and beta == pytest.approx(0.6)
    x = rand_x()
    before = buffers(layer)
    y = assert_matches_reference(
        layer, x, lambda x, w, b: ref_eval(x, layer.running_mean, layer.running_var, w, b, alpha, beta, 1e-3))
    # only the aux loss estimates alpha/beta (§3.4): the eval graph never reaches them
    assert layer.alpha_logit.grad is None and layer.beta_logit.grad is None
    assert_same(before, buffers(layer))
    # the sample's own statistics matter: eval is not plain BN's EMA normalization
    bn_eval = F.batch_norm(x.detach(), layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, 1e-3)
    assert (y.detach() - bn_eval).abs().max() > 1e-2


def test_eval_limits_bn_and_instance_norm():
    # alpha = beta -> 0: eq 2 (plain BN eval); rule with B = 1: alpha = beta = 1, the sample's own statistics
    x = rand_x()
    layer = randomize(EvalNorm2d(C, mode="offline"), alpha=1e-12, beta=1e-12).double().eval()
    with torch.no_grad():
        layer.alpha_logit.fill_(-60.0)
        layer.beta_logit.fill_(-60.0)
    bn = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), bn, rtol=1e-10, atol=1e-10)
    layer.mode = "rule"
    layer.rule_batch_size = 1
    inst = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), inst, rtol=1e-10, atol=1e-10)


# ---- training: identical to nn.BatchNorm2d ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "offline", "rule"])
def test_train_identical_to_batchnorm(mode):
    torch.manual_seed(0)
    layer = randomize(EvalNorm2d(C, mode=mode, momentum=0.2)).train()
    bn = nn.BatchNorm2d(C, momentum=0.2).train()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k in bn.state_dict()})
    for step in range(2):
        x = rand_x(dtype=torch.float32, seed=step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y_bn = layer(x), bn(x2)
        assert torch.equal(y, y_bn)
        g = torch.randn_like(y)
        loss = (y * g).sum() + evalnorm_aux_loss(layer)  # the aux loss must not change any of these
        loss.backward()
        (y_bn * g).sum().backward()
        assert torch.equal(x.grad, x2.grad)
        assert torch.equal(layer.weight.grad, bn.weight.grad)
        assert torch.equal(layer.bias.grad, bn.bias.grad)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(layer, k), getattr(bn, k)), k
    # and BN itself against the float64 reference of eq 1
    ld = copy.deepcopy(layer).double()
    assert_matches_reference(ld, rand_x(), lambda x, w, b: bn_train(x, w, b, ld.eps)[0])


def test_train_updates_exactly_documented_buffers():
    layer = randomize(EvalNorm2d(C)).train()
    before_b, before_p = buffers(layer), params(layer)
    x = rand_x(dtype=torch.float32)
    x_ref = x.double()
    layer(x)
    after = buffers(layer)
    assert set(after) == {"running_mean", "running_var", "num_batches_tracked", "seen_batch_size", "seen_batches"}
    for k in after:
        assert not torch.equal(after[k], before_b[k]), k
    m = 0.1
    unbiased = x_ref.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(after["running_mean"].double(), (1 - m) * before_b["running_mean"].double() + m * x_ref.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(after["running_var"].double(), (1 - m) * before_b["running_var"].double() + m * unbiased)
    assert after["seen_batch_size"].item() == 4.0 and after["seen_batches"].item() == 1
    assert_same(before_p, params(layer))  # a forward never moves a parameter


@pytest.mark.parametrize("mode", ["online", "offline", "rule"])
def test_eval_never_mutates_buffers(mode):
    layer = randomize(EvalNorm2d(C, mode=mode, rule_batch_size=2)).train()
    layer(rand_x(dtype=torch.float32))
    layer.eval()
    before = buffers(layer)
    with torch.no_grad():
        layer(rand_x(dtype=torch.float32, seed=5))
    layer(rand_x(dtype=torch.float32, seed=6).requires_grad_(True)).sum().backward()
    assert_same(before, buffers(layer))
    assert layer.aux_loss is None  # eval computes no aux loss


# ---- aux loss: eqs 7-9 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["default", "torch_one_chunk", "torch_chunks"])
def test_aux_loss_matches_reference_value_and_gradient(route, monkeypatch):
    """Every route of the eq-9 sums: the native kernel (CPU default), the torch ops in one chunk (what an
    accelerator runs) and in small chunks (CPU without the native build)."""
    import d2norm.layers.evalnorm as evalnorm_module
    from d2norm.layers import native

    if route != "default":
        monkeypatch.setattr(native, "_load", lambda: None)
        monkeypatch.setattr(evalnorm_module, "L1_CHUNK_ELEMENTS", 1 << 40 if route == "torch_one_chunk" else 7)
    layer = randomize(EvalNorm2d(C, eps=1e-3)).double().train()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()  # the pre-update EMA is used
    x = rand_x(n=2)
    layer(x)
    aux = evalnorm_aux_loss(layer)
    aux.backward()
    a = layer.alpha_logit.detach().clone().requires_grad_(True)
    b = layer.beta_logit.detach().clone().requires_grad_(True)
    ref = ref_aux(x, rm0, rv0, torch.sigmoid(a), torch.sigmoid(b), 1e-3)
    ref.backward()
    torch.testing.assert_close(aux, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.alpha_logit.grad, a.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(layer.beta_logit.grad, b.grad, rtol=1e-8, atol=1e-12)
    assert a.grad.abs() > 0 and b.grad.abs() > 0


def test_aux_loss_function_gradcheck():
    """The closed-form gradient of eqs 7-9 w.r.t. α̂, β̂ (E._AuxLoss) against finite differences (float64), at
    α̂, β̂ away from and near 0 / 1; the stop-gradient arguments get no gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64) * 3 + 2
    mu_e = torch.randn(4, generator=g, dtype=torch.float64) + 2
    var_e = torch.rand(4, generator=g, dtype=torch.float64) * 8 + 1
    for a0, b0 in ((0.3, 0.6), (0.02, 0.97)):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: E._AuxLoss.apply(x, mu_e, var_e, a, b, 1e-3), (a, b))
        torch.testing.assert_close(E._AuxLoss.apply(x, mu_e, var_e, a, b, 1e-3),
                                   ref_aux(x, mu_e, var_e, a, b, 1e-3), rtol=1e-12, atol=1e-14)


class TinyNet(nn.Module):
    def __init__(self, mode="online"):
        super().__init__()
        self.conv1 = nn.Conv2d(2, C, 3, padding=1)
        self.n1 = EvalNorm2d(C, mode=mode)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.n2 = EvalNorm2d(C, mode=mode)
        self.bn = nn.BatchNorm2d(C)  # a plain BN too: its EMA must survive the offline fit
        self.fc = nn.Linear(C, 2)

    def forward(self, x):
        x = F.relu(self.n1(self.conv1(x)))
        x = self.bn(F.relu(self.n2(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_stop_gradient_aux_loss_moves_only_alpha_beta():
    """evalnorm §3.4: the stop-gradient makes L_aux invisible to every network parameter and the input."""
    torch.manual_seed(0)
    net_a = TinyNet().train()
    net_b = copy.deepcopy(net_a)
    x = rand_x(n=3, c=2, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    target = torch.tensor([0, 1, 1])

    F.cross_entropy(net_a(xa), target).backward()  # task loss only (aux loss dropped)
    out_b = net_b(xb)
    aux = evalnorm_aux_loss(net_b)
    assert aux.item() > 0
    # direct check: L_aux reaches no network parameter and not the input
    others = [p for n, p in net_b.named_parameters() if not n.endswith(("alpha_logit", "beta_logit"))]
    grads = torch.autograd.grad(aux, others + [xb], retain_graph=True, allow_unused=True)
    assert all(gr is None for gr in grads)
    (F.cross_entropy(out_b, target) + 3.7 * aux).backward()

    pa, pb = dict(net_a.named_parameters()), dict(net_b.named_parameters())
    for n in pa:
        if n.endswith(("alpha_logit", "beta_logit")):
            assert pa[n].grad is None, n  # only the aux loss reaches them
            assert pb[n].grad is not None and pb[n].grad.abs() > 0, n
        else:
            assert torch.equal(pa[n].grad, pb[n].grad), n
    assert torch.equal(xa.grad, xb.grad)
    assert_same(buffers(net_a), buffers(net_b))


def _grid_argmin(objective, points=99):
    """(α, β, value) minimizing ``objective(α, β)`` over a points x points grid of (0, 1)²."""
    grid = torch.linspace(0.01, 0.99, points, dtype=torch.float64)
    vals = torch.stack([torch.stack([objective(a, b) for b in grid.tolist()]) for a in grid.tolist()])
    i, j = divmod(int(vals.argmin()), points)
    return grid[i].item(), grid[j].item(), vals.min().item()


def test_aux_loss_fit_reaches_the_grid_search_optimum():
    """Fitting α̂, β̂ by the aux loss (Adam, cosine schedule) lands on the minimizer of the float64 eq-9
    reference found by grid search, and at its value."""
    torch.manual_seed(0)
    rm, rv = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([9.0, 16.0, 12.0])
    layer = EvalNorm2d(C, momentum=0.0).train()  # momentum 0: the EMA stays fixed on the fixed batch
    with torch.no_grad():
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
        layer.alpha_logit.fill_(-4.0)
        layer.beta_logit.fill_(-4.0)
    x = rand_x(n=2, dtype=torch.float32)
    a_opt, b_opt, l_opt = _grid_argmin(lambda a, b: ref_aux(x.double(), rm.double(), rv.double(), a, b, layer.eps))
    opt = torch.optim.Adam(evalnorm_parameters(layer), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for _ in range(400):
        layer(x)
        loss = evalnorm_aux_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    a_fit, b_fit = layer.alpha_hat.item(), layer.beta_hat.item()
    assert abs(a_fit - a_opt) <= 0.02 and abs(b_fit - b_opt) <= 0.02, (a_fit, b_fit, a_opt, b_opt)
    assert ref_aux(x.double(), rm.double(), rv.double(), a_fit, b_fit, layer.eps).item() <= l_opt + 1e-4
    # with B = 2 the sample's own statistics carry real weight (§4.1, Figure 3)
    assert a_opt > 0.1 and b_opt > 0.1


def test_aux_loss_of_a_layer_called_twice_is_the_paper_l1_sum():
    """A layer called on two inputs of very different size per iteration (a head shared over FPN levels): its
    aux loss is eq 9's L1 sum over both calls' elements divided by their number, so its minimizer is the
    paper's; the per-call mean summed over calls has another one."""
    rm, rv = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([9.0, 16.0, 12.0])
    layer = EvalNorm2d(C, momentum=0.0).train()
    with torch.no_grad():
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
    x1 = rand_x(n=2, h=16, w=16, seed=3)  # "P3": 512 positions
    x2 = rand_x(n=2, h=2, w=2, seed=4) * 0.3 + 4  # "P7": 8 positions, another distribution
    layer.double()

    def l1_sum(a, b):  # the paper's ‖·‖₁ over every element of both calls
        return sum(ref_aux(x, rm.double(), rv.double(), a, b, layer.eps) * x.numel() for x in (x1, x2))

    def layer_loss(a, b):
        with torch.no_grad():
            layer.alpha_logit.fill_(math.log(a / (1 - a)))
            layer.beta_logit.fill_(math.log(b / (1 - b)))
        layer(x1)
        layer(x2)
        return evalnorm_aux_loss(layer).detach()

    total = x1.numel() + x2.numel()
    for a, b in ((0.2, 0.7), (0.5, 0.5), (0.9, 0.1)):
        torch.testing.assert_close(layer_loss(a, b), l1_sum(a, b) / total, rtol=1e-10, atol=1e-12)
    paper = _grid_argmin(l1_sum, 33)
    ours = _grid_argmin(layer_loss, 33)
    assert ours[:2] == paper[:2]
    per_call_mean = _grid_argmin(lambda a, b: sum(ref_aux(x, rm.double(), rv.double(), a, b, layer.eps)
                                                  for x in (x1, x2)), 33)
    assert max(abs(per_call_mean[0] - paper[0]), abs(per_call_mean[1] - paper[1])) >= 0.05, (per_call_mean, paper)


# ---- offline fit -----------------------------------------------------------------------------------------------
def test_offline_fit_changes_only_alpha_beta():
    torch.manual_seed(0)
    net = TinyNet(mode="offline")
    net.train()
    for s in range(3):  # "training": EMA buffers, recorded batch sizes
        net(rand_x(n=2, c=2, dtype=torch.float32, seed=10 + s))
    net.eval()
    net.bn.train()  # a mixed train/eval state must be restored as it was
    flags = {n: m.training for n, m in net.named_modules()}
    requires = {n: p.requires_grad for n, p in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ab0 = evalnorm_alpha_beta(net)

    data = [{"image": rand_x(n=2, c=2, dtype=torch.float32, seed=s)} for s in range(3)]
    calls = []

    def forward_fn(model, batch):
        calls.append(model.training)
        return model(batch["image"])

    out = fit_evalnorm_offline(net, data, num_iters=40, lr=0.1, forward_fn=forward_fn)
    assert len(calls) == 40 and all(calls)  # training forward, cycling through the 3 batches
    assert len(out["losses"]) == 40 and out["losses"][-1] < out["losses"][0]
    changed = set()
    for k, v in net.state_dict().items():
        if not torch.equal(v, state[k]):
            changed.add(k)
    assert changed == {"n1.alpha_logit", "n1.beta_logit", "n2.alpha_logit", "n2.beta_logit"}
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert {n: p.requires_grad for n, p in net.named_parameters()} == requires
    assert all(p.grad is None for p in net.parameters())
    assert out["alpha_beta"] == evalnorm_alpha_beta(net) != ab0
    assert net.n1.aux_loss is None and not net.n1._fitting


def test_offline_fit_matches_direct_aux_minimization():
    # the fit optimizes the same eq 9 on the same frozen EMA as optimizing the layer by hand
    layer = randomize(EvalNorm2d(C, mode="offline"), alpha=0.05, beta=0.05)
    x = rand_x(n=2, dtype=torch.float32)
    twin = copy.deepcopy(layer)
    twin.mode = "online"
    twin.momentum = 0.0
    twin.train()
    opt = torch.optim.Adam(evalnorm_parameters(twin), lr=0.05)
    for _ in range(5):
        twin(x)
        loss = evalnorm_aux_loss(twin)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fit_evalnorm_offline(layer, [x], num_iters=5, lr=0.05)
    torch.testing.assert_close(layer.alpha_logit, twin.alpha_logit)
    torch.testing.assert_close(layer.beta_logit, twin.beta_logit)


def test_offline_fit_detectron2_style_forward_and_errors():
    # detectron2 models take list[dict]; heads log to the event storage during a training forward
    from detectron2.utils.events import get_event_storage

    class D2Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, C, 1)
            self.norm = EvalNorm2d(C, mode="offline")

        def forward(self, batched_inputs):
            x = torch.stack([d["image"] for d in batched_inputs])
            y = self.norm(self.conv(x))
            get_event_storage().put_scalar("fake/loss", float(y.mean()))
            return {"loss_fake": y.mean()}

    model = D2Like()
    data = [[{"image": rand_x(n=1, c=2, dtype=torch.float32, seed=s)[0]} for s in range(2)]]
    out = fit_evalnorm_offline(model, data, num_iters=3)
    assert len(out["losses"]) == 3
    with pytest.raises(ValueError, match="no EvalNorm"):
        fit_evalnorm_offline(nn.Sequential(nn.Conv2d(2, 2, 1)), data, 1)
    with pytest.raises(RuntimeError, match="no EvalNorm layer"):
        fit_evalnorm_offline(model, data, 1, forward_fn=lambda m, b: None)
    assert model.training and not model.norm.alpha_logit.requires_grad  # restored after the failed fit


# ---- rule mode -------------------------------------------------------------------------------------------------
def test_rule_mode_uses_recorded_batch_size():
    layer = randomize(EvalNorm2d(C, mode="rule")).double()
    layer.eval()
    with pytest.raises(RuntimeError, match="RULE_BATCH_SIZE"):
        layer(rand_x())
    layer.train()
    layer(rand_x(n=4, seed=1))
    layer(rand_x(n=2, seed=2))
    layer(rand_x(n=0))  # an empty batch is not a batch size
    assert layer.seen_batches.item() == 2 and layer.seen_batch_size.item() == 3.0
    layer.eval()
    x = rand_x(seed=3)
    expect = ref_eval(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, 1 / 9, 1 / 9, layer.eps)
    torch.testing.assert_close(layer(x), expect, rtol=1e-10, atol=1e-10)
    assert evalnorm_alpha_beta(layer, effective=True)[""] == pytest.approx({"alpha": 1 / 9, "beta": 1 / 9})
    layer.rule_batch_size = 5  # cfg RULE_BATCH_SIZE > 0 wins
    expect = ref_eval(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, 1 / 25, 1 / 25, layer.eps)
    torch.testing.assert_close(layer(x), expect, rtol=1e-10, atol=1e-10)
    # the recorded B survives a checkpoint
    other = EvalNorm2d(C, mode="rule").double()
    other.load_state_dict(layer.state_dict())
    assert other.eval().rule_batch_size_used() == 3.0


# ---- shared requirements -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "rule"])
def test_zero_size_input(mode):
    layer = randomize(EvalNorm2d(C, mode=mode, rule_batch_size=2))
    before = buffers(layer)
    x = torch.zeros(0, C, 5, 4, requires_grad=True)
    layer.train()
    y = layer(x)
    assert y.shape == x.shape
    aux = evalnorm_aux_loss(layer)
    assert aux.item() == 0.0 and aux.requires_grad == (mode == "online")
    (y.sum() + aux).backward()
    assert x.grad.shape == x.shape
    after = buffers(layer)
    for k in ("running_mean", "running_var", "seen_batch_size", "seen_batches"):
        assert torch.equal(after[k], before[k]), k
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    layer.eval()
    assert layer(x).shape == x.shape


def test_bf16_statistics_in_float32():
    layer = randomize(EvalNorm2d(C)).train()
    # large mean relative to the spread: bf16 accumulation of the statistics would be far off
    x = (rand_x(dtype=torch.float64) + 60.0).to(torch.bfloat16)
    xr = x.double()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.double(), bn_train(xr, layer.weight.double(), layer.bias.double(), layer.eps)[0], atol=3e-2, rtol=2e-2)
    aux = evalnorm_aux_loss(layer)
    assert aux.dtype == torch.float32 and torch.isfinite(aux)

    rm0, rv0 = layer.running_mean.double(), layer.running_var.double()
    layer.eval()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expect = ref_eval(xr, rm0, rv0, layer.weight.double(), layer.bias.double(), torch.sigmoid(layer.alpha_logit).item(), torch.sigmoid(layer.beta_logit).item(), layer.eps)
    torch.testing.assert_close(y.double(), expect, atol=3e-2, rtol=2e-2)

    # the aux loss on bf16 input: float32 statistics, same value as the float64 reference on the rounded input
    layer.train()
    with torch.no_grad():
        layer.running_mean.fill_(60.0)
    rm1, rv1 = layer.running_mean.double().clone(), layer.running_var.double().clone()
    layer(x)
    aux = evalnorm_aux_loss(layer)
    ref = ref_aux(xr, rm1, rv1, torch.sigmoid(layer.alpha_logit.double()), torch.sigmoid(layer.beta_logit.double()), layer.eps)
    torch.testing.assert_close(aux.double(), ref, rtol=1e-3, atol=1e-4)


def test_state_dict_round_trip():
    layer = randomize(EvalNorm2d(C)).train()
    layer(rand_x(dtype=torch.float32))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "alpha_logit", "beta_logit", "seen_batch_size", "seen_batches"}
    other = EvalNorm2d(C)
    other.load_state_dict(sd)
    assert_same(dict(other.state_dict()), dict(sd))
    x = rand_x(dtype=torch.float32, seed=4)
    assert torch.equal(layer.eval()(x), other.eval()(x))


def test_loads_batchnorm_and_frozen_bn_state_and_reports_missing(caplog):
    from detectron2.layers import FrozenBatchNorm2d

    bn = nn.BatchNorm2d(C)
    randomize_bn = randomize(EvalNorm2d(C))
    bn.load_state_dict({k: v for k, v in randomize_bn.state_dict().items() if k in bn.state_dict()})
    bn.num_batches_tracked.fill_(17)
    layer = EvalNorm2d(C, init_alpha=0.2, init_beta=0.4)
    # per layer at DEBUG (a model's load says it once for all layers: D2NormCheckpointer); missing_keys has it
    with caplog.at_level(logging.DEBUG, logger="d2norm.layers.evalnorm"):
        res = layer.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["alpha_logit", "beta_logit", "seen_batch_size", "seen_batches"]
    assert res.unexpected_keys == []
    assert "no alpha_logit, beta_logit" in caplog.text
    for k, v in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    ab = evalnorm_alpha_beta(layer)[""]
    assert ab["alpha"] == pytest.approx(0.2) and ab["beta"] == pytest.approx(0.4)
    with pytest.raises(RuntimeError, match="alpha_logit"):
        EvalNorm2d(C).load_state_dict(bn.state_dict())  # strict loading never silently defaults

    frozen = FrozenBatchNorm2d(C)
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, k).copy_(getattr(bn, k))
    nested = nn.Sequential(nn.Conv2d(2, C, 1), EvalNorm2d(C))
    src = nn.Sequential(nn.Conv2d(2, C, 1), frozen)
    res = nested.load_state_dict(src.state_dict(), strict=False)
    # num_batches_tracked is kept (FrozenBN has none), as in every BN-derived d2norm layer; EvalNorm's own are missing
    assert sorted(res.missing_keys) == ["1.alpha_logit", "1.beta_logit", "1.seen_batch_size", "1.seen_batches"]
    x = rand_x(n=2, c=2, dtype=torch.float32)
    # with alpha = beta -> 0 the loaded layer evaluates exactly like the FrozenBN it came from
    with torch.no_grad():
        nested[1].alpha_logit.fill_(-60.0)
        nested[1].beta_logit.fill_(-60.0)
    torch.testing.assert_close(nested.eval()(x), src.eval()(x), rtol=1e-5, atol=1e-5)


def _cfg(**kv):
    return d2norm_cfg("EVALNORM", **kv)


def test_registry_builds_with_cfg_options():
    from d2norm.layers.registry import get_norm, norm_options

    cfg1 = _cfg(MODE="rule", RULE_BATCH_SIZE=4, INIT_ALPHA=0.3)
    cfg1.D2NORM.BN.EPS = 1e-3
    cfg2 = _cfg(MODE="offline", INIT_BETA=0.7)
    with norm_options(cfg1):
        a = get_norm("EvalNorm", 8)
    with norm_options(cfg2):
        b = get_norm("EvalNorm", 8)
    assert isinstance(a, EvalNorm2d) and isinstance(b, EvalNorm2d) and a.num_features == 8
    assert (a.mode, a.rule_batch_size, a.eps) == ("rule", 4, 1e-3)
    assert (b.mode, b.rule_batch_size, b.eps) == ("offline", 0, 1e-5)
    assert evalnorm_alpha_beta(a)[""]["alpha"] == pytest.approx(0.3)
    assert evalnorm_alpha_beta(b)[""]["beta"] == pytest.approx(0.7)
    assert not a.alpha_logit.requires_grad and not b.alpha_logit.requires_grad


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODE", "learned", r"MODE\) must be one of \('online', 'rule', 'offline'\), got 'learned'"),
        ("RULE_BATCH_SIZE", -1, r"RULE_BATCH_SIZE\) must be an integer >= 0.*got -1"),
        ("INIT_ALPHA", 1.0, r"INIT_ALPHA\) must be a number in \(0, 1\), got 1.0"),
        ("INIT_BETA", 0.0, r"INIT_BETA\) must be .*got 0.0"),
    ],
)
def test_bad_options_raise(key, value, match):
    from d2norm.layers.registry import get_norm, norm_options

    with norm_options(_cfg(**{key: value})):
        with pytest.raises(ValueError, match=match):
            get_norm("EvalNorm", 4)


def test_mode_switch_and_bad_mode():
    layer = EvalNorm2d(C)
    assert layer.alpha_logit.requires_grad
    layer.mode = "offline"
    assert not layer.alpha_logit.requires_grad and not layer.beta_logit.requires_grad
    with pytest.raises(ValueError, match="got 'ema'"):
        layer.mode = "ema"
    with pytest.raises(ValueError, match="track_running_stats"):
        EvalNorm2d(C, track_running_stats=False)


def test_no_weight_decay_on_alpha_beta():
    from d2norm.solver import get_optimizer_params

    net = TinyNet(mode="online")
    groups = get_optimizer_params(net, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.5)
    wd = {}
    for g in groups:
        for p in g["params"]:
            wd[p] = g["weight_decay"]
    for n in ("n1", "n2"):
        m = getattr(net, n)
        assert wd[m.alpha_logit] == 0.0 and wd[m.beta_logit] == 0.0
        assert wd[m.weight] == 0.5 and wd[m.bias] == 0.5
    assert wd[net.conv1.weight] == 1e-4
    # offline/rule: alpha/beta are not trained by the model's optimizer at all
    groups = get_optimizer_params(TinyNet(mode="offline"), base_lr=0.1, weight_decay=1e-4)
    assert sum(len(g["params"]) for g in groups) == sum(1 for n, p in TinyNet().named_parameters() if "logit" not in n)


def test_aux_loss_collection_helpers():
    assert evalnorm_aux_loss(nn.Conv2d(1, 1, 1)).item() == 0.0
    shared = EvalNorm2d(C).train()
    model = nn.Sequential(nn.Identity(), shared)
    x1, x2 = rand_x(dtype=torch.float32, seed=1), rand_x(n=2, dtype=torch.float32, seed=2)
    model(x1)
    model(x2)  # a module shared across FPN levels: one term per call
    t1 = shared._aux_terms[0].detach().clone()
    t2 = shared._aux_terms[1].detach().clone()
    n1, n2 = x1.numel(), x2.numel()
    total = evalnorm_aux_loss(model, clear=False)  # eq 9 over both calls' elements / their number
    torch.testing.assert_close(total.detach(), (t1 * n1 + t2 * n2) / (n1 + n2))
    torch.testing.assert_close(evalnorm_aux_loss(model).detach(), (t1 * n1 + t2 * n2) / (n1 + n2))
    assert shared.aux_loss is None and evalnorm_aux_loss(model).item() == 0.0
    with torch.no_grad():
        model(x1)  # no graph, no aux loss (e.g. PreciseBN-style statistics passes)
    assert shared.aux_loss is None
    for _ in range(EvalNorm2d.max_pending_aux + 3):
        model(x1)
    assert len(shared._aux_terms) == EvalNorm2d.max_pending_aux
    assert len(evalnorm_parameters(model)) == 2
    assert set(evalnorm_alpha_beta(model)) == {"1"}


def test_builds_inside_detectron2_block():
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    from d2norm.layers.registry import norm_options

    with norm_options(_cfg(MODE="online")):
        block = BottleneckBlock(8, 16, bottleneck_channels=4, norm="EvalNorm")
    norms = [m for m in block.modules() if isinstance(m, EvalNorm2d)]
    assert len(norms) == 4
    block.train()
    x = rand_x(n=2, c=8, h=6, w=6, dtype=torch.float32)
    y = block(x)
    loss = y.square().mean() + evalnorm_aux_loss(block)
    loss.backward()
    assert all(m.alpha_logit.grad is not None for m in norms)
    block.eval()
    assert torch.isfinite(block(x)).all()


def _fit_worker(rank, world_size, state, xs):
    layer = EvalNorm2d(C, mode="offline")
    layer.load_state_dict(state)
    fit_evalnorm_offline(layer, [xs[rank]], num_iters=4, lr=0.05)
    return layer.state_dict()


def test_offline_fit_averages_gradients_over_two_gloo_ranks():
    from dist_utils import run_distributed

    layer = randomize(EvalNorm2d(C, mode="offline"), alpha=0.05, beta=0.05)
    state = copy.deepcopy(layer.state_dict())
    xs = [rand_x(n=2, dtype=torch.float32, seed=1), rand_x(n=3, dtype=torch.float32, seed=2)]  # uneven
    r0, r1 = run_distributed(_fit_worker, world_size=2, args=(state, xs))
    # single-process equivalent: Adam on the mean of the two ranks' aux losses
    twin = EvalNorm2d(C, mode="online", momentum=0.0)
    twin.load_state_dict(state)
    twin.train()
    opt = torch.optim.Adam(evalnorm_parameters(twin), lr=0.05)
    for _ in range(4):
        losses = []
        for x in xs:
            twin(x)
            losses.append(evalnorm_aux_loss(twin))
        opt.zero_grad()
        (sum(losses) / 2).backward()
        opt.step()
    for k in ("alpha_logit", "beta_logit"):
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], getattr(twin, k).detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(r0[k], state[k])
    for k in ("running_mean", "running_var", "num_batches_tracked", "seen_batch_size", "seen_batches"):
        assert torch.equal(r0[k], state[k]) and torch.equal(r1[k], state[k]), k


def test_bn_options_checked_like_every_bn_derived_layer():
    for bad in (dict(eps=-1.0), dict(eps=0.0), dict(eps=float("nan")), dict(momentum=1.5), dict(momentum=True)):
        with pytest.raises(ValueError, match="eps|momentum"):
            EvalNorm2d(4, **bad)


def test_deepcopy_and_pickle_after_a_training_forward_leave_pending_aux_terms_behind():
    """An EMA / SWA teacher copy after a training forward (issue: "Only Tensors created explicitly by the
    user..."): the copy works and has no pending terms; the original still collects its own."""
    import copy
    import io

    from d2norm.layers.evalnorm import EvalNorm2d, evalnorm_aux_loss

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), EvalNorm2d(4))
    x = torch.randn(4, 3, 5, 5)
    model(x).sum().backward()
    assert model[1]._aux_terms and model[1]._aux_terms[0].grad_fn is not None
    teacher = copy.deepcopy(model)
    assert teacher[1]._aux_terms == [] and teacher[1]._aux_counts == []
    for a, b in zip(teacher.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    buf = io.BytesIO()
    torch.save(model.eval(), buf)
    assert len(model[1]._aux_terms) == 1  # the original's pending term is untouched
    assert evalnorm_aux_loss(model).requires_grad
    teacher.train()(x)
    assert len(teacher[1]._aux_terms) == 1  # the copy collects its own terms from its own forwards


def test_bn_checkpoint_into_evalnorm_model_is_one_warning_line(tmp_path, caplog):
    """A stock BN checkpoint into a model of 5 EvalNorm layers: one summary line for all their α̂, β̂ (was one
    WARNING per layer)."""
    from d2norm.engine.checkpoint import D2NormCheckpointer

    bn = nn.Sequential(*[nn.BatchNorm2d(C) for _ in range(5)])
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    model = nn.Sequential(*[EvalNorm2d(C) for _ in range(5)])
    with caplog.at_level(logging.WARNING):
        D2NormCheckpointer(model).load(str(tmp_path / "bn.pth"))
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "alpha_logit" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "alpha_logit (5 layers), beta_logit (5 layers)" in lines[0].getMessage()
