"""FrozenBN switch (rethinking §4.3, Fig. 6): layer mapping against a float64 reference, the optimizer / LR / DDP
bookkeeping, training through the Trainer, checkpoints before and after the switch, 2 processes on gloo."""
import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm.engine.hooks as H
from d2norm.engine.checkpoint import D2NormCheckpointer
from d2norm.layers.batch_group_norm import BatchGroupNorm
from d2norm.layers.domain_bn import DomainBatchNorm2d
from d2norm.layers.evalnorm import EvalNorm2d
from d2norm.layers.frozen import FrozenBatchNorm, freeze_bn_layers
from d2norm.layers.ghost_bn import GhostBatchNorm2d
from d2norm.layers.mabn import MABN2d

from dist_utils import run_distributed
from helpers import bn_normalize, tiny_retinanet_training_cfg

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _x(n=4, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 5, 6, generator=g, dtype=dtype) * 3 + 2


def _zoo():
    torch.manual_seed(0)
    z = nn.ModuleDict({
        "bn": nn.BatchNorm2d(4),
        "bn_noaffine": nn.BatchNorm2d(4, affine=False),
        "ghost": GhostBatchNorm2d(4, ghost_size=2),
        "mabn": MABN2d(4, buffer_size=2, warmup_iters=0),
        "evalnorm": EvalNorm2d(4, mode="rule", rule_batch_size=4),
        "bgn": BatchGroupNorm(4, num_groups=2),
        "domain": DomainBatchNorm2d(4, num_domains=2),
        "notrack": nn.BatchNorm2d(4, track_running_stats=False),
    }).double()
    with torch.no_grad():
        for m in z.values():
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    z.train()
    for s in range(3):  # move every EMA away from its init
        for k, m in z.items():
            if k == "domain":
                m(_x(seed=s), domain=s % 2)
            else:
                m(_x(seed=s).requires_grad_(True)).sum().backward()
    return z


def _ref(x, mean, var, eps, w, b):
    """rethinking §4.3: y = (x − μ)/sqrt(σ² + ε)·γ + β, float64."""
    v = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return bn_normalize(x, v(mean), v(var), eps, v(w), v(b))


