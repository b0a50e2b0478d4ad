"""The benchmark tools' output contracts (not their timings: no test asserts a time): benchmark_norms --json
covers every registered layer with both baselines, bench_report regenerates the README block and the plot,
benchmark_models reports ratios, folded variants and the PreciseBN cost formula."""
import json
import os
import sys

import pytest

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
