import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import d2norm  # noqa: E402,F401  (compat shims + registrations)

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (make test): one worker per core the process may use, at most 4 (each worker holds torch and
    detectron2, and the training tests start subprocesses of their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def pytest_sessionstart(session):
    """Build d2norm's native CPU kernels (or learn that they cannot be built) before any test runs, so the first
    compile (~50 s) never lands inside a test's subprocess timeout."""
    from d2norm.layers.native import native_status

    native_status()



@pytest.fixture
def d2cfg():
    """A fresh detectron2 cfg with the D2NORM node."""
    from detectron2.config import get_cfg

    return d2norm.add_d2norm_config(get_cfg())
