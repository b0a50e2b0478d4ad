"""The statistics tools on the main job's own model (``make demo``: Faster R-CNN R18-FPN with GhostBN in the
backbone), trained briefly here: ``tools/fit_evalnorm.py`` and ``tools/tune_example_weight.py`` convert GhostBN
(BN at inference) and say up front, before any evaluation, what they cannot convert; their bad options are
usage errors (exit code 2)."""
import math
import os

import pytest
import torch

from helpers import DEMO_CONFIG as DEMO, load_tool, trained_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    return load_tool(name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo-model checkpoint after 3 training iterations (the demo config at 64 px)."""
    d = trained_demo(tmp_path_factory.mktemp("demo_tools"), max_iter=3, num_train=8, checkpoint_period=2)
    assert d["ghost"]
    return d


def _run(name, demo, *extra, out=None):
    out = out or str(demo["tmp"] / name)
    return _tool(name).main([*demo["args"], *extra, "--output-dir", out, *demo["opts"]]), out


def test_fit_evalnorm_converts_ghost_bn_of_the_demo_model(demo, capsys):
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.layers.evalnorm import EvalNorm2d
    from d2norm.engine import cli

    rc, out = _run("fit_evalnorm", demo, "--iters", "2")
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert f"converted {len(demo['ghost'])} layer(s) to EvalNorm" in text
    assert "fitting alpha/beta of" in text and "of 2 images" in text  # B = D2NORM.GHOST_BN.SIZE 2, not 4
    yaml_cfg = add_d2norm_config(get_cfg())
    yaml_cfg.merge_from_file(os.path.join(out, "model_final_evalnorm_offline.yaml"))
    assert yaml_cfg.MODEL.RESNETS.NORM == "EvalNorm" and yaml_cfg.D2NORM.EVALNORM.MODE == "offline"
    model = cli.load_model(yaml_cfg)  # the written pair loads strictly and is all EvalNorm where GhostBN was
    names = {n for n, m in model.named_modules() if isinstance(m, EvalNorm2d)}
    assert names == set(demo["ghost"])


def test_fit_evalnorm_rule_uses_ghost_size(demo, capsys):
    rc, out = _run("fit_evalnorm", demo, "--rule")
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    state = torch.load(os.path.join(out, "model_final_evalnorm_rule.pth"), map_location="cpu", weights_only=False)["model"]
    logits = [v for k, v in state.items() if k.endswith("alpha_logit")]
    assert len(logits) == len(demo["ghost"])
    for v in logits:  # alpha = 1/B^2 with B = GHOST_BN.SIZE = 2 (evalnorm §4.1 rule of thumb)
        assert float(torch.sigmoid(v)) == pytest.approx(1 / 2 ** 2, rel=1e-6)


def test_tune_example_weight_on_the_demo_model(demo, capsys):
    import json

    rc, out = _run("tune_example_weight", demo, "--alphas", "0", "0.5")
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    rep = json.load(open(os.path.join(out, "example_weight_sweep.json")))
    assert rep["alpha0_matches_base"] is True and sorted(rep["converted"]) == sorted(demo["ghost"])
    assert set(rep["ap"]) == {"0", "0.5"} and all(math.isfinite(v) or v != v for v in rep["ap"].values())


def test_tune_example_weight_table_says_no_predictions(demo, capsys, monkeypatch):
    """An alpha whose model detects nothing: COCOEvaluator gives no bbox result; the table says why it is nan."""
    from d2norm.engine import cli

    real = cli.evaluate

    def evaluate(cfg, model, dataset, output_dir):
        return {} if output_dir.endswith("alpha_0.5") else real(cfg, model, dataset, output_dir)

    monkeypatch.setattr(cli, "evaluate", evaluate)
    rc, out = _run("tune_example_weight", demo, "--alphas", "0", "0.5", "--output-name", "nopred")
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    row = next(line for line in text.splitlines() if line.startswith("| 0.5 "))
    assert "nan" in row and "no predictions" in row
    row0 = next(line for line in text.splitlines() if line.startswith("| 0 "))
    assert "no predictions" not in row0


@pytest.mark.parametrize("tool", ["fit_evalnorm", "tune_example_weight"])
def test_unconvertible_model_fails_before_any_evaluation(demo, tool, capsys, tmp_path):
    """MABN everywhere (a config the user trained): neither tool applies; they say so first, naming the reason,
    without evaluating (no inference folder written)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.layers import build_model

    cfg = add_d2norm_config(get_cfg())
    cfg.merge_from_file(DEMO)
    opts = [*demo["opts"], "MODEL.RESNETS.NORM", "MABN", "MODEL.BACKBONE.NAME", "build_mabn_resnet_fpn_backbone"]
    cfg.merge_from_list(opts)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("mabn")
    argv = ["--config-file", DEMO, "--weights", str(tmp_path / "mabn.pth"), "--output-dir", str(tmp_path / "o"),
            *(["--eval"] if tool == "fit_evalnorm" else []), *opts]
    rc = _tool(tool).main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the model has no layer") and "MABN normalizes without mean centering" in last
    assert not (tmp_path / "o" / "inference").exists()


# ---- bad options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool,extra,msg", [
    ("fit_evalnorm", ["--rule", "0"], "argument --rule: must be an integer >= 1, got '0'"),
    ("fit_evalnorm", ["--rule", "-3"], "argument --rule: must be an integer >= 1, got '-3'"),
    ("fit_evalnorm", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    ("fit_evalnorm", ["--iters", "0"], "argument --iters: must be an integer >= 1, got '0'"),
    ("analyze_bn", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    ("analyze_bn", ["--num-batches", "0"], "argument --num-batches: must be an integer >= 1, got '0'"),
    ("recompute_bn_stats", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
])
def test_non_positive_counts_are_usage_errors(tool, extra, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        _tool(tool).main(["--config-file", DEMO, "--weights", str(tmp_path / "x.pth"), *extra])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("content", ["MODEL:\n  RESNETS: [unclosed\n", "MODEL:\n\tNORM: BN\n"])
def test_corrupt_yaml_is_an_error_line(content, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    rc = _tool("fit_evalnorm").main(["--config-file", str(bad), "--weights", str(tmp_path / "x.pth"), "--rule"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: config file {str(bad)!r} is not valid YAML"), err
    assert "Traceback" not in err


# ---- tools/visualize.py -------------------------------------------------------------------------------------
def _outline_changed(png, src, box):
    """Fraction of the pixels on ``box``'s outline (XYXY) where ``png`` differs visibly from ``src``."""
    import numpy as np

    h, w = src.shape[:2]
    x0, y0, x1, y1 = box
    xs = np.clip(np.arange(int(x0), int(x1) + 1), 0, w - 1)
    ys = np.clip(np.arange(int(y0), int(y1) + 1), 0, h - 1)
    top, left = np.clip(int(round(y0)), 0, h - 1), np.clip(int(round(x0)), 0, w - 1)
    bottom, right = np.clip(int(round(y1)), 0, h - 1), np.clip(int(round(x1)), 0, w - 1)
    edge = np.concatenate([png[top, xs] - src[top, xs], png[bottom, xs] - src[bottom, xs],
                           png[ys, left] - src[ys, left], png[ys, right] - src[ys, right]])
    return float((np.abs(edge).sum(-1) > 30).mean())


def _load_rgb(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_visualize_writes_pngs_of_the_demo_model(demo, capsys):
    """The demo checkpoint through the tool: one PNG per image, the image's size, predictions.json with the
    drawn instances; with no prediction above the threshold the PNG is the image itself."""
    import json

    rc, out = _run("visualize", demo, "--num-images", "2", "--score-threshold", "0", "--max-detections", "3")
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    rep = json.load(open(os.path.join(out, "predictions.json")))
    assert len(rep["images"]) == 2
    for im in rep["images"]:
        src, png = _load_rgb(im["file_name"]), _load_rgb(im["png"])
        assert png.shape == src.shape
        assert 1 <= len(im["boxes"]) == len(im["scores"]) == len(im["classes"]) <= 3
        assert im["scores"] == sorted(im["scores"], reverse=True)
        assert all(c in ("rectangle", "ellipse", "triangle") for c in im["classes"])
        assert (png != src).any()
    rc, out = _run("visualize", demo, "--num-images", "1", "--score-threshold", "1", out=str(demo["tmp"] / "vis_none"))
    assert rc == 0
    im = json.load(open(os.path.join(out, "predictions.json")))["images"][0]
    assert im["boxes"] == [] and (_load_rgb(im["png"]) == _load_rgb(im["file_name"])).all()


def test_visualize_draws_boxes_where_the_predictions_are(demo, capsys, monkeypatch):
    """A model whose predictions are the val images' ground-truth boxes (so that they are real, visible
    objects): on every drawn box's outline the PNG differs from the image."""
    import json

    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances
    from torch import nn

    from d2norm.engine import cli

    dicts = DatasetCatalog.get("d2norm_synthetic_val")

    class GroundTruth(nn.Module):
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, inputs):
            d = dicts[self.i]
            self.i += 1
            inst = Instances((inputs[0]["height"], inputs[0]["width"]))
            inst.pred_boxes = Boxes(torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                   a["bbox"][1] + a["bbox"][3]] for a in d["annotations"]]))
            inst.scores = torch.linspace(0.9, 0.6, len(d["annotations"]))
            inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            return [{"instances": inst}]

    monkeypatch.setattr(cli, "load_model", lambda cfg, weights=None, **kw: GroundTruth())
    rc, out = _run("visualize", demo, "--num-images", "3", "--score-threshold", "0.5")
    assert rc == 0, capsys.readouterr().out[-3000:]
    rep = json.load(open(os.path.join(out, "predictions.json")))
    drawn = 0
    for im, d in zip(rep["images"], dicts):
        src, png = _load_rgb(im["file_name"]), _load_rgb(im["png"])
        assert len(im["boxes"]) == len(d["annotations"])
        for box in im["boxes"]:
            assert _outline_changed(png, src, box) > 0.5, (im["png"], box)
            drawn += 1
    assert drawn >= 3


def test_readme_predictor_snippet_draws_an_image(demo, tmp_path):
    """docs/training.md's DefaultPredictor + Visualizer snippet, on the demo checkpoint (cfg sized like the fixture)."""
    import re
    import subprocess
    import sys

    text = open(os.path.join(ROOT, "docs", "training.md")).read().split("## Looking at predictions", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    weights = demo["args"][-1]
    image = os.path.join(str(demo["tmp"]), "data")
    image = next(os.path.join(r, f) for r, _, fs in os.walk(image) for f in sorted(fs) if f.endswith(".png"))
    assert 'cfg.MODEL.WEIGHTS = "output/cpu/faster_rcnn_R18_FPN_ghostbn/model_final.pth"' in code
    code = code.replace('"output/cpu/faster_rcnn_R18_FPN_ghostbn/model_final.pth"',
                        f"{weights!r}\ncfg.merge_from_list({demo['opts']!r})")
    code = code.replace('"<an image>.png"', repr(image))
    res = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    src, png = _load_rgb(image), _load_rgb(str(tmp_path / "prediction.png"))
    assert png.shape == src.shape


# ---- tools/analyze_bn.py plots -----------------------------------------------------------------------------
def test_analyze_bn_plots_are_labelled_and_esm_is_per_channel(demo, capsys):
    """Both checkpoints of the demo run: every panel of both figures has a y label and a legend, the ESM panels
    name the layers, and the per-channel ESM is the raw L2 norm over the layer's channels divided by sqrt(C)
    with C the layer's width (recomputed here from the model)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    from d2norm.engine import cli

    first = str(demo["tmp"] / "out" / "model_0000001.pth")
    tool = _tool("analyze_bn")
    out = str(demo["tmp"] / "analyze_bn")
    rc = tool.main(["--config-file", DEMO, "--weights", first, demo["args"][-1], "--num-batches", "3",
                    "--batch-size", "2", "--output-dir", out, *demo["opts"]])
    assert rc == 0, capsys.readouterr().out[-3000:]
    rep = json.load(open(os.path.join(out, "analyze_bn.json")))
    cfg = cli.load_cfg(DEMO, demo["opts"])
    widths = {n: m.num_features for n, m in cli.load_model(cfg, demo["args"][-1]).named_modules()
              if hasattr(m, "num_features")}
    esm = rep["checkpoints"][0]["esm"]
    assert len({widths[e["layer"]] for e in esm}) > 1  # layers of different width: raw ESM does not compare
    for e in esm:
        assert e["num_channels"] == widths[e["layer"]]
        assert e["esm_mu_rms"] == pytest.approx(e["esm_mu"] / math.sqrt(widths[e["layer"]]), rel=1e-12)
        assert e["esm_sigma_rms"] == pytest.approx(e["esm_sigma"] / math.sqrt(widths[e["layer"]]), rel=1e-12)
    for fig in (tool.plot_fig2(rep), tool.plot_esm(rep)):
        assert fig.axes
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_xlabel(), ax.get_title()
            legend = ax.get_legend()
            assert legend is not None and len(legend.get_texts()) >= 2, ax.get_title()
    esm_axes = tool.plot_esm(rep).axes
    assert len(esm_axes) == 4
    for ax in esm_axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == [e["layer"] for e in esm]
    assert sorted(os.listdir(out)) == ["analyze_bn.json", "esm.png", "fig2_batch_stats.png"]
