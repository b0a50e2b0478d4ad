"""tools/calibrate_bn.py on the main job's own model (trained briefly here): the test set is never read while
candidates are selected, the choice is the best candidate on the calibration split, the written checkpoint +
config reproduce the reported calibration AP, candidates a model cannot take are listed with the reason, and the
statistics a candidate estimates never come from the calibration images."""
import json
import os

import pytest

from helpers import load_tool, trained_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name="calibrate_bn"):
    return load_tool(name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return trained_demo(tmp_path_factory.mktemp("calibrate"))


def _run(demo, *extra, out):
    return _tool().main([*demo["args"], "--calib-size", "4", "--precise-batch-sizes", "2", "3",
                         "--offline-iters", "2", *extra, "--output-dir", str(out), *demo["opts"]])


@pytest.mark.slow
def test_selection_never_reads_the_test_set_and_picks_the_best_calibration_candidate(demo, monkeypatch, capsys):
    from detectron2.data import DatasetCatalog

    from d2norm.data import VAL_NAME
    from d2norm.engine import cli

    reads, evaluated, estimated_on = [], [], []
    real_get, real_eval, real_loader = DatasetCatalog.get, cli.evaluate, cli.train_style_loader

    def get(name):
        reads.append(name)
        return real_get(name)

    def evaluate(cfg, model, dataset, output_dir):
        evaluated.append(dataset)
        return real_eval(cfg, model, dataset, output_dir)

    def loader(cfg, dataset, batch_size, seed=0):
        estimated_on.append(dataset)
        return real_loader(cfg, dataset, batch_size, seed=seed)

    monkeypatch.setattr(DatasetCatalog, "get", get)
    monkeypatch.setattr(cli, "evaluate", evaluate)
    monkeypatch.setattr(cli, "train_style_loader", loader)
    out = demo["tmp"] / "cal1"
    rc = _run(demo, out=out)
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    rep = json.load(open(out / "model_final_calibrated.json"))
    kinds = {n.split("_B")[0].split("_alpha")[0] for n in rep["candidates"]}
    assert {"ema", "precise_bn", "example_weighing", "evalnorm_rule", "evalnorm_offline"} <= kinds
    assert "batch_stats_heads" in rep["not_candidates"] and "per_level_heads" in rep["not_candidates"]
    # every candidate was evaluated on the calibration split, the test set once at the very end
    calib = [d for d in evaluated if "__calib_" in d]
    assert len(calib) == len(rep["candidates"]) and evaluated[-1] == VAL_NAME and VAL_NAME not in evaluated[:-1]
    first_test_read = reads.index(VAL_NAME)
    assert all("__calib_" not in r and "__rest_" not in r for r in reads[first_test_read:]), reads
    # the choice is the best calibration AP (ties: the earlier candidate)
    aps = rep["calibration_ap"]
    best = max(rep["candidates"], key=lambda n: (aps[n] == aps[n], aps[n] if aps[n] == aps[n] else -1,
                                                 -rep["candidates"].index(n)))
    assert rep["chosen"] == best
    # the split: recorded, disjoint from the images the statistics came from
    split = rep["split"]
    assert split["size"] == 4 and split["seed"] == 0 and split["statistics_images"] == 6
    rest_ids = {d["image_id"] for d in real_get(split["statistics_from"])}
    assert not rest_ids & set(split["image_ids"])
    # PreciseBN and EvalNorm's fit estimated on the rest only (3 loaders: B = 2, B = 3, the fit)
    assert len(estimated_on) == 3 and set(estimated_on) == {split["statistics_from"]}
    assert os.path.isfile(out / "model_final_calibrated.png") and rep["test"] is not None


@pytest.mark.slow
def test_written_checkpoint_and_config_reproduce_the_calibration_ap(demo, capsys):
    """A converted choice (example weighing α = 0.5 is the only candidate besides the EMA; forced by
    --candidates): reloaded from its .yaml + .pth it gives the reported calibration results exactly."""
    from d2norm.engine import cli
    from d2norm.layers.example_weighted_bn import ExampleWeightedBatchNorm2d

    out = demo["tmp"] / "cal2"
    rc = _run(demo, "--candidates", "example_weighing", "--alphas", "0.5", "--no-test", out=out)
    assert rc == 0, capsys.readouterr().out[-3000:]
    rep = json.load(open(out / "model_final_calibrated.json"))
    assert rep["candidates"] == ["example_weighing_alpha0.5"] and rep["chosen"] == "example_weighing_alpha0.5"
    assert rep["converted"] and rep["test"] is None
    i = demo["opts"].index("OUTPUT_DIR")
    cfg = cli.read_cfg(rep["config"], demo["opts"][:i] + demo["opts"][i + 2:])  # the written config, its OUTPUT_DIR
    cfg.defrost()
    cfg.MODEL.WEIGHTS = rep["checkpoint"]
    model = cli.load_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, ExampleWeightedBatchNorm2d)]
    assert len(layers) == len(rep["converted"]) and all(m.alpha == 0.5 for m in layers)
    res = cli.evaluate(cfg, model, rep["split"]["dataset"] + f"__calib_s0_n4", str(out / "again"))
    assert cli.same_results(res, rep["calibration"][rep["chosen"]])


def test_choose_is_the_best_ap_and_the_earlier_on_ties():
    from d2norm.calibrate import choose

    order = ["ema", "precise_bn_B2_N6", "example_weighing_alpha0.1"]
    assert choose({"ema": 1.0, "precise_bn_B2_N6": 3.0, "example_weighing_alpha0.1": 2.0}, order) == "precise_bn_B2_N6"
    assert choose({"ema": 2.0, "precise_bn_B2_N6": 2.0, "example_weighing_alpha0.1": 1.0}, order) == "ema"
    assert choose({"ema": float("nan"), "precise_bn_B2_N6": 0.0, "example_weighing_alpha0.1": float("nan")},
                  order) == "precise_bn_B2_N6"


def test_a_split_as_large_as_the_training_set_is_an_error(demo, capsys):
    rc = _tool().main([*demo["args"], "--calib-size", "10", "--output-dir", str(demo["tmp"] / "cal3"), *demo["opts"]])
    assert rc == 2 and "calibration split size 10 must be in [1, 9]" in capsys.readouterr().err


@pytest.mark.slow
def test_bn_doctor_measures_the_trained_model_and_names_calibrate_candidates(demo, capsys):
    """bn_doctor --weights on the same model: the measured table covers every layer with population statistics
    (GhostBN backbone), the estimation shift by depth is plotted, and the report is written; the model file is
    left as it was."""
    import hashlib

    weights = demo["args"][-1]
    digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    out = demo["tmp"] / "doctor"
    rc = _tool("bn_doctor").main([*demo["args"], "--num-batches", "2", "--output-dir", str(out), *demo["opts"]])
    text = capsys.readouterr().out
    assert rc in (0, 1), text[-3000:]
    rep = json.load(open(out / "report.json"))
    ghost = [n for n, r in rep["measured"].items() if "rel_std_gap" in r]
    assert len(ghost) >= 20 and all(r["calls"] >= 1 for r in rep["measured"].values() if "calls" in r)
    assert os.path.isfile(out / "measured.png") and "## Measured, per layer" in open(out / "report.md").read()
    for f in rep["findings"]:
        if f["code"] in ("train_test_inconsistency", "ema_outside_batches"):
            assert "calibrate_bn candidates" in f["fix"]
    assert hashlib.sha256(open(weights, "rb").read()).hexdigest() == digest
