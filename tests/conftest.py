import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import d2norm  # noqa: E402,F401  (compat shims + registrations)

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))



@pytest.fixture
def d2cfg():
    """A fresh detectron2 cfg with the D2NORM node."""
    from detectron2.config import get_cfg

    return d2norm.add_d2norm_config(get_cfg())