@pytest.mark.parametrize("trainable", [True, False])
def test_mapping_equals_float64_reference_and_eval_output(trainable):
    z = _zoo()
    x = _x(seed=7).requires_grad_(True)
    z.eval()
    with torch.no_grad():
        eval_out = {k: z[k](x) for k in ("bn", "bn_noaffine", "ghost", "mabn")}
    old = dict(z.items())
    refs = {}
    for k in ("bn", "bn_noaffine", "ghost", "evalnorm"):
        m = old[k]
        refs[k] = _ref(x, m.running_mean, m.running_var, m.eps, m.weight, m.bias)
    m = old["mabn"]  # mabn §4.2 inference z = γ·x/χ̂ + β
    refs["mabn"] = x * (m.weight / m.running_chi).detach().view(1, -1, 1, 1) + m.bias.detach().view(1, -1, 1, 1)
    z.train()
    report = freeze_bn_layers(z, trainable_affine=trainable)
    assert report.target == "FrozenBN"
    assert report.converted == {"bn": "BatchNorm2d", "bn_noaffine": "BatchNorm2d", "ghost": "GhostBatchNorm2d",
                                "mabn": "MABN2d", "evalnorm": "EvalNorm2d"}
    assert set(report.skipped) == {"bgn", "domain", "notrack"}
    assert set(report.notes) == {"evalnorm"}
    for k in ("bgn", "domain", "notrack"):
        assert z[k] is old[k]
    for k, ref in refs.items():
        new = z[k]
        assert new.training  # mode kept; the map is the same in both modes
        y = new(x)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        if k in eval_out:  # frozen output = the layer's pre-switch eval output
            torch.testing.assert_close(y, eval_out[k], rtol=1e-10, atol=1e-10)
        # backward: dy/dx = γ/sqrt(σ²+ε) per channel (constant map)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        (gx_ref,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    for k in ("bn", "ghost", "mabn", "evalnorm"):
        new = z[k]
        if trainable:
            assert isinstance(new, FrozenBatchNorm)
            assert new.weight is old[k].weight and new.bias is old[k].bias  # same Parameter objects
            assert [n for n, _ in new.named_buffers()] == ["running_mean", "running_var"]
            y = new(x)
            gw, gb = torch.autograd.grad(y, (new.weight, new.bias), torch.ones_like(y))
            xh = ((x - new.running_mean.view(1, -1, 1, 1)) / torch.sqrt(new.running_var.view(1, -1, 1, 1) + new.eps))
            torch.testing.assert_close(gw, xh.sum((0, 2, 3)), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(gb, torch.full_like(gb, x.numel() / 4))
        else:
            assert list(new.parameters()) == []
            expected = FrozenBatchNorm if k == "mabn" else FrozenBatchNorm2d
            assert type(new) is expected
    assert type(z["bn_noaffine"]) is FrozenBatchNorm2d
    # the frozen maps never change their buffers in training mode
    snap = {k: v.clone() for k, v in z.state_dict().items()}
    for k in report.converted:
        z[k](_x(seed=9))
    assert all(torch.equal(snap[k], v) for k, v in z.state_dict().items())


def test_frozen_module_basics():
    m = FrozenBatchNorm(3, eps=1e-3).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        m.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
    assert m(torch.zeros(0, 3, 4, 4, dtype=torch.float64)).shape == (0, 3, 4, 4)
    x = _x(c=3, dtype=torch.float32).bfloat16()
    y = m.float()(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _ref(x.double(), m.running_mean, m.running_var, 1e-3, m.weight, m.bias).float(),
                               rtol=2e-2, atol=2e-2)
    # a BN state (with num_batches_tracked) and detectron2's FrozenBatchNorm2d state load
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.weight.uniform_()
    f = FrozenBatchNorm(3)
    assert f.load_state_dict(bn.state_dict()).missing_keys == []
    assert torch.equal(f.running_mean, bn.running_mean) and torch.equal(f.weight.data, bn.weight.data)
    f2 = FrozenBatchNorm(3, trainable_affine=False)
    f2.load_state_dict(FrozenBatchNorm2d(3).state_dict())
    # 1-D and 3-D inputs (BatchNorm1d / SyncBatchNorm layers)
    assert m(torch.randn(5, 3, dtype=torch.float32)).shape == (5, 3)
    for bad in ({"num_features": 0}, {"num_features": 3, "eps": -1}):
        with pytest.raises(ValueError, match="num_features|eps"):
            FrozenBatchNorm(**bad)
    with pytest.raises(ValueError, match="cannot convert"):
        freeze_bn_layers(nn.Sequential(nn.Conv2d(1, 1, 1)), names=["0"])


def test_shared_module_replaced_everywhere():
    bn = nn.BatchNorm2d(2)
    model = nn.ModuleDict({"a": nn.Sequential(bn), "b": nn.Sequential(bn)})
    rep = freeze_bn_layers(model)
    assert list(rep.converted) == ["a.0"] and model["a"][0] is model["b"][0] and isinstance(model["a"][0], FrozenBatchNorm)


def test_rebuild_optimizer_param_groups_keeps_state_and_schedule():
    from detectron2.solver.lr_scheduler import LRMultiplier
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    from d2norm.solver import get_optimizer_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    opt = torch.optim.SGD(get_optimizer_params(model, base_lr=0.1, weight_decay_norm=0.0), lr=0.1, momentum=0.9)
    sched = LRMultiplier(opt, MultiStepParamScheduler([1, 0.1], milestones=[2], num_updates=4), max_iter=4)
    for _ in range(3):
        opt.zero_grad()
        model(_x(n=2, c=3, dtype=torch.float32)).sum().backward()
        opt.step()
        sched.step()
    conv_w = model[0].weight
    mom = opt.state[conv_w]["momentum_buffer"].clone()
    freeze_bn_layers(model, trainable_affine=False)
    fresh = torch.optim.SGD(get_optimizer_params(model, base_lr=0.1, weight_decay_norm=0.0), lr=0.1, momentum=0.9)
    H.rebuild_optimizer_param_groups(opt, fresh.param_groups, sched)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad} and len(ids) == 4
    assert torch.equal(opt.state[conv_w]["momentum_buffer"], mom)
    assert len(opt.state) == 4
    assert all(abs(g["lr"] - 0.01) < 1e-12 for g in opt.param_groups)  # the schedule's current multiplier
    assert sched.base_lrs == [0.1] * len(opt.param_groups)
    sched.step()
    assert all(abs(g["lr"] - 0.01) < 1e-12 for g in opt.param_groups)


