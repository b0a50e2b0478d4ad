"""D2NormCheckpointer: a checkpoint written after the FrozenBN switch (rethinking §4.3) loads into a freshly built
model (inference) and into a training run (the switch hook converts the trainer); one rule finds the hook state."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from d2norm.engine.checkpoint import D2NormCheckpointer
from d2norm.engine.hooks import FrozenBNSwitchHook
from d2norm.layers.frozen import FrozenBatchNorm, freeze_bn_layers


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return net


def _checkpoint(tmp_path, hook_key, switched, layers, trainable_affine):
    """A checkpoint as a run converted at ``layers`` writes it (model + the switch hook's state)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    trained = _net(seed=1)
    if switched:
        freeze_bn_layers(trained, trainable_affine=trainable_affine, names=layers)
    state = {"switched": switched, "switched_at": 5 if switched else None, "layers": layers if switched else [],
             "trainable_affine": trainable_affine}
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("ck", trainer={"hooks": {hook_key: state}})
    return trained, str(tmp_path / "ck.pth")


@pytest.mark.parametrize("trainable_affine", [True, False])
def test_inference_load_of_post_switch_checkpoint(tmp_path, trainable_affine):
    trained, path = _checkpoint(tmp_path, "FrozenBNSwitchHook", True, ["1"], trainable_affine)
    model = _net(seed=2)
    D2NormCheckpointer(model).load(path)
    assert type(model[1]) is (FrozenBatchNorm if trainable_affine else FrozenBatchNorm2d)
    assert isinstance(model[4], nn.BatchNorm2d)  # not recorded as converted: untouched
    ref, got = trained.state_dict(), model.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.randn(2, 3, 6, 6)
    trained.eval(), model.eval()
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def test_pre_switch_checkpoint_loads_unconverted(tmp_path):
    trained, path = _checkpoint(tmp_path, "FrozenBNSwitchHook", False, ["1"], True)
    model = _net(seed=2)
    assert D2NormCheckpointer(model).prepare_model(torch.load(path, weights_only=False)) is False
    D2NormCheckpointer(model).load(path)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())


class _Trainer:
    pass


def test_attached_hook_converts_the_trainer_under_its_own_key(tmp_path):
    """The attached hook (here a subclass, whose state detectron2 stores under the subclass's __qualname__) is
    asked to convert the trainer; the model-only conversion is not applied a second time."""

    class MySwitch(FrozenBNSwitchHook):
        pass

    _, path = _checkpoint(tmp_path, MySwitch.__qualname__, True, ["1", "4"], True)
    model, trainer, calls = _net(seed=2), _Trainer(), []
    hook = MySwitch(switch_iter=5)

    def convert(t, state):
        calls.append((t, dict(state)))
        freeze_bn_layers(model, True, names=state["layers"])
        hook.switched = True

    hook.convert_for_checkpoint = convert
    ck = D2NormCheckpointer(model)
    hook.attach_checkpointer(trainer, ck)
    ck.load(path)
    assert len(calls) == 1 and calls[0][0] is trainer and calls[0][1]["layers"] == ["1", "4"]
    assert type(model[1]) is FrozenBatchNorm and type(model[4]) is FrozenBatchNorm
    ck.load(path)  # already switched: no second conversion
    assert len(calls) == 1
    # inference (no hook attached): the subclass's state is found too
    fresh = _net(seed=2)
    D2NormCheckpointer(fresh).load(path)
    assert type(fresh[1]) is FrozenBatchNorm and type(fresh[4]) is FrozenBatchNorm
    # a checkpoint keyed by another hook class is not this hook's state
    _, other = _checkpoint(tmp_path / "o", "FrozenBNSwitchHook", True, ["1"], True)
    assert D2NormCheckpointer(_net()).frozen_bn_switch_state(torch.load(other, weights_only=False)) is not None
    assert ck.frozen_bn_switch_state(torch.load(other, weights_only=False)) is None


def test_attach_to_a_plain_checkpointer_is_an_error():
    with pytest.raises(TypeError, match="needs a d2norm.engine.checkpoint.D2NormCheckpointer.*got DetectionCheckpointer"):
        FrozenBNSwitchHook(3).attach_checkpointer(_Trainer(), DetectionCheckpointer(_net()))
