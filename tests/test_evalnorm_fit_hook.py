"""EvalNorm offline fitting hook (evalnorm §3.4 "Offline estimation"): only α̂, β̂ change, at the configured
iteration, with the event-storage record; cfg validation."""
import pytest
import torch

import d2norm.engine.hooks as H
from d2norm.layers.evalnorm import EvalNorm2d

from helpers import tiny_retinanet_training_cfg


def test_cfg_validation(d2cfg):
    H.check_evalnorm_fit_cfg(d2cfg)
    d2cfg.SOLVER.MAX_ITER = 10
    d2cfg.D2NORM.EVALNORM_FIT.ENABLED = True
    for key, val, match in (("ITER", 0, "ITER must be an integer >= 1, or -1 .* got 0"), ("ITER", -3, "got -3"),
                            ("BATCH_SIZE", -1, "BATCH_SIZE must be an integer >= 0"),
                            ("SET_OFFLINE_MODE", "no", "True or False")):
        old = d2cfg.D2NORM.EVALNORM_FIT[key]
        d2cfg.D2NORM.EVALNORM_FIT[key] = val
        with pytest.raises(ValueError, match=match):
            H.check_evalnorm_fit_cfg(d2cfg)
        d2cfg.D2NORM.EVALNORM_FIT[key] = old
    d2cfg.D2NORM.EVALNORM.OFFLINE_LR = 0.0
    with pytest.raises(ValueError, match="OFFLINE_LR must be a number > 0, got 0.0"):
        H.check_evalnorm_fit_cfg(d2cfg)


class _FakeTrainer:
    def __init__(self, max_iter):
        self.iter, self.max_iter = 0, max_iter


@pytest.mark.parametrize("fit_iter,max_iter,expected", [(-1, 5, [5]), (2, 5, [2]), (5, 5, [5])])
def test_runs_after_the_configured_iteration(fit_iter, max_iter, expected):
    hook = H.EvalNormFitHook([], fit_iter, num_iters=1, lr=0.1)
    hook.trainer = _FakeTrainer(max_iter)
    runs = []
    hook.fit = lambda final=False: runs.append((hook.trainer.iter + 1, final))
    for it in range(max_iter):
        hook.trainer.iter = it
        hook.after_step()
    assert [r[0] for r in runs] == expected
    assert runs[0][1] == (expected[0] == max_iter)


@pytest.mark.slow
def test_hook_changes_only_alpha_beta(tmp_path):
    from d2norm.engine import Trainer

    cfg = tiny_retinanet_training_cfg(tmp_path, 3, opts=[
        "MODEL.RESNETS.NORM", "EvalNorm", "D2NORM.EVALNORM.MODE", "rule", "D2NORM.EVALNORM.RULE_BATCH_SIZE", 2,
        "D2NORM.EVALNORM_FIT.ENABLED", True, "D2NORM.EVALNORM_FIT.BATCH_SIZE", 2,
        "D2NORM.EVALNORM.OFFLINE_ITERS", 3, "D2NORM.EVALNORM.OFFLINE_LR", 0.2,
    ])
    trainer = Trainer(cfg)
    hook = [h for h in trainer._hooks if isinstance(h, H.EvalNormFitHook)][0]
    assert hook.num_iters == 3 and hook.lr == 0.2 and hook.fit_iter == -1
    seen = {}
    orig = hook.fit

    def spy(final=False):
        m = trainer.model
        seen["iter"] = trainer.iter + 1
        seen["state"] = {k: v.clone() for k, v in m.state_dict().items()}
        seen["flags"] = [(mod.training, ) for mod in m.modules()]
        seen["req"] = [p.requires_grad for p in m.parameters()]
        seen["rng"] = torch.get_rng_state()
        res = orig(final)
        seen["rng_after"] = torch.get_rng_state()
        return res

    hook.fit = spy
    trainer.train()
    model = trainer.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, EvalNorm2d)}
    assert len(layers) == 21 and seen["iter"] == 3
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], seen["state"][k])}
    allowed = {f"{n}.{p}" for n in layers for p in ("alpha_logit", "beta_logit")}
    assert changed and changed <= allowed, changed - allowed
    assert seen["flags"] == [(mod.training,) for mod in model.modules()]
    assert seen["req"] == [p.requires_grad for p in model.parameters()]
    assert torch.equal(seen["rng"], seen["rng_after"])  # training RNG stream untouched
    res = hook.last_result
    assert len(res["losses"]) == 3 and all(torch.isfinite(torch.tensor(v)) for v in res["losses"])
    hist = trainer.storage.histories()
    assert hist["evalnorm_fit/loss_last"].latest() == pytest.approx(res["losses"][-1])
    name = "backbone.bottom_up.stem.conv1.norm"
    a = float(torch.sigmoid(layers[name].alpha_logit))
    assert hist[f"evalnorm_fit/{name}/alpha"].latest() == pytest.approx(a)
    assert all(m.mode == "offline" for m in layers.values())  # SET_OFFLINE_MODE after the final fit
