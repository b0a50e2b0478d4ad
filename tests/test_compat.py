"""Each d2norm.compat shim: applied exactly when its gap exists, and the gap is closed."""
import importlib
import inspect
import os
import sys

import pytest
import torch

from d2norm import compat


def test_compiled_ops_stand_in():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    from detectron2.utils.collect_env import collect_env_info

    boxes = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]])
    if compat.HAS_COMPILED_OPS:
        assert not compat.APPLIED["compiled_ops"]
        assert pairwise_iou_rotated(boxes, boxes).item() == pytest.approx(1.0, abs=1e-5)
        return
    with pytest.raises(NotImplementedError, match=r"detectron2\._C\.box_iou_rotated .*compiled detectron2"):
        pairwise_iou_rotated(boxes, boxes)
    if compat.APPLIED["compiled_ops"]:
        # compat's stand-in is not left behind: detectron2's collect_env still sees "not built".
        assert "detectron2._C" not in sys.modules
        with pytest.raises(ImportError):
            importlib.import_module("detectron2._C")
        assert "not built correctly" in collect_env_info()
    else:
        # The installer's distribution ships the stand-in; collect_env says what it is.
        assert sys.modules["detectron2._C"].D2NORM_STAND_IN >= 1
        assert "without its C++ extension" in collect_env_info()


def test_fast_coco_eval_falls_back_to_pycocotools():
    import detectron2.evaluation.coco_evaluation as ce
    from pycocotools.cocoeval import COCOeval

    assert (ce.COCOeval_opt is COCOeval) == (not compat.HAS_COMPILED_OPS)


def _detectron2_file(*parts):
    import detectron2

    with open(os.path.join(os.path.dirname(detectron2.__file__), *parts)) as f:
        return f.read()


def test_pil_linear():
    from PIL import Image
    from detectron2.data.transforms import ExtentTransform

    # Applied exactly when detectron2's own transform.py still names Image.LINEAR (Pillow >= 10 is installed).
    assert compat.APPLIED["pil_linear"] == ("Image.LINEAR" in _detectron2_file("data", "transforms", "transform.py"))
    t = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
    assert t.interp == Image.BILINEAR
    img = (torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy()
    assert t.apply_image(img).shape == (4, 4, 3)


def test_pkg_resources_stand_in_not_leaked():
    from detectron2 import model_zoo

    gap = importlib.util.find_spec("pkg_resources") is None and "\nimport pkg_resources\n" in _detectron2_file(
        "model_zoo", "model_zoo.py")
    assert compat.APPLIED["pkg_resources"] == gap
    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert path.endswith("retinanet_R_50_FPN_1x.yaml") and os.path.isfile(path)
    mod = sys.modules.get("pkg_resources")
    assert mod is None or hasattr(mod, "require"), "d2norm's pkg_resources stand-in leaked into sys.modules"


def test_shims_are_inert_once_gap_is_closed():
    # Re-applying a shim where the gap no longer exists does nothing: the feature detection that keeps
    # compat inert where detectron2 itself has no gap.
    assert compat._shim_pil_linear() is False
    assert compat._shim_cpu_launch() is False
    assert compat._shim_cpu_ddp() is False
    assert compat._shim_retinanet_norm_probe() is False
    assert compat._shim_trainer_state() is False
    import detectron2.model_zoo  # noqa: F401

    assert compat._shim_pkg_resources() is False


def test_launch_worker_and_ddp_on_cpu():
    """cpu_launch is applied exactly when detectron2's worker asserts CUDA (v0.6; upstream picks gloo itself);
    cpu_ddp exactly when create_ddp_model passes device_ids for every module (v0.6 and upstream main)."""
    import detectron2.engine.defaults as defaults

    launch_mod = importlib.import_module("detectron2.engine.launch")
    worker = launch_mod._distributed_worker
    if compat.APPLIED["cpu_launch"]:
        assert worker is compat._distributed_worker
    else:
        assert worker is not compat._distributed_worker
        assert "assert torch.cuda.is_available()" not in inspect.getsource(worker)
        assert '"GLOO"' in inspect.getsource(worker)  # the gap is closed upstream: gloo without CUDA
    ddp = defaults.create_ddp_model
    original = getattr(ddp, "__wrapped__", ddp)
    gap = 'kwargs["device_ids"] = [comm.get_local_rank()]' in inspect.getsource(original)
    assert compat.APPLIED["cpu_ddp"] == gap == getattr(ddp, "_d2norm_compat", False)


def test_retinanet_head_accepts_grouped_norms():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from torch import nn

    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16)]
    head = RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=9, conv_dims=[64, 64], norm="GN")
    gns = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 4 and all(g.num_channels == 64 and g.num_groups == 32 for g in gns)


def _plus_one(x):
    return x + 1


def test_no_jit_deprecation_warnings_on_import(tmp_path):
    """``import d2norm`` (and the engine/tools modules) prints no ``torch.jit.script`` FutureWarning from
    fvcore / detectron2's import-time scripting, while a user's own ``torch.jit.script`` still warns as torch
    decides (the filter is not left installed)."""
    import subprocess
    import sys

    code = (
        "import sys, warnings; warnings.simplefilter('always')\n"
        "import d2norm, d2norm.engine, d2norm.stats\n"
        "from d2norm.engine import Trainer\n"
        "import detectron2.modeling, fvcore.nn\n"
        "sys.stderr.write('IMPORTED\\n'); sys.stderr.flush()\n"
        "import torch\n"
        "def f(x):\n    return x + 1\n"
        "torch.jit.script(f)\n"
    )
    script = tmp_path / "user.py"  # TorchScript needs the source file
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "IMPORTED" in res.stderr, res.stderr[-3000:]
    before, _, after = res.stderr.partition("IMPORTED")
    msg = "torch.jit.script` is deprecated"
    assert msg not in before, before
    import torch

    import warnings as _w

    with _w.catch_warnings(record=True) as caught:  # does this torch deprecate jit.script at all?
        _w.simplefilter("always")
        torch.jit.script(_plus_one)
    if any(msg in str(w.message) for w in caught):
        assert msg in after, after  # the user's own call is not silenced
