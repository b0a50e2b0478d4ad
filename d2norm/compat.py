"""Make detectron2 v0.6 (Python-only install) run on today's torch / Pillow / setuptools, and on CPU/gloo.

Every shim below closes one gap that was verified on this stack, is applied only when that gap exists in the
detectron2 that is imported (detected from detectron2's own code, not from the version number or from CUDA), and
is recorded in :data:`APPLIED`. Together with :func:`d2norm.layers.install` (the norm registry hook) this is the
only code in d2norm that patches detectron2.

Which gap exists where (v0.6 = the distribution ``scripts/install.sh`` builds; "other v0.6" = a Python-only v0.6
installed some other way; upstream = detectron2 main built with its C++ ops, tested at commit 02b5c4e2):

``compiled_ops`` (other v0.6)
    ``detectron2/layers/__init__.py`` (deformable conv, rotated boxes, RoIAlignRotated) and
    ``evaluation/fast_eval_api.py`` do ``from detectron2 import _C`` at import time. The installer's v0.6 ships a
    ``detectron2/_C.py`` stand-in (any import order works); without one, we import those modules against the
    same kind of stand-in (every op raises ``NotImplementedError`` naming it), then remove it again so
    ``collect_env`` still reports "not built".
``fast_coco_eval`` (v0.6, other v0.6)
    ``COCOEvaluator(use_fast_impl=True)`` (the default) needs the compiled ``_C``; without it COCO evaluation uses
    pycocotools' ``COCOeval`` (exactly what ``use_fast_impl=False`` does).
``pil_linear`` (other v0.6)
    v0.6's ``data/transforms/transform.py`` uses ``PIL.Image.LINEAR`` as a default argument; Pillow >= 10 removed
    the alias (the installer's v0.6 and upstream use ``Image.BILINEAR``). We restore it as ``Image.BILINEAR`` (the
    value it always had). Pillow itself is not downgraded.
``pkg_resources`` (upstream, other v0.6)
    ``model_zoo/model_zoo.py`` imports ``pkg_resources`` (gone in setuptools >= 81; the installer's v0.6 has a
    fallback). It is imported against a minimal stand-in providing ``resource_filename``; the stand-in is not
    left in ``sys.modules``. Importing ``detectron2.model_zoo`` *before* d2norm on such a detectron2 fails in
    detectron2 itself (README: import order).
``cpu_launch`` (v0.6, other v0.6)
    v0.6's ``launch`` asserts CUDA and uses NCCL. On a machine without CUDA the worker uses gloo, as
    detectron2 main does, so ``--num-gpus N`` runs N CPU processes.
``cpu_ddp`` (v0.6, other v0.6, upstream)
    ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which DDP rejects for CPU modules.
``jit_script_warning`` (v0.6, other v0.6, upstream: a torch >= 2.10 matter)
    ``fvcore/nn/focal_loss.py`` and ``modeling/box_regression.py`` call ``torch.jit.script`` at import time,
    which torch >= 2.10 answers with a ``FutureWarning`` per call and process (two per process, per rank with
    ``--num-gpus``). Those imports run here with that one warning filtered; the filter is removed afterwards,
    so a user's own ``torch.jit.script`` still warns.
``retinanet_norm_probe`` (v0.6, other v0.6)
    v0.6's ``RetinaNetHead`` calls ``get_norm(norm, 1)`` just to log the norm's type name, so any grouped norm
    (detectron2's own "GN", d2norm's "BGN") fails there for 1 channel; upstream probes with 32 channels. The
    retinanet module's ``get_norm`` maps that probe to 32 channels (a real 1-channel head conv does not exist).
``trainer_state`` (v0.6, other v0.6)
    v0.6's ``DefaultTrainer`` does not checkpoint its ``SimpleTrainer`` (optimizer state: SGD momentum, AMP grad
    scaler), so ``--resume`` silently restarted momentum. We add ``state_dict``/``load_state_dict`` exactly as
    upstream has them (key ``"_trainer"``).
"""
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import types
import warnings
from datetime import timedelta
from typing import Dict

__all__ = ["HAS_COMPILED_OPS", "APPLIED"]

