"""The benchmark tools' output contracts (not their timings: no test asserts a time): benchmark_norms --json
covers every registered layer with both baselines, bench_report regenerates the README block and the plot,
benchmark_models reports ratios, folded variants and the PreciseBN cost formula."""
import json
import os
import sys

import d2norm
import pytest
import torch
from detectron2.config import get_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_report  # noqa: E402
import benchmark_norms  # noqa: E402

from d2norm.layers import NORM_REGISTRY  # noqa: E402


def test_benchmark_norms_json_and_readme_block(tmp_path):
    out = tmp_path / "norms.json"
    benchmark_norms.main(["--shape", "4", "32", "4", "4", "--shape", "6", "32", "2", "2", "--rounds", "3",
                          "--window-ms", "0.01", "--threads", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [r["shape"] for r in doc["results"]] == [[4, 32, 4, 4], [6, 32, 2, 2]]
    for r in doc["results"]:
        assert r["threads"] == 1 and r["clock"] == "process" and r["device"].startswith("cpu")
        assert set(r["baseline"]) == {"BatchNorm2d", "GroupNorm"}
        assert all(r["baseline"][b]["train_ms"] > 0 and r["baseline"][b]["eval_ms"] > 0 for b in r["baseline"])
        assert set(r["layers"]) == {k for k, _ in NORM_REGISTRY}
        for name, v in r["layers"].items():
            for key in ("train_ratio", "eval_ratio"):  # median of per-round ratios, inside its IQR
                lo, hi = v[key + "_iqr"]
                assert 0 < lo <= v[key] <= hi, name
            # the best-of ratio is the ratio of the best times
            assert abs(v["train_ratio_best"] * r["baseline"]["BatchNorm2d"]["train_ms"] - v["train_ms"]) < 1e-6 * v["train_ms"] + 1e-9
        assert "train_ratio_vs_groupnorm" in r["layers"]["BGN"]
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{bench_report.BEGIN}\nold table\n{bench_report.END}\ntail\n")
    png = tmp_path / "norms.png"
    bench_report.main([str(out), "--png", str(png), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old table" not in text
    for name in doc["results"][0]["layers"]:
        assert f"| {name} |" in text
    assert "(4, 32, 4, 4)" in text and png.stat().st_size > 1000


def test_bad_options_are_named(capsys):
    with pytest.raises(SystemExit):
        benchmark_norms.main(["--layers", "NoSuchNorm"])
    assert "NoSuchNorm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # GroupNorm(32, 16) would raise a traceback while timing
        benchmark_norms.main(["--shape", "4", "16", "16", "16"])
    assert e.value.code == 2
    assert "--shape 4 16 16 16: every size must be >= 1 and C a multiple of 32" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_models_json(tmp_path):
    import benchmark_models

    out = tmp_path / "models.json"
    benchmark_models.main(["--models", "faster_rcnn_R18_FPN", "--norms", "GhostBN", "EvalNorm", "--rounds", "2",
                           "--threads", "1", "--fold", "--image-size", "96", "--json", str(out)])
    doc = json.loads(out.read_text())
    r = doc["models"]["faster_rcnn_R18_FPN"]
    assert set(r["norms"]) == {"BN+fold", "none", "GhostBN", "GhostBN+fold", "EvalNorm"}  # EvalNorm: nothing to fold
    assert r["norms"]["GhostBN+fold"]["folded"] > 0 and "train_ratio" not in r["norms"]["GhostBN+fold"]
    assert r["image_size"] == 96 and r["rounds"] == 2 and doc["image_size"] == 96
    for row in r["norms"].values():  # every ratio: median of the per-round ratios inside its IQR, and the best-of
        for key in ("train_ratio", "infer_ratio", "infer_vs_no_norm"):
            if key in row:
                lo, hi = row[key + "_iqr"]
                assert 0 < lo <= row[key] <= hi and row[key + "_best"] > 0
    pb = r["precise_bn"]
    c = pb["schedules"]["coco_90k_eval_period_5000"]
    assert c["passes"] == 19
    expected = 100 * 19 * pb["num_samples"] * pb["forward_s_per_image"] / (90000 * 16 * pb["train_s_per_image"])
    assert abs(c["cost_percent"] - expected) < 1e-9 * expected


def test_benchmark_ratio_statistics_are_the_paired_median_and_quartiles():
    import benchmark_models
    import numpy as np

    rng = np.random.default_rng(0)
    base, other = list(rng.uniform(1, 2, 7)), list(rng.uniform(1, 2, 7))
    r = benchmark_norms.paired_ratio(base, other)
    per_round = np.array(base) / np.array(other)
    assert r["median"] == pytest.approx(np.median(per_round), rel=1e-12)
    assert r["iqr"] == pytest.approx(list(np.percentile(per_round, [25, 75])), rel=1e-12)
    assert r["best"] == pytest.approx(min(base) / min(other), rel=1e-12)
    with pytest.raises(SystemExit):
        benchmark_models.main(["--image-size", "8"])


def test_benchmark_norms_amp_times_every_layer_on_half_input(tmp_path):
    """--amp bf16: every layer and both baselines get a bfloat16 input under autocast (the result says so); peak
    memory is CUDA-only and left out on the CPU, not faked."""
    out = tmp_path / "amp.json"
    benchmark_norms.main(["--shape", "4", "32", "4", "4", "--rounds", "2", "--window-ms", "0.01", "--threads", "1",
                          "--amp", "bf16", "--json", str(out)])
    r = json.loads(out.read_text())["results"][0]
    assert r["amp"] == "bf16" and set(r["layers"]) == {k for k, _ in NORM_REGISTRY}
    assert not any("train_peak_ratio" in v for v in r["layers"].values())
    assert r["baseline"]["BatchNorm2d"]["peak_MiB"] == [None, None]


def test_benchmark_norms_amp_input_is_half(monkeypatch):
    """The --amp timing really runs the layers on a half-precision input under autocast (a float32 timing under
    the amp label would be wrong): the input every timed call sees is bfloat16 and autocast is on."""
    seen = []

    class Probe(torch.nn.BatchNorm2d):
        def forward(self, x):
            seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
            return super().forward(x)

    monkeypatch.setattr(benchmark_norms.nn, "BatchNorm2d", Probe)
    cfg = d2norm.add_d2norm_config(get_cfg())
    benchmark_norms.bench_shape((4, 32, 2, 2), cfg, torch.device("cpu"), 1e-5, 1, names=["GhostBN"],
                                amp=torch.bfloat16)
    assert seen and set(seen) == {(torch.bfloat16, True)}


def _gpu_doc():
    layer = {"train_ratio": 1.2, "eval_ratio": 1.5, "train_peak_ratio": 1.0, "eval_peak_ratio": 2.0}
    return {"environment": {"device": "NVIDIA H100", "gpus": 1, "torch": "2.11.0", "python": "3.12.3",
                            "date": "2026-12-06 10:00 UTC", "dry_run": False},
            "checks": [
                {"check": "layers", "ok": True, "failures": [], "wall_s": 3.0},
                {"check": "two", "ok": False, "failures": ["AnySyncBN rank 1: output differs\nmore"], "wall_s": 9.0,
                 "data": {"sync_bn_timing": {"shape": [8, 64, 56, 56], "backend": "nccl", "s_per_step": {
                     "AnySyncBN route 0": 0.0012, "AnySyncBN route 1": 0.001, "nn.SyncBatchNorm": 0.001},
                     "ratio_vs_torch_syncbn": {"AnySyncBN route 0": 1.2, "AnySyncBN route 1": 1.0}}}},
                {"check": "speed", "ok": True, "failures": [], "wall_s": 20.0, "data": [{
                    "shape": [8, 64, 56, 56], "amp": "fp16",
                    "layers": {"GhostBN": dict(layer), "EvalNorm": dict(layer, eval_per_sample=True)}}]},
                {"check": "detectors", "ok": True, "failures": [], "wall_s": 30.0, "data": {
                    "dtype": "float16", "image_size": 512, "norms": {
                        "BN": {"s_per_iter": 0.1, "skipped_steps": 1, "ratio_vs_BN": 1.0, "peak_MiB": 900.0},
                        "MABN": {"s_per_iter": 0.12, "skipped_steps": 0, "ratio_vs_BN": 1.2, "peak_MiB": 950.0}}}},
                {"check": "compile", "ok": True, "failures": [], "wall_s": 60.0, "data": {
                    "backend": "inductor", "layers": {"BGN": {
                        "first_call_s": 12.5, "recompiles": 1, "graph_breaks": 0, "shapes": {
                            "2x256x50x84": {"train_ratio": 0.7, "eval_ratio": 0.8}}},
                        "EvalNorm": {"skipped": "over the time budget"}}}},
                {"check": "training", "ok": None, "skipped": "over the 480 s budget"}]}


def test_bench_report_gpu_section_reads_each_ratio_against_its_target(tmp_path):
    """--gpu: every check's outcome (ok / FAIL with its first failure / skipped), each ratio marked ✗ exactly when
    it is over its target (train 1.3, eval 1.1 affine / 2.0 per-sample, detectors 1/0.9), written into the
    gpu block only."""
    src = tmp_path / "gpu_selfcheck.json"
    src.write_text(json.dumps(_gpu_doc()))
    readme = tmp_path / "speed.md"
    readme.write_text(f"head\n{bench_report.BEGIN}\nbench\n{bench_report.END}\n{bench_report.GPU_BEGIN}\nold\n"
                      f"{bench_report.GPU_END}\ntail\n")
    bench_report.main(["--gpu", str(src), "--readme", str(readme)])
    text = readme.read_text()
    assert "\nbench\n" in text and "\nold\n" not in text and text.endswith("tail\n")
    assert "NVIDIA H100" in text and "torch 2.11.0" in text and "DRY RUN" not in text
    assert "| two | FAIL (1): AnySyncBN rank 1: output differs | 9.0 |" in text
    assert "| training | skipped: over the 480 s budget |" in text
    assert "| GhostBN | 1.20 | 1.50 ✗ | 1.00 | 2.00 |" in text  # affine inference: eval target 1.1
    assert "| EvalNorm | 1.20 | 1.50 | 1.00 | 2.00 |" in text  # per-sample statistics: eval target 2.0
    assert "| MABN | 0.1200 | 1.20 ✗ | 0 | 950 |" in text and "| BN | 0.1000 | 1.00 | 1 | 900 |" in text
    assert "| BGN | 12.5 | 1 | 0 | 2x256x50x84: 0.70 | 2x256x50x84: 0.80 |" in text
    assert "| EvalNorm | skipped: over the time budget |" in text
    assert "| AnySyncBN route 0 | 0.00120 | 1.20 ✗ |" in text and "| AnySyncBN route 1 | 0.00100 | 1.00 |" in text
    assert "| nn.SyncBatchNorm | 0.00100 | — |" in text


def test_bench_report_gpu_needs_its_block(tmp_path, capsys):
    src = tmp_path / "gpu_selfcheck.json"
    src.write_text(json.dumps(_gpu_doc()))
    readme = tmp_path / "speed.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        bench_report.main(["--gpu", str(src), "--readme", str(readme)])
    assert "<!-- gpu:begin -->" in capsys.readouterr().err and readme.read_text() == "no markers\n"
