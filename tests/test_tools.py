"""The population-statistics tools end to end on a tiny RetinaNet checkpoint of the synthetic set (run in-process
through their ``main(argv)``): tools/recompute_bn_stats.py, fit_evalnorm.py, tune_example_weight.py,
analyze_bn.py; outputs checked against direct computations; missing inputs give a clear error, not a
traceback."""
import copy
import importlib.util
import json
import os

import pytest
import torch

from helpers import tiny_retinanet_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("recompute_bn_stats", "fit_evalnorm", "tune_example_weight", "analyze_bn")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(tmp):
    return tiny_retinanet_cfg("BN", [
        "MODEL.BACKBONE.FREEZE_AT", 1,  # a FrozenBN stem: tools must leave it alone
        "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 100, "TEST.DETECTIONS_PER_IMAGE", 30,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8, 10], [16, 20], [24, 32], [40, 48], [56, 64]],
        "MODEL.PIXEL_MEAN", [127.5, 127.5, 127.5], "MODEL.PIXEL_STD", [50.0, 50.0, 50.0],
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64,
        "INPUT.MAX_SIZE_TEST", 64, "INPUT.RANDOM_FLIP", "none", "SOLVER.IMS_PER_BATCH", 4,
        "DATALOADER.NUM_WORKERS", 0, "DATASETS.TRAIN", ("d2norm_synthetic_train",),
        "DATASETS.TEST", ("d2norm_synthetic_val",), "OUTPUT_DIR", str(tmp / "out"),
        "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data"), "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64,
        "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 8, "D2NORM.DATA.SYNTHETIC_NUM_VAL", 4,
    ])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two checkpoints of a tiny RetinaNet (R18 / 16-channel FPN, 64 px): a few SGD steps, then more."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from d2norm.engine import cli as tc
    from d2norm.data import prepare_datasets
    from d2norm.layers import build_model

    tmp = tmp_path_factory.mktemp("tools")
    cfg = _cfg(tmp)
    prepare_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    data = iter(tc.train_style_loader(cfg, "d2norm_synthetic_train", 4, seed=1))
    ckpts = []
    with EventStorage():
        for it in range(1, 5):
            loss = sum(model(next(data)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if it in (2, 4):
                DetectionCheckpointer(model, save_dir=str(tmp)).save(f"tiny_{it}", iteration=it)
                ckpts.append(str(tmp / f"tiny_{it}.pth"))
    yaml = tmp / "tiny.yaml"
    yaml.write_text(cfg.dump())
    return {"cfg": cfg, "yaml": str(yaml), "ckpts": ckpts, "tmp": tmp,
            "opts": ["D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data")]}


def _load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _tensor(v):
    return torch.as_tensor(v)


# ---- CLI basics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOOLS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _tool(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config-file" in out and "--weights" in out and "usage" in out


@pytest.mark.parametrize("name", TOOLS)
def test_clear_errors(name, tiny, capsys, tmp_path):
    main = _tool(name).main
    w = tiny["ckpts"][:1]
    out = ["--output-dir", str(tmp_path)]  # after the (possibly several) checkpoints, before the cfg overrides
    cases = [
        (["--config-file", str(tmp_path / "nope.yaml"), "--weights", *w, *out], "config file not found"),
        (["--config-file", tiny["yaml"], "--weights", str(tmp_path / "missing.pth"), *out, *tiny["opts"]],
         "checkpoint not found"),
        (["--config-file", tiny["yaml"], "--weights", *w, *out, "DATASETS.TEST", "('no_such_dataset',)",
          "DATASETS.TRAIN", "('no_such_dataset',)", *tiny["opts"]], "not registered"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: ") and msg in lines[-1], err
        if "--- Logging error ---" not in err:  # (stale log handlers of other test modules may print one)
            assert "Traceback" not in err, err


# ---- recompute_bn_stats -----------------------------------------------------------------------------------
def test_recompute_bn_stats_equals_direct_precise_bn(tiny, tmp_path):
    from detectron2.layers import FrozenBatchNorm2d

    from d2norm.engine import cli as tc
    from d2norm.stats import recompute_population_stats

    src = tiny["ckpts"][1]
    out = tmp_path / "rc"
    rc = _tool("recompute_bn_stats").main([
        "--config-file", tiny["yaml"], "--weights", src, "--num-samples", "8", "--batch-size", "4", "--eval",
        "--output-dir", str(out), "--output-name", "rc", *tiny["opts"]])
    assert rc == 0
    new = _load_state(out / "rc.pth")
    report = json.loads((out / "rc.json").read_text())
    assert report["dataset"] == "d2norm_synthetic_train" and report["num_samples"] == 8
    assert "bbox" in report["before"] and "bbox" in report["after"]

    # the same PreciseBN run directly (same loader, same seed)
    model = tc.load_model(tiny["cfg"], src)
    loader = tc.train_style_loader(tiny["cfg"], "d2norm_synthetic_train", 4, seed=0)
    recompute_population_stats(model, loader, 8, batch_size=4, progress=False)
    direct = model.state_dict()
    old = _load_state(src)
    frozen = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen  # the stem
    changed = 0
    for k, v in direct.items():
        torch.testing.assert_close(_tensor(new[k]).to(v.dtype), v, rtol=1e-5, atol=1e-6, msg=k)
        if k.endswith(("running_mean", "running_var")) and k.rsplit(".", 1)[0] not in frozen:
            changed += int(not torch.allclose(_tensor(old[k]).to(v.dtype), v))
        else:  # nothing but population statistics changes
            assert torch.equal(_tensor(old[k]).to(v.dtype), v), k
    assert changed > 10


def test_recompute_bn_stats_inference_forward_on_other_domain(tiny, tmp_path):
    """Adaptive BN (rethinking §5.1): statistics from the (unlabeled-style) val set through the inference path
    equal the population statistics of the norm layers' inputs."""
    from d2norm.engine import cli as tc
    from d2norm.stats import recompute_population_stats

    src = tiny["ckpts"][0]
    rc = _tool("recompute_bn_stats").main([
        "--config-file", tiny["yaml"], "--weights", src, "--dataset", "d2norm_synthetic_val", "--forward",
        "inference", "--num-samples", "4", "--batch-size", "2", "--output-dir", str(tmp_path), "--output-name",
        "val_stats", *tiny["opts"]])
    assert rc == 0
    new = _load_state(tmp_path / "val_stats.pth")
    model = tc.load_model(tiny["cfg"], src)
    with tc.norm_layers_training(model):
        recompute_population_stats(model, tc.test_loader(tiny["cfg"], "d2norm_synthetic_val"), 4, batch_size=2,
                                   progress=False)
    assert model.training  # flags restored
    key = "head.cls_subnet.1.2.running_var"  # per-level BN of the head, level 2
    assert key in new
    for k, v in model.state_dict().items():
        torch.testing.assert_close(_tensor(new[k]).to(v.dtype), v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(_tensor(_load_state(src)[key]), _tensor(new[key]))


# ---- fit_evalnorm -----------------------------------------------------------------------------------------
def test_fit_evalnorm_changes_only_alpha_beta(tiny, tmp_path):
    src = tiny["ckpts"][1]
    rc = _tool("fit_evalnorm").main([
        "--config-file", tiny["yaml"], "--weights", src, "--iters", "2", "--batch-size", "2", "--lr", "0.5",
        "--output-dir", str(tmp_path), "--output-name", "fit", *tiny["opts"]])
    assert rc == 0
    old, new = _load_state(src), _load_state(tmp_path / "fit.pth")
    for k, v in old.items():  # every BN-checkpoint entry is unchanged
        assert torch.equal(_tensor(new[k]), _tensor(v)), k
    added = set(new) - set(old)
    suffixes = ("alpha_logit", "beta_logit", "seen_batch_size", "seen_batches")
    for k in added - {k for k in added if k.endswith(suffixes)}:
        # detectron2's per-level head BN (CycleBatchNormList) has affine-less children: the converted layer
        # gets an identity affine (γ = 1, β = 0), so its output is unchanged
        assert k.startswith("head.") and k.endswith((".weight", ".bias")), k
        assert torch.equal(new[k], torch.ones_like(new[k]) if k.endswith("weight") else torch.zeros_like(new[k]))
    assert any(k.endswith("alpha_logit") for k in added)
    assert not any(k.startswith("backbone.bottom_up.stem") for k in added)  # the FrozenBN stem stays
    init = torch.logit(torch.tensor(0.1))
    alphas = [float(new[k]) for k in added if k.endswith("alpha_logit")]
    assert any(abs(a - float(init)) > 1e-4 for a in alphas)  # the fit moved alpha
    report = json.loads((tmp_path / "fit.json").read_text())
    assert len(report["losses"]) == 2 and report["method"] == "offline"
    # the written config evaluates the new checkpoint with EvalNorm layers in "offline" mode
    from d2norm.engine import cli as tc
    from d2norm.layers.evalnorm import EvalNorm2d

    cfg = tc.load_cfg(str(tmp_path / "fit.yaml"), tiny["opts"])
    assert cfg.MODEL.RESNETS.NORM == "EvalNorm" and cfg.D2NORM.EVALNORM.MODE == "offline"
    model = tc.load_model(cfg)
    ens = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    assert ens and all(m.mode == "offline" for m in ens)


def test_fit_evalnorm_rule_on_evalnorm_checkpoint(tiny, tmp_path):
    """--rule B on a checkpoint that already has EvalNorm layers: α̂ = β̂ = 1/B², nothing else changes."""
    first = tmp_path / "a"
    assert _tool("fit_evalnorm").main([
        "--config-file", tiny["yaml"], "--weights", tiny["ckpts"][0], "--rule", "4", "--output-dir", str(first),
        "--output-name", "rule", *tiny["opts"]]) == 0
    old = _load_state(first / "rule.pth")
    logit = float(torch.logit(torch.tensor(1 / 16, dtype=torch.float64)))
    for k in old:
        if k.endswith(("alpha_logit", "beta_logit")):
            assert abs(float(old[k]) - logit) < 1e-5
    second = tmp_path / "b"
    assert _tool("fit_evalnorm").main([
        "--config-file", str(first / "rule.yaml"), "--weights", str(first / "rule.pth"), "--rule", "8",
        "--output-dir", str(second), "--output-name", "rule8", *tiny["opts"]]) == 0
    new = _load_state(second / "rule8.pth")
    logit8 = float(torch.logit(torch.tensor(1 / 64, dtype=torch.float64)))
    assert set(new) == set(old)  # backbone EvalNorm layers loaded as such; per-level head BNs converted again
    cfg = (first / "rule.yaml").read_text()
    assert "NORM: EvalNorm" in cfg and "MODE: offline" in cfg
    for k, v in old.items():
        if k.endswith(("alpha_logit", "beta_logit")):
            assert abs(float(new[k]) - logit8) < 1e-5
        else:
            assert torch.equal(_tensor(new[k]), _tensor(v)), k


# ---- tune_example_weight ----------------------------------------------------------------------------------
def test_tune_example_weight_alpha0_is_plain_bn(tiny, tmp_path):
    from d2norm.engine import cli as tc

    src = tiny["ckpts"][1]
    rc = _tool("tune_example_weight").main([
        "--config-file", tiny["yaml"], "--weights", src, "--alphas", "1.0", "0.5", "--output-dir", str(tmp_path),
        *tiny["opts"]])
    assert rc == 0
    rep = json.loads((tmp_path / "example_weight_sweep.json").read_text())
    assert rep["alphas"] == [0.0, 0.5, 1.0] and rep["alpha0_matches_base"] is True
    assert tc.same_results(rep["results"]["0"], rep["base"])
    # stronger than the (tiny model's) AP: α = 0 gives exactly the plain model's detections, α = 1 others
    def dets(tag):
        return json.loads((tmp_path / "inference" / tag / "coco_instances_results.json").read_text())

    base_dets = dets("base")
    assert len(base_dets) > 10
    assert dets("alpha_0") == base_dets and dets("alpha_1") != base_dets
    # the base AP is the plain checkpoint's AP
    model = tc.load_model(tiny["cfg"], src)
    direct = tc.evaluate(tiny["cfg"], model, "d2norm_synthetic_val", str(tmp_path / "direct"))
    assert tc.same_results(direct, rep["base"])
    assert json.loads((tmp_path / "direct" / "coco_instances_results.json").read_text()) == base_dets
    assert rep["best_alpha"] in rep["alphas"]
    assert rep["layers"] and not any("stem" in n for n in rep["layers"])
    with pytest.raises(ValueError):
        _tool("tune_example_weight").run(_tool("tune_example_weight").build_parser().parse_args(
            ["--config-file", tiny["yaml"], "--weights", src, "--alphas", "1.5", "--output-dir", str(tmp_path)]))


# ---- analyze_bn -------------------------------------------------------------------------------------------
def _direct_batch_means(model, batches, layer_names):
    from detectron2.utils.events import EventStorage

    model = copy.deepcopy(model).train()
    mods = dict(model.named_modules())
    seen = {n: [] for n in layer_names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, inp, n=n: seen[n].append(inp[0].double().mean((0, 2, 3))))
             for n in layer_names]
    with torch.no_grad(), EventStorage():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def _direct_esm(model, loader):
    """Def. 1 + Def. 2 in float64 from the raw inputs of every BN layer (eval mode)."""
    from detectron2.layers import FrozenBatchNorm2d

    model = copy.deepcopy(model).eval()
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))}
    xs = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: xs[n].append(
        inp[0].double().transpose(0, 1).reshape(inp[0].shape[1], -1))) for n, m in layers.items()]
    with torch.no_grad():
        for b in loader:
            model(b)
    for h in hooks:
        h.remove()
    out = {}
    for n, m in layers.items():
        x = torch.cat(xs[n], 1)
        mu, var = x.mean(1), x.var(1, unbiased=True)
        rm, rv = m.running_mean.double(), m.running_var.double()
        out[n] = (float(((rm - mu) ** 2).sum().sqrt()), float(((rv.sqrt() - var.sqrt()) ** 2).sum().sqrt()))
    return out