logger = logging.getLogger(__name__)

#: name of each shim -> whether it was applied in this process
APPLIED: Dict[str, bool] = {}


def _stand_in_module(name: str) -> types.ModuleType:
    """A fresh module ``name`` from :mod:`d2norm.compiled_ops_stand_in` (the installer's ``detectron2/_C.py``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled_ops_stand_in.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled_ops_available() -> bool:
    try:
        spec = importlib.util.find_spec("detectron2._C")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    try:
        module = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return not hasattr(module, "D2NORM_STAND_IN")


def _compiled_ops_importable() -> bool:
    """``from detectron2 import _C`` works (compiled, or the installer's stand-in)."""
    return "detectron2._C" in sys.modules


#: detectron2's compiled ops are really there (not the installer's ``_C`` stand-in, not compat's)
HAS_COMPILED_OPS: bool = _compiled_ops_available()


def _with_temporary_module(name: str, module: types.ModuleType, to_import, parent=None, attr=None):
    """Import ``to_import`` while ``sys.modules[name]`` is ``module``; leave no trace of ``module`` after."""
    sys.modules[name] = module
    if parent is not None:
        setattr(parent, attr, module)
    try:
        for m in to_import:
            importlib.import_module(m)
    finally:
        sys.modules.pop(name, None)
        if parent is not None and getattr(parent, attr, None) is module:
            delattr(parent, attr)


def _shim_compiled_ops():
    if _compiled_ops_importable():
        return False
    import detectron2

    stand_in = _stand_in_module("detectron2._C")
    _with_temporary_module(
        "detectron2._C",
        stand_in,
        ["detectron2.layers", "detectron2.evaluation.fast_eval_api"],
        parent=detectron2,
        attr="_C",
    )
    return True


def _shim_fast_coco_eval():
    if HAS_COMPILED_OPS:
        return False
    from pycocotools.cocoeval import COCOeval

    import detectron2.evaluation.coco_evaluation as coco_evaluation

    # COCOEvaluator picks `COCOeval_opt if use_fast_impl else COCOeval`; both now mean pycocotools.
    coco_evaluation.COCOeval_opt = COCOeval
    return True


def _detectron2_source(*relpath: str) -> str:
    """Text of a detectron2 source file, read without importing it (importing may be what fails)."""
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), *relpath)
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _shim_pil_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR") or "Image.LINEAR" not in _detectron2_source("data", "transforms", "transform.py"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


def _resource_filename(package: str, resource: str) -> str:
    mod = importlib.import_module(package)
    return os.path.join(os.path.dirname(mod.__file__), resource)


def _shim_pkg_resources():
    if importlib.util.find_spec("pkg_resources") is not None or "detectron2.model_zoo" in sys.modules:
        return False
    if "\nimport pkg_resources\n" not in _detectron2_source("model_zoo", "model_zoo.py"):
        return False
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = _resource_filename
    stand_in.__doc__ = "d2norm stand-in for setuptools' pkg_resources (only resource_filename)."
    _with_temporary_module("pkg_resources", stand_in, ["detectron2.model_zoo"])
    return True


