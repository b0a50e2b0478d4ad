"""Make detectron2 v0.6 (Python-only install) run on today's torch / Pillow / setuptools, and on CPU/gloo.

Every shim below closes one gap that was verified on this stack, is applied only when that gap exists, and
is recorded in :data:`APPLIED`. On a compiled upstream detectron2 (built from GitHub) all of them are inert.
This is the only module in d2norm that patches detectron2.

Gaps (each has a test in ``tests/test_compat.py``):

``compiled_ops``
    ``detectron2/layers/__init__.py`` (deformable conv, rotated boxes, RoIAlignRotated) and
    ``evaluation/fast_eval_api.py`` do ``from detectron2 import _C`` at import time. Without the C++ extension
    we import those modules against a stand-in whose every attribute raises ``NotImplementedError`` naming the
    op, then remove the stand-in again so ``import detectron2._C`` elsewhere (``collect_env``) still reports
    "not built".
``fast_coco_eval``
    ``COCOEvaluator(use_fast_impl=True)`` (the default) needs ``_C``; without it COCO evaluation uses
    pycocotools' ``COCOeval`` (exactly what ``use_fast_impl=False`` does).
``pil_linear``
    ``data/transforms/transform.py`` uses ``PIL.Image.LINEAR`` as a default argument; Pillow >= 10 removed the
    alias. We restore it as ``Image.BILINEAR`` (the value it always had). Pillow itself is not downgraded.
``pkg_resources``
    ``model_zoo/model_zoo.py`` imports ``pkg_resources`` (gone in setuptools >= 81). It is imported against a
    minimal stand-in providing ``resource_filename``; the stand-in is not left in ``sys.modules``.
``cpu_launch``
    v0.6's ``launch`` asserts CUDA and uses NCCL. On a machine without CUDA the worker uses gloo, as
    detectron2 main does, so ``--num-gpus N`` runs N CPU processes.
``cpu_ddp``
    v0.6's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which DDP rejects for CPU modules.
``jit_script_warning``
    ``fvcore/nn/focal_loss.py`` and ``modeling/box_regression.py`` call ``torch.jit.script`` at import time,
    which torch >= 2.10 answers with a ``FutureWarning`` per call and process (two per process, per rank with
    ``--num-gpus``). Those imports run here with that one warning filtered; the filter is removed afterwards,
    so a user's own ``torch.jit.script`` still warns.
``retinanet_norm_probe``
    v0.6's ``RetinaNetHead`` calls ``get_norm(norm, 1)`` just to log the norm's type name, so any grouped norm
    (detectron2's own "GN", d2norm's "BGN") fails there for 1 channel; upstream probes with 32 channels. The
    retinanet module's ``get_norm`` maps that probe to 32 channels (a real 1-channel head conv does not exist).
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

__all__ = ["HAS_COMPILED_OPS", "APPLIED", "MissingCompiledOps"]

logger = logging.getLogger(__name__)

#: name of each shim -> whether it was applied in this process
APPLIED: Dict[str, bool] = {}


class MissingCompiledOps(types.ModuleType):
    """Stand-in for ``detectron2._C``: importing works, using any op raises a clear error."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(
            f"detectron2._C.{name} is a compiled detectron2 op (deformable conv, rotated boxes, "
            f"RoIAlignRotated or fast COCO eval), but this detectron2 was installed without its C++ "
            f"extension. Install a compiled detectron2 (README: 'Using an upstream detectron2') to use it."
        )


def _compiled_ops_available() -> bool:
    try:
        spec = importlib.util.find_spec("detectron2._C")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    try:
        importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return True


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
    if HAS_COMPILED_OPS:
        return False
    import detectron2

    stand_in = MissingCompiledOps("detectron2._C")
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


def _shim_pil_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


def _resource_filename(package: str, resource: str) -> str:
    mod = importlib.import_module(package)
    return os.path.join(os.path.dirname(mod.__file__), resource)


def _shim_pkg_resources():
    if importlib.util.find_spec("pkg_resources") is not None:
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
    jit = [w for w in caught if issubclass(w.category, FutureWarning) and _JIT_DEPRECATION in str(w.message)]
    for w in caught:
        if w not in jit:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return bool(jit), results


def _apply():
    # Order matters: PIL and _C before anything imports detectron2.data / detectron2.layers.
    APPLIED["pil_linear"] = _shim_pil_linear()
    APPLIED["jit_script_warning"], (APPLIED["compiled_ops"],) = _shim_jit_script_warning([_shim_compiled_ops])
    APPLIED["pkg_resources"] = _shim_pkg_resources()
    APPLIED["fast_coco_eval"] = _shim_fast_coco_eval()
    APPLIED["cpu_launch"] = _shim_cpu_launch()
    APPLIED["cpu_ddp"] = _shim_cpu_ddp()
    APPLIED["retinanet_norm_probe"] = _shim_retinanet_norm_probe()
    applied = [k for k, v in APPLIED.items() if v]
    if applied:
        logger.debug("d2norm.compat applied: %s", ", ".join(applied))


_apply()