def test_cfg_validation(d2cfg):
    H.check_frozen_bn_switch_cfg(d2cfg)
    c = d2cfg
    c.SOLVER.MAX_ITER = 10
    c.D2NORM.FROZEN_BN_SWITCH.ENABLED = True
    for key, val, match in (
        ("ITER", -1, "ITER must be an integer >= 0"), ("ITER", 2.5, "got 2.5"),
        ("WARMUP_FACTOR", 0.0, "WARMUP_FACTOR must be a number in \\(0, 1\\], got 0.0"),
        ("WARMUP_ITERS", 1.5, "WARMUP_ITERS must be an integer >= 0"), ("TRAINABLE_AFFINE", "yes", "'yes'"),
        ("LAYERS", ["("], "not a valid regular expression"),
    ):
        old = c.D2NORM.FROZEN_BN_SWITCH[key]
        c.D2NORM.FROZEN_BN_SWITCH[key] = val
        with pytest.raises(ValueError, match=match):
            H.check_frozen_bn_switch_cfg(c)
        c.D2NORM.FROZEN_BN_SWITCH[key] = old


# ---- Trainer runs ------------------------------------------------------------------------------------------
def _cfg(tmp_path, trainable=True, max_iter=4, extra=()):
    return tiny_retinanet_training_cfg(tmp_path, max_iter, checkpoint_period=1, opts=[
        "D2NORM.FROZEN_BN_SWITCH.ENABLED", True, "D2NORM.FROZEN_BN_SWITCH.ITER", 2,
        "D2NORM.FROZEN_BN_SWITCH.TRAINABLE_AFFINE", trainable, "D2NORM.FROZEN_BN_SWITCH.WARMUP_ITERS", 2,
        "D2NORM.FROZEN_BN_SWITCH.WARMUP_FACTOR", 0.5,
        "D2NORM.PRECISE_BN.NUM_SAMPLES", 4, "D2NORM.PRECISE_BN.BATCH_SIZE", 2, *extra,
    ])


def _assert_optimizer_is_model(trainer):
    net = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    opt_ids = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(opt_ids) == len(set(opt_ids))
    assert set(opt_ids) == {id(p) for p in net.parameters() if p.requires_grad}
    assert all(id(p) in set(opt_ids) for p in trainer.optimizer.state)


def _frozen(model):
    return [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, FrozenBatchNorm))]


