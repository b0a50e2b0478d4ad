"""Stand-in for detectron2's compiled extension ``detectron2._C`` (deformable conv, rotated boxes, RoIAlignRotated,
fast COCO eval).

Self-contained (imports nothing) because it has two uses: ``scripts/make_detectron2_v06.py`` installs a copy of
this file as ``detectron2/_C.py`` in the Python-only detectron2 v0.6 the installer builds, and
:mod:`d2norm.compat` loads it temporarily for a Python-only detectron2 installed some other way. Importing it works;
using any compiled op raises ``NotImplementedError`` naming the op.
"""
#: version of this stand-in (the installer reinstalls detectron2 v0.6 when it changes)
D2NORM_STAND_IN = 1


def get_compiler_version():
    return "none (detectron2 installed without its C++ extension; d2norm stand-in for detectron2._C)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(
        f"detectron2._C.{name} is a compiled detectron2 op (deformable conv, rotated boxes, RoIAlignRotated or "
        f"fast COCO eval), but this detectron2 was installed without its C++ extension. Install a compiled "
        f"detectron2 (README: 'Installing detectron2', D2NORM_DETECTRON2) to use it."
    )
