"""tools/gpu_selfcheck.py: on a CUDA machine every layer on CUDA equals the CPU float64 layer (``-m cuda``);
without CUDA the tool says so and exits 0; its comparison harness is exercised on CPU float32 vs float64."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_measure  # noqa: E402
import gpu_selfcheck  # noqa: E402
from d2norm.layers import NORM_REGISTRY  # noqa: E402


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_layer_on_cuda_equals_cpu_float64():
    assert gpu_selfcheck.check_layers("cuda") == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_cuda_processes_equal_two_gloo_processes():
    assert gpu_selfcheck.check_two_process()["failures"] == []


def test_two_process_harness_on_cpu():
    """The 2-process check at float32 on gloo/CPU agrees with float64, and its comparison walks the nested
    records (SyncDomainBN's per-level lists, the head's parameter dict): one wrong entry deep inside is reported.
    Beside it, AnySyncBN's step time is measured; torch's SyncBatchNorm, CUDA-only, is said to be unavailable."""
    res = gpu_selfcheck.check_two_process("cpu32")
    assert res["failures"] == []
    t = res["data"]["sync_bn_timing"]
    assert t["backend"] == "gloo" and t["s_per_step"]["AnySyncBN route 0"] > 0
    assert t["s_per_step"]["nn.SyncBatchNorm"].startswith("unavailable") and "ratio_vs_torch_syncbn" not in t
    a = torch.ones(3)
    ref = {"sync_domain_bn": {"y": [a, a], "buffers": {"running_mean": a}}}
    got = {"sync_domain_bn": {"y": [a, a * 1.01], "buffers": {"running_mean": a}}}
    failures = []
    gpu_selfcheck._compare(got, ref, "rank 0", failures)
    assert len(failures) == 1 and "sync_domain_bn y [1]" in failures[0]


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


#: what the lent GPU machines have besides the standard library (torch + triton + numpy / matplotlib / opencv /
#: pytest and their dependencies); the rest must come from the bundle (pure Python) or its cp312 wheels
GPU_MACHINE = ("torch", "torchgen", "functorch", "triton", "numpy", "numpy.libs", "matplotlib", "mpl_toolkits", "cycler",
               "kiwisolver", "fontTools", "dateutil", "pyparsing", "packaging", "contourpy", "six.py", "PIL",
               "pillow.libs", "cv2", "opencv_python.libs", "typing_extensions.py", "sympy", "mpmath", "networkx",
               "filelock", "jinja2", "markupsafe", "fsspec", "nvidia", "cuda", "pytest", "_pytest", "pluggy",
               "iniconfig", "setuptools", "_distutils_hack")
#: stand-ins for the bundle's site-cp312 (downloaded wheels of the machine's Python, not loadable here)
CP312 = ("pycocotools", "torchvision", "torchvision.libs")


def _compiled_detectron2():
    from d2norm import compat

    return compat.HAS_COMPILED_OPS


@pytest.mark.slow
@pytest.mark.skipif(_compiled_detectron2(), reason="the bundle is built from the registry's detectron2 v0.6 Python "
                    "package (make install's venv); this environment's detectron2 is compiled (CI's upstream leg)")
def test_dry_run_from_the_bundle_alone(tmp_path):
    """`make gpu-bundle` + the GPU machine's packages are enough: the dry run (every layer, 2 training iterations
    + COCO evaluation through tools/train_net.py) runs with no site-packages but those, and writes its JSON."""
    import json
    import site as _site

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_gpu_bundle

    bundle = tmp_path / "bundle"
    make_gpu_bundle.build(str(bundle), download=False)
    machine = tmp_path / "machine-site"
    machine.mkdir()
    venv_site = next(p for p in _site.getsitepackages() if p.endswith("site-packages"))
    import glob

    for name in GPU_MACHINE + CP312:
        src = os.path.join(venv_site, name)
        if os.path.exists(src):
            os.symlink(src, machine / name)
        # installed packages come with their metadata (torch registers its c10d backends through it)
        for info in glob.glob(os.path.join(venv_site, f"{name}-*.dist-info")):
            os.symlink(info, machine / os.path.basename(info))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bundle / "site"), str(machine), ROOT]), D2NORM_NATIVE="0",
               CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "tools", "gpu_selfcheck.py"), "--dry-run",
                          "--out", str(out)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "gpu_selfcheck.json").read_text())
    assert doc["environment"]["dry_run"] and [c["ok"] for c in doc["checks"]] == [True] * 7, doc
    speed = next(c for c in doc["checks"] if c["check"].startswith("speed"))
    assert set(speed["data"][0]["layers"]) == {name for name, _ in NORM_REGISTRY}
    # the machine has no tensorboard: the training above ran on the Trainer's writers without it
    probe = subprocess.run([sys.executable, "-S", "-c", "import tensorboard"], env=env, capture_output=True)
    assert probe.returncode != 0


def test_amp_comparison_flags_what_it_must():
    """The AMP check's comparison: a result within the dtype's tolerance passes; one off by more, a non-finite
    value, or a statistics buffer kept in half precision is reported."""
    u = gpu_selfcheck.UNIT[torch.float16]
    b = torch.linspace(-4, 4, 50, dtype=torch.float64)
    cases = {
        "ok": (b.half(), "output"),
        "off": ((b + 64 * u * 4).half(), "output"),
        "nonfinite": (torch.where(b > 3, torch.tensor(float("inf")), b).half(), "output"),
        "grad_off": ((b * (1 + 64 * u)).half(), "grad"),
        "half_buffer": (b.half(), "buffer"),
    }
    found = {}
    for tag, (a, kind) in cases.items():
        failures = []
        gpu_selfcheck._close_amp(a, b, tag, failures, u, kind)
        found[tag] = failures
    assert found["ok"] == []
    assert all(found[t] for t in ("off", "nonfinite", "grad_off", "half_buffer")), found
    assert "float32" in found["half_buffer"][0] and "non-finite" in found["nonfinite"][0]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["output_inf", "aux_loss_inf"])
def test_detector_amp_check_reports_a_broken_norm_and_goes_on(monkeypatch, fault):
    """The AMP detector check names a norm whose training produces non-finite values as a failure — a crash
    inside its model (GhostBN's output times inf: detectron2 stops on its boxes) or a non-finite loss (an aux
    loss of inf) — and still measures the next norm."""
    if fault == "output_inf":
        GhostBN = NORM_REGISTRY.get("GhostBN")
        forward = GhostBN.forward
        monkeypatch.setattr(GhostBN, "forward", lambda self, x: forward(self, x) * float("inf"))
    else:
        aux = gpu_measure.evalnorm_aux_loss
        monkeypatch.setattr(gpu_measure, "evalnorm_aux_loss",
                            lambda m: aux(m) + (float("inf") if m.backbone.bottom_up.stem.conv1.norm.__class__
                                                .__name__.startswith("Ghost") else 0.0))
    res = gpu_measure.measure_detectors_amp("cpu", torch.bfloat16, 64, iters=1, warmup=0, names=["GhostBN", "BN"])
    assert len(res["failures"]) == 1 and res["failures"][0].startswith("GhostBN: "), res["failures"]
    if fault == "aux_loss_inf":
        assert "non-finite loss(es) ['total_with_aux'] at iteration 0" in res["failures"][0]
    assert "BN" in res["data"]["norms"] and res["data"]["norms"]["BN"]["ratio_vs_BN"] == 1.0
