"""Paper-effects suite: the verdict rule, the JSON record, the runner's bookkeeping, every experiment
definition's conditions and commands, and (slow) one experiment end to end at a tiny schedule."""
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from d2norm.experiments import (
    EXPERIMENTS,
    REQUIRED_KEYS,
    Context,
    Experiment,
    clause_verdict,
    get_experiments,
    parse_coco_log,
    parse_expected,
    result_record,
    run_experiment,
    verdict,
)
from d2norm.experiments.core import combine_verdicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clause(text, conds=("A", "B", "C", "D")):
    return parse_expected(text, conds)[0]


# ---- verdict rule -------------------------------------------------------------------------------------------
def test_paired_yes_no_inconclusive():
    c = _clause("A > B")
    # per-seed differences 2, 3: mean 2.5 > std 0.707 -> yes
    r = clause_verdict(c, {"A": [12.0, 13.0], "B": [10.0, 10.0]}, paired=True)
    assert r["verdict"] == "yes" and r["gap"] == pytest.approx(2.5) and r["spread"] == pytest.approx(math.sqrt(0.5))
    # differences 0.1 and 3.0: mean 1.55 < std 2.05 -> inconclusive (right direction, within spread)
    r = clause_verdict(c, {"A": [10.1, 13.0], "B": [10.0, 10.0]}, paired=True)
    assert r["verdict"] == "inconclusive" and r["spread"] == pytest.approx(math.sqrt(((0.1 - 1.55) ** 2 + 1.45 ** 2)))
    # mean difference negative -> no
    r = clause_verdict(c, {"A": [9.0, 10.5], "B": [10.0, 10.0]}, paired=True)
    assert r["verdict"] == "no" and r["gap"] == pytest.approx(-0.25)


def test_paired_removes_training_noise_unpaired_does_not():
    # A is always 1 AP above B on the same checkpoint, but the checkpoints differ by 6 AP between seeds
    v = {"A": [11.0, 5.0], "B": [10.0, 4.0]}
    c = _clause("A > B")
    assert clause_verdict(c, v, paired=True)["verdict"] == "yes"
    unpaired = clause_verdict(c, v, paired=False)
    assert unpaired["verdict"] == "inconclusive"
    assert unpaired["gap"] == pytest.approx(1.0) and unpaired["spread"] == pytest.approx(math.sqrt(18.0))


def test_difference_terms():
    c = _clause("A - B > C - D")
    v = {"A": [5.0, 6.0], "B": [1.0, 1.0], "C": [3.0, 3.0], "D": [2.0, 2.5]}
    r = clause_verdict(c, v, paired=True)
    # per seed (A-B)-(C-D): 4-1 = 3, 5-0.5 = 4.5
    assert r["gap"] == pytest.approx(3.75) and r["verdict"] == "yes"


def test_approx_clause():
    c = _clause("A ~= B")
    assert clause_verdict(c, {"A": [10.0, 10.4], "B": [10.2, 10.0]}, True, approx_tol=1.0)["verdict"] == "yes"
    assert clause_verdict(c, {"A": [14.0, 14.2], "B": [10.0, 10.0]}, True, approx_tol=1.0)["verdict"] == "no"
    # 1.5 apart on average but 2 AP of spread: cannot tell
    assert clause_verdict(c, {"A": [10.0, 13.0], "B": [10.0, 10.0]}, True, approx_tol=1.0)["verdict"] == "inconclusive"


def test_one_seed_or_nan_is_inconclusive():
    c = _clause("A > B")
    assert clause_verdict(c, {"A": [20.0], "B": [1.0]}, paired=True)["verdict"] == "inconclusive"
    assert clause_verdict(c, {"A": [20.0, float("nan")], "B": [1.0, 1.0]}, paired=False)["verdict"] == "inconclusive"


