"""CONTRIBUTING "Adding a hook": a hook module that declares its cfg node, plus one row in
``d2norm.engine.hooks.HOOKS``, is a cfg key with its default, checked once at launch (naming the key) and built by
the trainer in the table's order, with no edit to config.py, trainer.py or the checkpointer."""
import types

import pytest
from detectron2.config import get_cfg
from detectron2.engine.train_loop import HookBase

from d2norm import options
from d2norm.config import add_d2norm_config
from d2norm.engine import hooks as hooks_pkg
from d2norm.engine.hooks import HookEntry, build_hooks, check_hooks_cfg
from d2norm.engine.trainer import validate_launch


class CountStepsHook(HookBase):
    def __init__(self, period):
        self.period, self.seen = period, 0

    def after_step(self):
        self.seen += 1


@pytest.fixture
def my_hook(monkeypatch):
    """The hook "module" (its node declared as a hook module does) and its table row, removed afterwards."""
    node = options.declare_node("MY_HOOK", (
        options.Option("ENABLED", False, "Count steps.", check=options.Bool()),
        options.Option("PERIOD", 10, "Every PERIOD iterations.", check=options.Int(1)),
    ), doc="an example hook")

    def check(cfg):
        options.check_node(cfg, "MY_HOOK")

    def build(cfg, trainer):
        return CountStepsHook(cfg.D2NORM.MY_HOOK.PERIOD)

    row = HookEntry("MY_HOOK", build, check)
    # after PreciseBN, before the non-finite report (the last row)
    monkeypatch.setattr(hooks_pkg, "HOOKS", hooks_pkg.HOOKS[:-1] + (row,) + hooks_pkg.HOOKS[-1:])
    yield node
    options._NODES.pop("MY_HOOK", None)


def _trainer_stub():
    import torch

    return types.SimpleNamespace(model=torch.nn.Linear(2, 2), build_train_loader=None)


def test_a_hook_is_one_module_and_one_table_row(my_hook, tmp_path):
    cfg = add_d2norm_config(get_cfg())
    assert cfg.D2NORM.MY_HOOK.PERIOD == 10 and cfg.D2NORM.MY_HOOK.ENABLED is False
    built = build_hooks(cfg, _trainer_stub())
    assert not any(isinstance(h, CountStepsHook) for h in built)  # off by default
    cfg.merge_from_list(["D2NORM.MY_HOOK.ENABLED", "True", "D2NORM.MY_HOOK.PERIOD", "3"])
    built = build_hooks(cfg, _trainer_stub())
    names = [type(h).__name__ for h in built]
    assert names == ["CountStepsHook", "NonFiniteStatsHook"] and built[0].period == 3


def test_a_hooks_bad_option_fails_at_launch_naming_the_key(my_hook, tmp_path):
    cfg = add_d2norm_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.D2NORM.MY_HOOK.PERIOD = 0
    cfg.freeze()
    args = types.SimpleNamespace(eval_only=False, resume=False, overwrite=False)
    with pytest.raises(ValueError, match=r"D2NORM.MY_HOOK.PERIOD must be an integer >= 1, got 0"):
        validate_launch(cfg, args, world_size=1)
    with pytest.raises(ValueError, match=r"D2NORM.MY_HOOK.PERIOD"):
        check_hooks_cfg(cfg)  # the check that validate_launch runs, once per frozen cfg that passed


def test_checks_run_once_per_launch(monkeypatch, tmp_path):
    """validate_launch checks the hooks; the trainer's hook building then reuses that result (one check per
    hook per launch), while a cfg that is not frozen is checked every time."""
    calls = []
    row = HookEntry("PRECISE_BN", hooks_pkg.HOOKS[2].build, lambda cfg: calls.append(1))
    monkeypatch.setattr(hooks_pkg, "HOOKS", (row,))
    cfg = add_d2norm_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    check_hooks_cfg(cfg)
    check_hooks_cfg(cfg)
    assert len(calls) == 2  # not frozen: may have changed in between
    cfg.freeze()
    validate_launch(cfg, types.SimpleNamespace(eval_only=False, resume=False, overwrite=False), world_size=1)
    check_hooks_cfg(cfg)
    assert len(calls) == 3