def _distributed_worker(
    local_rank,
    main_func,
    world_size,
    num_gpus_per_machine,
    machine_rank,
    dist_url,
    args,
    timeout=timedelta(minutes=30),
):
    """detectron2 main's worker: NCCL with CUDA, gloo without (v0.6 asserts CUDA)."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    has_gpu = torch.cuda.is_available()
    if has_gpu:
        assert num_gpus_per_machine <= torch.cuda.device_count()
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="NCCL" if has_gpu else "GLOO",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: %s", dist_url)
        raise

    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        pg = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    if has_gpu:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)


def _shim_cpu_launch():
    # `detectron2.engine` re-exports the function `launch`, which shadows the submodule attribute.
    launch_mod = importlib.import_module("detectron2.engine.launch")
    src = inspect.getsource(launch_mod._distributed_worker)
    if "assert torch.cuda.is_available()" not in src:
        return False
    launch_mod._distributed_worker = _distributed_worker
    return True


def _shim_cpu_ddp():
    defaults = importlib.import_module("detectron2.engine.defaults")
    original = defaults.create_ddp_model
    if getattr(original, "_d2norm_compat", False):
        return False
    src = inspect.getsource(original)
    if 'kwargs["device_ids"] = [comm.get_local_rank()]' not in src or "cuda" in src:
        return False

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        # DDP accepts device_ids only for single-device GPU modules.
        first = next(model.parameters(), None)
        if "device_ids" not in kwargs and first is not None and first.device.type == "cpu":
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model.__doc__ = original.__doc__
    create_ddp_model.__wrapped__ = original
    create_ddp_model._d2norm_compat = True
    defaults.create_ddp_model = create_ddp_model
    import detectron2.engine as engine

    if getattr(engine, "create_ddp_model", None) is original:
        engine.create_ddp_model = create_ddp_model
    return True


def _retinanet_get_norm(norm, out_channels):
    import detectron2.layers

    # Resolved at call time, so d2norm's registry-aware get_norm (installed later) is used.
    return detectron2.layers.get_norm(norm, 32 if out_channels == 1 else out_channels)


def _shim_retinanet_norm_probe():
    retinanet = importlib.import_module("detectron2.modeling.meta_arch.retinanet")
    if getattr(retinanet, "get_norm", None) is _retinanet_get_norm:
        return False
    if "get_norm(norm, 1)" not in inspect.getsource(retinanet.RetinaNetHead.__init__):
        return False
    retinanet.get_norm = _retinanet_get_norm
    return True


_JIT_DEPRECATION = "torch.jit.script` is deprecated"


def _shim_jit_script_warning(shims):
    """Run ``shims`` (they import detectron2.layers, hence fvcore.nn) and import detectron2's other module that
    scripts at import time with warnings recorded; re-emit every recorded warning except torch's
    ``torch.jit.script`` deprecation. Returns ``(applied = that warning was raised, the shims' results)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [f() for f in shims]
        importlib.import_module("fvcore.nn")
        importlib.import_module("detectron2.modeling.box_regression")
    # a FutureWarning in torch 2.14 / 2.15, a DeprecationWarning in torch 2.11
    jit = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and _JIT_DEPRECATION in str(w.message)]
    for w in caught:
        if w not in jit:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return bool(jit), results


def _trainer_state_dict(self):
    """upstream ``DefaultTrainer.state_dict``: the TrainerBase state plus the inner trainer's (optimizer)."""
    from detectron2.engine.train_loop import TrainerBase

    ret = TrainerBase.state_dict(self)
    ret["_trainer"] = self._trainer.state_dict()
    return ret


def _trainer_load_state_dict(self, state_dict):
    """upstream ``DefaultTrainer.load_state_dict``."""
    from detectron2.engine.train_loop import TrainerBase

    TrainerBase.load_state_dict(self, state_dict)
    self._trainer.load_state_dict(state_dict["_trainer"])


def _shim_trainer_state():
    defaults = importlib.import_module("detectron2.engine.defaults")
    trainer = defaults.DefaultTrainer
    if "state_dict" in vars(trainer):
        return False
    trainer.state_dict = _trainer_state_dict
    trainer.load_state_dict = _trainer_load_state_dict
    return True


def _apply():
    # Order matters: PIL and _C before anything imports detectron2.data / detectron2.layers.
    APPLIED["pil_linear"] = _shim_pil_linear()
    APPLIED["jit_script_warning"], (APPLIED["compiled_ops"],) = _shim_jit_script_warning([_shim_compiled_ops])
    APPLIED["pkg_resources"] = _shim_pkg_resources()
    APPLIED["fast_coco_eval"] = _shim_fast_coco_eval()
    APPLIED["cpu_launch"] = _shim_cpu_launch()
    APPLIED["cpu_ddp"] = _shim_cpu_ddp()
    APPLIED["retinanet_norm_probe"] = _shim_retinanet_norm_probe()
    APPLIED["trainer_state"] = _shim_trainer_state()
    applied = [k for k, v in APPLIED.items() if v]
    if applied:
        logger.debug("d2norm.compat applied: %s", ", ".join(applied))


_apply()