def test_combine_and_experiment_verdict():
    assert combine_verdicts(["yes", "yes"]) == "yes"
    assert combine_verdicts(["yes", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["inconclusive", "no", "yes"]) == "no"
    with pytest.raises(ValueError, match="maybe"):
        combine_verdicts(["maybe"])
    conds = {"A": {"ap": [12.0, 13.0], "ap50": [0, 0]}, "B": {"ap": [10.0, 10.0], "ap50": [0, 0]},
             "C": {"ap": [16.0, 15.0], "ap50": [0, 0]}}
    v, clauses = verdict("A > B; A > C", conds, paired=False)
    assert v == "no" and [c["verdict"] for c in clauses] == ["yes", "no"]
    v50, _ = verdict("A > B", conds, paired=False, metric="ap50")
    assert v50 == "no"  # identical AP50: a zero gap does not hold the direction


def test_zero_gap_is_no():
    assert clause_verdict(_clause("A > B"), {"A": [1.0, 2.0], "B": [1.0, 2.0]}, True)["verdict"] == "no"


def test_parse_errors_name_the_bad_part():
    with pytest.raises(ValueError, match="unknown condition.*'E'"):
        parse_expected("A > E", ["A", "B"])
    with pytest.raises(ValueError, match="exactly one"):
        parse_expected("A < B", ["A", "B"])
    with pytest.raises(ValueError, match="exactly one"):
        parse_expected("A > B > C", ["A", "B", "C"])
    with pytest.raises(ValueError, match="non-empty"):
        parse_expected("", ["A"])
    with pytest.raises(ValueError, match="COND - COND"):
        parse_expected("A - B - C > D", ["A", "B", "C", "D"])


def test_experiment_definition_is_checked_before_running():
    with pytest.raises(ValueError, match="unknown condition"):
        Experiment("x", "p", "s", "c", {}, ["A", "B"], "A > Z", measure=None, paired=True)
    with pytest.raises(ValueError, match="lower-case"):
        Experiment("Bad Name", "p", "s", "c", {}, ["A", "B"], "A > B", measure=None, paired=True)
    with pytest.raises(ValueError, match="duplicate"):
        Experiment("x", "p", "s", "c", {}, ["A", "A"], "A > A", measure=None, paired=True)


# ---- JSON record ----------------------------------------------------------------------------------------------
def _fake_experiment(values):
    def measure(ctx, seed):
        return values[seed]

    return Experiment("fake_effect", "rethinking", "§3.2, Table 2", "A beats B", {"A": 1.0, "B": 0.5},
                      ["A", "B"], "A > B", measure=measure, paired=True)


def test_result_record_schema_and_values():
    exp = _fake_experiment({0: {"A": (12.0, 30.0), "B": (10.0, 25.0)}, 3: {"A": (13.0, 31.0), "B": (10.0, 26.0)}})
    per_seed = {s: exp.measure(None, s) for s in (3, 0)}
    rec = result_record(exp, per_seed, "python tools/reproduce.py --only fake_effect", 12.5)
    assert set(REQUIRED_KEYS) <= set(rec) and set(rec) - set(REQUIRED_KEYS) == {"details"}
    assert rec["seeds"] == [0, 3]  # sorted, and the per-seed lists follow that order
    assert rec["conditions"] == {"A": {"ap": [12.0, 13.0], "ap50": [30.0, 31.0]},
                                 "B": {"ap": [10.0, 10.0], "ap50": [25.0, 26.0]}}
    assert rec["verdict"] == "yes" and rec["expected"] == "A > B" and rec["wall_s"] == 12.5
    assert rec["paper_values"] == {"A": 1.0, "B": 0.5} and rec["paper"] == "rethinking"
    assert isinstance(rec["commit"], str) and len(rec["commit"]) >= 7
    assert rec["date"].endswith("+00:00")
    assert rec["details"]["clauses"][0]["gap"] == pytest.approx(2.5)
    json.dumps(rec)  # serializable


def test_result_record_rejects_missing_condition():
    exp = _fake_experiment({})
    with pytest.raises(ValueError, match=r"seed 1: conditions \['B'\]"):
        result_record(exp, {0: {"A": (1, 1), "B": (1, 1)}, 1: {"A": (1, 1)}}, "cmd", 0.0)


def test_run_experiment_writes_json_png_and_verdict_line(tmp_path):
    exp = _fake_experiment({0: {"A": (12.0, 30.0), "B": (10.0, 25.0)}, 1: {"A": (9.0, 20.0), "B": (10.0, 22.0)}})
    lines = []
    ctx = Context(work_dir=str(tmp_path / "work"))
    rec = run_experiment(exp, ctx, [0, 1], str(tmp_path / "res"), "cmd", log=lambda *a, **k: lines.append(a[0]),
                         jobs=2)
    on_disk = json.load(open(tmp_path / "res" / "fake_effect.json"))
    assert on_disk["conditions"] == rec["conditions"] and on_disk["verdict"] == "inconclusive"  # +2, -1
    png = open(tmp_path / "res" / "fake_effect.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert lines[-1].startswith("[fake_effect] verdict: inconclusive") and "A 10.50 ± 2.12" in lines[-1]


# ---- runner bookkeeping -----------------------------------------------------------------------------------
COPYPASTE = """[12/01 10:00:00 d2.evaluation.testing]: copypaste: Task: bbox
[12/01 10:00:00 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[12/01 10:00:00 d2.evaluation.testing]: copypaste: 1.0000,2.0000,3.0000,4.0000,5.0000,nan
[12/01 10:00:09 d2.evaluation.testing]: copypaste: Task: bbox
[12/01 10:00:09 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[12/01 10:00:09 d2.evaluation.testing]: copypaste: 9.2800,20.5000,8.0000,4.0000,5.0000,nan
"""


def test_parse_coco_log_takes_the_last_bbox_result():
    res = parse_coco_log(COPYPASTE)
    assert res["AP"] == 9.28 and res["AP50"] == 20.5 and math.isnan(res["APl"])
    assert parse_coco_log("no results here") is None
    assert parse_coco_log(COPYPASTE, task="segm") is None


def test_run_dirs_are_keyed_by_everything_that_changes_a_run(tmp_path):
    from d2norm.experiments.runs import bn_backbone_run

    ctx = Context(work_dir=str(tmp_path))
    a = ctx.run_dir(bn_backbone_run(4), 0)
    assert a == ctx.run_dir(bn_backbone_run(4), 0)
    others = {ctx.run_dir(bn_backbone_run(2), 0), ctx.run_dir(bn_backbone_run(4), 1),
              Context(work_dir=str(tmp_path), data_seed=1).run_dir(bn_backbone_run(4), 0),
              Context(work_dir=str(tmp_path), extra_opts=("SOLVER.MAX_ITER", "5")).run_dir(bn_backbone_run(4), 0),
              ctx.run_dir(bn_backbone_run(4), 0, init_checkpoint="x.pth")}
    assert a not in others and len(others) == 5
    with pytest.raises(ValueError, match="KEY VALUE"):
        Context(work_dir=str(tmp_path), extra_opts=("SOLVER.MAX_ITER",))


def test_bn_backbone_run_scales_lr_linearly():
    from d2norm.experiments.runs import bn_backbone_run

    opts = dict(zip(bn_backbone_run(2).opts[::2], bn_backbone_run(2).opts[1::2]))
    assert opts["SOLVER.IMS_PER_BATCH"] == "2" and opts["SOLVER.BASE_LR"] == "0.01"
    with pytest.raises(ValueError, match="batch must be >= 1"):
        bn_backbone_run(0)


# ---- every definition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda e: e.name)
def test_definition_measures_exactly_its_conditions_with_valid_commands(exp, tmp_path):
    """A dry run (commands recorded, nothing executed) returns every declared condition, and every training
    command's config + overrides load (no unknown cfg key, no missing config file)."""
    from d2norm.engine.cli import load_cfg

    ctx = Context(work_dir=str(tmp_path), dry_run=True, quiet=True)
    out = exp.measure(ctx, 0)
    res = out[0] if isinstance(out, tuple) else out
    assert set(res) == set(exp.conditions)
    trains = [shlex.split(c) for c in ctx.commands if "train_net.py" in c and "--eval-only" not in c]
    assert trains, "every experiment trains something"
    for argv in trains:
        i = argv.index("--config-file")
        opts = argv[i + 2:]
        while opts and opts[0].startswith("--"):
            opts = opts[2:] if opts[0] == "--num-gpus" else opts[1:]
        load_cfg(argv[i + 1], opts)


def test_definitions_cover_the_issue_list_and_names_are_unique():
    names = [e.name for e in EXPERIMENTS]
    assert len(set(names)) == len(names) == 12
    assert get_experiments(["example_weighing"])[0].name == "example_weighing"
    with pytest.raises(ValueError, match="unknown experiment.*valid"):
        get_experiments(["nope"])


def test_cli_list_and_bad_name():
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "tools/reproduce.py", "--list"], cwd=REPO, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0 and all(e.name in p.stdout for e in EXPERIMENTS) and "expected:" in p.stdout
    p = subprocess.run([sys.executable, "tools/reproduce.py", "--only", "nope"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown experiment" in p.stderr


# ---- end to end (tiny schedule) ---------------------------------------------------------------------------
TINY = ("SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(2, 3)", "SOLVER.WARMUP_ITERS", "1",
        "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "8", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "4")


@pytest.mark.slow
def test_example_weighing_end_to_end_tiny(tmp_path):
    """The real ``example_weighing`` definition through tools/reproduce.py on a 4-iteration schedule: two
    trainings (train_net.py) and two α sweeps (tune_example_weight.py), JSON + PNG written."""
    env = dict(os.environ, PYTHONPATH=REPO)
    opts = list(TINY) + ["D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data")]
    p = subprocess.run([sys.executable, "tools/reproduce.py", "--only", "example_weighing", "--seeds", "1",
                        "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "res"), "--opts", *opts],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.load(open(tmp_path / "res" / "example_weighing.json"))
    assert rec["seeds"] == [0] and rec["verdict"] == "inconclusive"  # one seed: no spread to compare with
    assert "--opts" in rec["command"] and rec["wall_s"] > 0
    for b in (2, 4):
        aps = [rec["conditions"][f"B={b} α={a:g}"]["ap"][0] for a in (0.05, 0.1, 0.2, 0.5, 1)]
        # NaN = COCOEvaluator's "no predictions" (a 4-iteration model at α=1 can have none, e.g. on detectron2 main)
        scored = [a for a in aps if a == a]
        assert scored and all(0.0 <= a <= 100.0 for a in scored)
        assert rec["conditions"][f"B={b} best α>0"]["ap"][0] == max(scored)
    assert len(rec["details"]["trainings"]) == 2
    assert os.path.getsize(tmp_path / "res" / "example_weighing.png") > 1000
    assert "[example_weighing] verdict: inconclusive" in p.stdout


def test_markdown_table_lists_records_and_not_run(tmp_path):
    from d2norm.experiments.suite import markdown_table

    exp = _fake_experiment({0: {"A": (12.0, 30.0), "B": (10.0, 25.0)}, 1: {"A": (13.0, 31.0), "B": (10.0, 26.0)}})
    missing = Experiment("other_effect", "mabn", "§5", "X beats Y", {"X": 2}, ["X", "Y"], "X > Y",
                         measure=None, paired=False)
    run_experiment(exp, Context(work_dir=str(tmp_path)), [0, 1], str(tmp_path), "python tools/reproduce.py "
                   "--only fake_effect", log=lambda *a, **k: None)
    table = markdown_table([exp, missing], str(tmp_path)).splitlines()
    assert len(table) == 4
    assert "A 12.50 ± 0.71; B 10.00 ± 0.00" in table[2] and "**yes**" in table[2] and "A: 1.0" in table[2]
    assert "`other_effect`" in table[3] and "not run (time)" in table[3]


def test_esm_growth_and_its_verdict():
    from d2norm.experiments.definitions import _esm_summary, esm_growth

    rising = [{"esm_mu": float(i), "esm_sigma": 2.0 * i} for i in range(6)]  # thirds: [0,1] vs [4,5]
    flat = [{"esm_mu": 1.0, "esm_sigma": 1.0} for _ in range(6)]
    assert esm_growth(rising, "esm_mu") == pytest.approx(4.0) and esm_growth(rising) == pytest.approx(8.0)
    assert esm_growth(flat) == 0.0 and math.isnan(esm_growth(rising[:2]))
    rising2 = [{"esm_mu": 0.5 * i, "esm_sigma": 1.5 * i} for i in range(6)]  # growth 2 / 6
    extras = {"0": {"esm": {"BN": rising, "XBNBlock-GN P2 D1": flat}},
              "1": {"esm": {"BN": rising2, "XBNBlock-GN P2 D1": flat}}}
    s = _esm_summary(extras)
    assert s["esm_sigma_growth"]["values"]["BN"] == pytest.approx([8.0, 6.0])
    assert s["esm_sigma_growth"]["gap"] == pytest.approx(7.0) and s["esm_sigma_growth"]["verdict"] == "yes"
    swapped = {k: {"esm": {"BN": v["esm"]["XBNBlock-GN P2 D1"], "XBNBlock-GN P2 D1": v["esm"]["BN"]}}
               for k, v in extras.items()}
    assert _esm_summary(swapped)["esm_mu_growth"]["verdict"] == "no"


@pytest.mark.slow
def test_continue_a_checkpoint_with_and_without_the_frozen_bn_switch(tmp_path):
    """``Context.train(init_checkpoint=...)`` (the frozen_bn_switch protocol): both continuations start at the
    checkpoint's iteration with its optimizer state; only the switched one converts BN to FrozenBN."""
    from d2norm.experiments.runs import bn_backbone_run

    opts = ("SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1",
            "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "8", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "4",
            "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data"))
    ctx = Context(work_dir=str(tmp_path / "work"), extra_opts=opts, quiet=True)
    run = bn_backbone_run(2, checkpoint_period=2)
    base = ctx.train(run, 0)
    ckpt = ctx.checkpoint(base, 2)
    assert ckpt.endswith("model_0000001.pth")
    cont = ctx.train(run.with_opts("cont"), 0, init_checkpoint=ckpt)
    sw = ctx.train(run.with_opts("sw", "D2NORM.FROZEN_BN_SWITCH.ENABLED", "True", "D2NORM.FROZEN_BN_SWITCH.ITER",
                                 "2", "D2NORM.PRECISE_BN.NUM_SAMPLES", "4"), 0, init_checkpoint=ckpt)
    for t in (cont, sw):
        log = open(os.path.join(t["dir"], "log.txt")).read()
        # NaN = COCOEvaluator's "no predictions" after a few iterations (seen on detectron2 main)
        assert "Starting training from iteration 2" in log and (t["ap"] != t["ap"] or 0.0 <= t["ap"] <= 100.0)
    assert "FrozenBN switch at iteration 2" in open(os.path.join(sw["dir"], "log.txt")).read()
    assert "FrozenBN switch" not in open(os.path.join(cont["dir"], "log.txt")).read()
    assert ctx.train(run.with_opts("cont"), 0, init_checkpoint=ckpt) == cont  # reused, not retrained


def test_finished_run_is_reused_with_this_checkouts_paths(tmp_path, monkeypatch):
    from d2norm.experiments.runs import bn_backbone_run

    monkeypatch.chdir(tmp_path)
    ctx = Context(work_dir="work")  # relative: made absolute
    assert ctx.work_dir == str(tmp_path / "work")
    run = bn_backbone_run(4)
    out = ctx.run_dir(run, 0)
    os.makedirs(out)
    with open(os.path.join(out, "run.json"), "w") as f:  # written from another cwd, with relative paths
        json.dump({"dir": "elsewhere/x", "final": "elsewhere/x/model_final.pth", "ap": 7.5, "ap50": 20.0,
                   "wall_s": 100.0, "command": "c"}, f)
    info = ctx.train(run, 0)  # no subprocess: the finished run is reused
    assert info["dir"] == out and info["final"] == os.path.join(out, "model_final.pth") and info["ap"] == 7.5
    assert ctx.commands == [] and ctx.trainings == [{"dir": out, "wall_s": 100.0, "commit": None,
                                                     "environment": None}]


def test_concurrent_trainings_record_their_own_command_and_the_code_commit(tmp_path, monkeypatch):
    """``--jobs 2`` runs seeds in threads that share ``Context.commands``: each run.json must record the command
    that trained *it* (a record once named the other seed's command, still running when the first finished) and
    the commit of the code that trained it."""
    import threading
    import time
    import types

    from d2norm.experiments import runner
    from d2norm.experiments.core import code_commit, training_environment
    from d2norm.experiments.runs import bn_backbone_run

    second_started = threading.Event()

    def fake_run(argv, cwd, env, stdout, stderr):  # a training that writes detectron2's COCO lines
        seed = int(argv[argv.index("SEED") + 1])
        if seed == 0:  # seed 0 finishes after seed 1 has started (and appended its command)
            assert second_started.wait(10)
            time.sleep(0.05)
        else:
            second_started.set()
        out = argv[argv.index("OUTPUT_DIR") + 1]
        with open(os.path.join(out, "log.txt"), "w") as f:
            f.write(f"copypaste: Task: bbox\ncopypaste: AP,AP50\ncopypaste: {seed + 1}.0,{seed + 10}.0\n")
        return subprocess.CompletedProcess(argv, 0)

    # only the runner's subprocesses are faked (code_commit's git calls are real)
    monkeypatch.setattr(runner, "subprocess", types.SimpleNamespace(run=fake_run, STDOUT=subprocess.STDOUT))
    ctx = Context(work_dir=str(tmp_path), quiet=True)
    run = bn_backbone_run(2)
    infos = {}

    def train(seed):
        infos[seed] = ctx.train(run, seed)

    threads = [threading.Thread(target=train, args=(s,)) for s in (0, 1)]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(20)
    commit = code_commit()
    for seed in (0, 1):
        rec = json.load(open(os.path.join(ctx.run_dir(run, seed), "run.json")))
        argv = shlex.split(rec["command"])
        assert argv[argv.index("SEED") + 1] == str(seed) and rec["ap"] == seed + 1.0
        assert argv[argv.index("OUTPUT_DIR") + 1] == ctx.run_dir(run, seed)
        assert infos[seed]["command"] == rec["command"] and rec["commit"] == commit
        assert rec["environment"] == training_environment() and rec["environment"]["cpu_capability"]
        assert rec["threads"] == 1
    assert sorted(t["commit"] for t in ctx.trainings) == [commit, commit]


def test_finished_run_of_a_changed_config_is_refused_not_reused(tmp_path):
    """The run directory is keyed by the config *path* and the overrides: a finished run records the digest of
    the config and its _BASE_ chain, and reusing it after the file changed is an error naming the run."""
    from d2norm.experiments.runner import ExperimentError, Run, config_digest

    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 400\n")
    (tmp_path / "child.yaml").write_text('_BASE_: "base.yaml"\nSEED: 3\n')
    cfg = str(tmp_path / "child.yaml")
    ctx = Context(work_dir=str(tmp_path / "work"))
    run = Run("r", cfg)
    out = ctx.run_dir(run, 0)
    os.makedirs(out)
    before = config_digest(cfg)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({"dir": out, "final": "f", "ap": 1.0, "ap50": 2.0, "wall_s": 1.0, "command": "c",
                   "config_sha": before}, f)
    assert ctx.train(run, 0)["ap"] == 1.0  # unchanged: reused
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 800\n")  # a _BASE_ file changed
    assert config_digest(cfg) != before
    with pytest.raises(ExperimentError, match="another version"):
        ctx.train(run, 0)


def test_dry_run_prints_no_verdict(tmp_path):
    """``reproduce.py --dry-run`` measured nothing: it says "dry run", never "verdict: inconclusive" on NaN APs."""
    from d2norm.experiments import run_experiment

    ctx = Context(work_dir=str(tmp_path), dry_run=True, quiet=True)
    lines = []
    rec = run_experiment(EXPERIMENTS[0], ctx, [0], str(tmp_path / "out"), "cmd", log=lambda *a, **k: lines.append(a[0]))
    assert rec["verdict"] == "dry run"
    assert any("dry run:" in ln and "nothing trained or measured" in ln for ln in lines)
    assert not any("verdict:" in ln for ln in lines)
    assert not (tmp_path / "out").exists()