@pytest.mark.slow
@pytest.mark.parametrize("trainable", [True, False])
def test_trainer_switch(tmp_path, trainable):
    from d2norm.engine import Trainer

    trainer = Trainer(_cfg(tmp_path, trainable))
    hook = [h for h in trainer._hooks if isinstance(h, H.FrozenBNSwitchHook)][0]
    x = torch.rand(1, 3, 64, 64) * 255
    seen = {}
    orig = hook.switch

    def spy():
        m = trainer.model
        m.eval()
        with torch.no_grad():
            before_pbn = m.backbone.bottom_up.stem.conv1.norm.running_var.clone()
        orig_pbn = hook.precise_bn

        def pbn():
            out = orig_pbn()
            m.eval()
            with torch.no_grad():  # pre-switch eval output, with the PreciseBN statistics
                seen["eval"] = {k: v.clone() for k, v in m.backbone((x - m.pixel_mean) / m.pixel_std).items()}
            m.train()
            return out

        hook.precise_bn = pbn
        m.train()
        orig()
        seen["pbn_changed"] = not torch.equal(before_pbn, m.backbone.bottom_up.stem.conv1.norm.running_var)
        with torch.no_grad():  # train mode: FrozenBN is the same map
            seen["frozen"] = m.backbone((x - m.pixel_mean) / m.pixel_std)
        seen["params"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        seen["frozen_state"] = {k: v.clone() for k, v in m.state_dict().items() if "norm" in k}

    hook.switch = spy
    import logging

    class _Keep(logging.Handler):
        def emit(self, record):
            seen.setdefault("log", []).append(record.getMessage())

    keep, lg = _Keep(), logging.getLogger("d2norm.engine")  # the hook and the trainer surgery it runs
    level = lg.level
    lg.addHandler(keep)
    lg.setLevel(logging.INFO)
    try:
        trainer.train()
    finally:
        lg.removeHandler(keep)
        lg.setLevel(level)
    assert hook.switched and hook.switched_at == 2
    # the log counts tensors and their values, not "parameters" (a tensor is not one parameter)
    msg = [m for m in seen["log"] if m.startswith("FrozenBN switch:")]
    n_after = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    v_after = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert len(msg) == 1 and f"trainable parameter tensors " in msg[0] and f"-> {n_after} (" in msg[0], msg
    assert f"-> {v_after} values)" in msg[0], msg
    model = trainer.model
    assert len(_frozen(model)) == len(hook.converted) == 31  # 21 backbone + 5 per-level BNs x 2 subnets
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert seen["pbn_changed"]  # PreciseBN ran before the switch
    for k in seen["eval"]:
        torch.testing.assert_close(seen["frozen"][k], seen["eval"][k], rtol=1e-4, atol=1e-4)
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    _assert_optimizer_is_model(trainer)
    # LR re-warm-up: factor 0.5 at the switch, 0.75 one iteration later, then the schedule's LR
    lrs = dict((it, v) for v, it in trainer.storage.history("lr").values())
    assert lrs[0] == lrs[1] == pytest.approx(0.001)
    assert lrs[2] == pytest.approx(0.0005) and lrs[3] == pytest.approx(0.00075)
    # affine trainable or not
    frozen_affine = [m for m in _frozen(model) if isinstance(m, FrozenBatchNorm)]
    params_after = dict(model.named_parameters())
    if trainable:
        assert frozen_affine and all(m.weight.requires_grad for m in frozen_affine)
        name = "backbone.bottom_up.stem.conv1.norm.weight"
        assert not torch.equal(params_after[name], seen["params"][name])  # γ trained after the switch
    else:
        assert not frozen_affine
        assert not any(".norm." in n for n in params_after)
    # statistics never move after the switch (and frozen γ/β neither)
    state = model.state_dict()
    for k, v in seen["frozen_state"].items():
        if k.endswith(("running_mean", "running_var")) or not trainable:
            assert torch.equal(state[k], v), k


@pytest.mark.slow
def test_checkpoints_before_and_after_switch_resume(tmp_path):
    from d2norm.engine import Trainer

    cfg = _cfg(tmp_path, trainable=False)
    first = Trainer(cfg)
    first.train()
    out = tmp_path / "out"
    for ck, converted, start in (("model_0000002.pth", True, 3), ("model_0000001.pth", False, 2)):
        (out / "last_checkpoint").write_text(ck)
        t = Trainer(cfg)
        t.resume_or_load(resume=True)
        assert t.start_iter == start
        assert len(_frozen(t.model)) == (31 if converted else 0)
        saved = torch.load(out / ck, weights_only=False)
        state = t.model.state_dict()
        assert set(saved["model"]) == set(state)
        assert all(torch.equal(saved["model"][k], state[k]) for k in state)
        _assert_optimizer_is_model(t)
        # detectron2 v0.6 checkpoints the LR scheduler (hooks) but not the optimizer: the scheduler's base LRs
        # (one per param group) must fit the converted optimizer's groups
        saved_sched = saved["trainer"]["hooks"]["LRScheduler"]
        assert t.scheduler.base_lrs == saved_sched["base_lrs"]
        assert len(t.scheduler.base_lrs) == len(t.optimizer.param_groups)
        assert saved["trainer"]["hooks"]["FrozenBNSwitchHook"]["switched"] is converted
        # --eval-only / tools: a freshly built model loads the same checkpoint through the same checkpointer class
        assert isinstance(t.checkpointer, D2NormCheckpointer)
        fresh = Trainer.build_model(cfg)
        D2NormCheckpointer(fresh).load(str(out / ck))
        assert len(_frozen(fresh)) == (31 if converted else 0)
        assert all(torch.equal(saved["model"][k], v) for k, v in fresh.state_dict().items())
        assert set(fresh.state_dict()) == set(saved["model"])
        t.train()
        assert len(_frozen(t.model)) == 31
        _assert_optimizer_is_model(t)
        lrs = dict((it, v) for v, it in t.storage.history("lr").values())
        assert lrs[3] == pytest.approx(0.00075)  # the re-warm-up continues across the resume
        losses = [v for v, _ in t.storage.history("total_loss").values()]
        assert len(losses) == 4 - start and all(torch.isfinite(torch.tensor(v)) for v in losses)


# ---- 2 processes -------------------------------------------------------------------------------------------
def _dist_worker(rank, world, cfg):
    from d2norm.engine import Trainer

    torch.manual_seed(rank)  # different per-rank EMAs before the switch are made identical by it
    trainer = Trainer(cfg)
    old = trainer.model
    trainer.train()
    net = trainer.model.module
    _assert_optimizer_is_model(trainer)
    return {
        "rebuilt": trainer.model is not old,
        "frozen": len(_frozen(net)),
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        # detectron2 writes the losses on the main process only
        "losses": [v for v, _ in trainer.storage.history("total_loss").values()] if rank == 0 else None,
        "monitor": [k for k in trainer.storage.histories() if k.startswith("bn_monitor/")],
    }


@pytest.mark.slow
def test_two_process_switch_keeps_ranks_identical(tmp_path):
    cfg = _cfg(tmp_path, trainable=False, extra=[
        "SOLVER.IMS_PER_BATCH", 4, "SOLVER.CHECKPOINT_PERIOD", 1000, "D2NORM.BN_MONITOR.ENABLED", True,
        "D2NORM.BN_MONITOR.PERIOD", 3, "D2NORM.BN_MONITOR.NUM_BATCHES", 1, "D2NORM.BN_MONITOR.LAYERS", ["stem"],
    ])
    r0, r1 = run_distributed(_dist_worker, world_size=2, args=(cfg,), timeout=300)
    assert r0["rebuilt"] and r1["rebuilt"]  # frozen γ/β changed the parameter set: DDP rebuilt
    assert r0["frozen"] == r1["frozen"] == 31
    assert set(r0["state"]) == set(r1["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert len(r0["losses"]) == 4 and all(torch.isfinite(torch.tensor(v)) for v in r0["losses"])
    assert r0["monitor"] and sorted(r0["monitor"]) == sorted(r1["monitor"])


def test_cpu_config_parses_and_enables_switch():
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    cfg = add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, "cpu", "retinanet_R18_frozenbn_switch.yaml"))
    c = cfg.D2NORM.FROZEN_BN_SWITCH
    assert c.ENABLED and c.ITER == int(0.8 * cfg.SOLVER.MAX_ITER) and c.WARMUP_ITERS > 0 and c.TRAINABLE_AFFINE
    H.check_frozen_bn_switch_cfg(cfg)