def test_analyze_bn_plots_and_json(tiny, tmp_path):
    from d2norm.engine import cli as tc

    layers = ["backbone.bottom_up.res2.0.conv1.norm", "head.cls_subnet.1.3"]
    rc = _tool("analyze_bn").main([
        "--config-file", tiny["yaml"], "--weights", *tiny["ckpts"], "--num-batches", "3", "--batch-size", "2",
        "--layers", *layers, "--channels", "0", "5", "--output-dir", str(tmp_path), *tiny["opts"]])
    assert rc == 0
    for png in ("fig2_batch_stats.png", "esm.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    rep = json.loads((tmp_path / "analyze_bn.json").read_text())
    assert [c["label"] for c in rep["checkpoints"]] == ["iter 2", "iter 4"]
    cfg = tiny["cfg"]
    for ck, path in zip(rep["checkpoints"], tiny["ckpts"]):
        model = tc.load_model(cfg, path)
        # (a) Fig. 2: batch means of the same training-mode batches, EMA, mean of batch means
        batches = [b for _, b in zip(range(3), tc.train_style_loader(cfg, "d2norm_synthetic_train", 2, seed=0))]
        direct = _direct_batch_means(model, batches, layers)
        mods = dict(model.named_modules())
        for n in layers:
            for c in (0, 5):
                d = ck["fig2"][n][str(c)]
                ref = [float(v[c]) for v in direct[n]]
                assert d["batch_means"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
                assert d["population_mean"] == pytest.approx(sum(ref) / 3, rel=1e-5, abs=1e-6)
                assert d["ema_mean"] == pytest.approx(float(mods[n].running_mean[c]), rel=1e-6, abs=1e-7)
        # (b) ESM of every BN layer in depth order
        ref = _direct_esm(model, tc.test_loader(cfg, "d2norm_synthetic_val"))
        got = {e["layer"]: e for e in ck["esm"]}
        assert set(got) == set(ref)
        assert [e["depth"] for e in ck["esm"]] == list(range(len(ref)))
        assert ck["esm"][0]["layer"] == "backbone.bottom_up.stem.conv1.norm"
        for n, (mu, sigma) in ref.items():
            assert got[n]["esm_mu"] == pytest.approx(mu, rel=1e-4, abs=1e-6), n
            assert got[n]["esm_sigma"] == pytest.approx(sigma, rel=1e-4, abs=1e-6), n
    # the checkpoints differ, so do their EMA values
    a, b = (ck["fig2"][layers[0]]["0"]["ema_mean"] for ck in rep["checkpoints"])
    assert a != b


# ---- several processes (gloo) ----------------------------------------------------------------------------
def test_recompute_two_processes_equals_one(tiny, tmp_path):
    """rethinking A.3 exact layer-wise statistics over the whole val split do not depend on how the images are
    batched or sharded: 2 gloo processes (the CLI's --num-gpus 2: each forwards its share, moments all-reduced)
    equal 1 process."""
    import subprocess
    import sys

    common = [sys.executable, os.path.join(ROOT, "tools", "recompute_bn_stats.py"), "--config-file", tiny["yaml"],
              "--weights", tiny["ckpts"][1], "--dataset", "d2norm_synthetic_val", "--forward", "inference",
              "--exact-layerwise", "--num-samples", "4", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        res = subprocess.run(common + ["--num-gpus", str(n), "--output-dir", str(out), *tiny["opts"]], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        outs[n] = _load_state(out / "tiny_4_precise_bn_d2norm_synthetic_val.pth")
    src = _load_state(tiny["ckpts"][1])
    stats = [k for k in outs[1] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        torch.testing.assert_close(outs[2][k], outs[1][k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(outs[1][k], src[k]) for k in stats)


def test_single_process_tools_refuse_num_gpus(tiny, tmp_path, capsys):
    rc = _tool("analyze_bn").main(["--config-file", tiny["yaml"], "--weights", tiny["ckpts"][0], "--num-gpus", "2",
                                   "--output-dir", str(tmp_path), *tiny["opts"]])
    assert rc == 2 and "runs in one process" in capsys.readouterr().err


def test_training_tools_default_to_a_free_port_so_two_multiprocess_runs_coexist():
    """detectron2's default --dist-url is one fixed port per user (two 2-process trainings at once on one
    machine failed with EADDRINUSE); the training tools default to launch()'s free port, an explicit URL wins."""
    from d2norm.engine.cli import training_parser

    for parser in (training_parser(), training_parser(_tool("train_net").argument_parser())):
        assert parser.parse_args(["--num-gpus", "2"]).dist_url == "auto"
        assert parser.parse_args(["--dist-url", "tcp://127.0.0.1:1234"]).dist_url == "tcp://127.0.0.1:1234"


@pytest.mark.parametrize("tail", [["MODEL.DEVICE", "cpu", "SEED", "3"], ["--", "MODEL.DEVICE", "cpu", "SEED", "3"]])
def test_tune_example_weight_alphas_then_overrides(tail):
    """``--alphas 0 0.5 KEY VALUE`` (was: "invalid float value: 'MODEL.DEVICE'"), with or without ``--``."""
    from d2norm.engine import cli

    tool = _tool("tune_example_weight")
    args = cli.parse_tool_args(tool.build_parser(), ["--config-file", "c.yaml", "--weights", "w.pth", "--alphas",
                                                     "0", "0.5", *tail])
    assert args.alphas == [0.0, 0.5]
    assert args.opts == ["MODEL.DEVICE", "cpu", "SEED", "3"]
    args = cli.parse_tool_args(tool.build_parser(), ["--config-file", "c.yaml", "--alphas", "0.1", "--weights", "w"])
    assert args.alphas == [0.1] and args.opts == [] and args.weights == "w"


def test_tune_example_weight_bad_alpha_is_a_usage_error(capsys):
    from d2norm.engine import cli

    tool = _tool("tune_example_weight")
    with pytest.raises(SystemExit) as e:
        cli.parse_tool_args(tool.build_parser(), ["--config-file", "c.yaml", "--alphas", "0", "half"])
    assert e.value.code == 2 and "--alphas: invalid number 'half'" in capsys.readouterr().err
