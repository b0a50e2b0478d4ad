"""tools/gpu_selfcheck.py: on a CUDA machine every layer on CUDA equals the CPU float64 layer (``-m cuda``);
without CUDA the tool says so and exits 0; its comparison harness is exercised on CPU float32 vs float64."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_selfcheck  # noqa: E402


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_layer_on_cuda_equals_cpu_float64():
    assert gpu_selfcheck.check_layers("cuda") == []


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_processes_equal_two_gloo_processes():
    assert gpu_selfcheck.check_two_process() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_without_cuda_the_tool_skips_cleanly():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_selfcheck.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "CUDA is not available on this machine: skipped" in res.stdout


@pytest.mark.slow
def test_harness_cpu_float32_equals_float64_for_every_layer():
    """The same comparison on CPU float32: the harness runs every layer and finds no difference, and it does
    find one when the device copy differs (a perturbed γ)."""
    assert gpu_selfcheck.check_layers("cpu") == []
    failures = []
    a = torch.ones(4)
    gpu_selfcheck._close(a * (1 + 1e-2), a, "perturbed", failures)
    assert failures and "perturbed" in failures[0]
