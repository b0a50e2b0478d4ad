"""The paper-row catalogue (configs/paper_rows.yaml): every row's config exists, its built cfg and model carry what
the paper states (norm of every part read from the built model; images per iteration, iterations, LR, training
sizes, norm options), deviations are listed with a reason; docs/paper_rows.md's table is the generated one; the check fails
on a row that does not conform."""
import copy
import importlib.util
import os

import pytest

import d2norm  # noqa: F401
from d2norm.paper_rows import check_row, load_rows, markdown_table, part_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = load_rows()
IDS = [f"{r['paper']}-T{r['table']}-{r['row']}" for r in ROWS]


def test_catalogue_covers_every_paper_and_configs_exist():
    assert {r["paper"] for r in ROWS} == {"mabn", "rethinking", "evalnorm", "estimation-shift"}
    assert len(set(IDS)) == len(IDS)
    for r in ROWS:
        assert os.path.isfile(os.path.join(ROOT, r["config"])), r["config"]
        assert r["ap"] and all(isinstance(v, float) for v in r["ap"].values())
        for why in (r.get("deviations") or {}).values():
            assert isinstance(why, str) and len(why) > 20  # a reason, not a flag
    counts = {p: sum(r["paper"] == p for r in ROWS) for p in ("mabn", "rethinking", "evalnorm", "estimation-shift")}
    assert counts == {"mabn": 12, "rethinking": 18, "evalnorm": 24, "estimation-shift": 27}, counts


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_row_conforms_to_the_paper(row):
    assert check_row(row) == []


def test_the_check_can_fail():
    from d2norm.layers import build_model
    from d2norm.paper_rows import row_cfg

    row = next(r for r in ROWS if r["config"].endswith("table5_mabn_heads_scratch_2x.yaml"))
    model = build_model(row_cfg(row))
    wrong = copy.deepcopy(row)
    wrong["stated"]["norms"]["fpn"] = None  # the old config's "FPN keeps no norm"
    wrong["stated"]["max_iter"] = 90000
    wrong["stated"]["options"]["D2NORM.MABN.BUFFER_SIZE"] = 16
    problems = check_row(wrong, model=model)
    assert any(p.startswith("norms.fpn: paper None, config 'MABN'") for p in problems), problems
    assert any(p.startswith("SOLVER.MAX_ITER") for p in problems)
    assert any(p.startswith("D2NORM.MABN.BUFFER_SIZE") for p in problems)
    overridden = copy.deepcopy(row)
    overridden["overrides"] = ["MODEL.FPN.NORM", "", "INPUT.MIN_SIZE_TRAIN", "(640, 800)"]
    problems = check_row(overridden)
    assert any(p.startswith("norms.fpn: paper 'MABN', config None") for p in problems), problems
    assert any(p.startswith("INPUT.MIN_SIZE_TRAIN") for p in problems)
    allowed = copy.deepcopy(overridden)
    allowed["deviations"] = {"INPUT.MIN_SIZE_TRAIN": "a deliberate deviation, listed with its reason here"}
    assert not any(p.startswith("INPUT.MIN_SIZE_TRAIN") for p in check_row(allowed))


def test_part_norms_reads_the_model():
    from helpers import tiny_retinanet_cfg

    from d2norm.layers import build_model

    got = part_norms(build_model(tiny_retinanet_cfg("GhostBN")))
    assert got == {"backbone": "GhostBN", "fpn": None, "retinanet_head": "GhostBN"}


def test_readme_table_is_generated_from_the_catalogue():
    spec = importlib.util.spec_from_file_location("_paper_rows_tool", os.path.join(ROOT, "tools", "paper_rows.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = open(os.path.join(ROOT, "docs", "paper_rows.md")).read()
    assert tool.replace_block(text, markdown_table(ROWS)) == text, \
        "run: python tools/paper_rows.py --readme docs/paper_rows.md"
    assert tool.main(["--paper", "nope"]) == 2


# ---- smoke: every distinct (architecture, norm layout) trains 2 iterations at 64 px and evaluates -------------------
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", "64", "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "4",
        "D2NORM.DATA.SYNTHETIC_NUM_VAL", "2", "DATASETS.TRAIN", "('d2norm_synthetic_train',)", "DATASETS.TEST",
        "('d2norm_synthetic_val',)", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.002", "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD",
        "0", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST",
        "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
        "D2NORM.PRECISE_BN.NUM_SAMPLES", "4",
        "D2NORM.PRECISE_BN.BATCH_SIZE", "2", "D2NORM.FROZEN_BN_SWITCH.ITER", "1",
        "D2NORM.FROZEN_BN_SWITCH.WARMUP_ITERS", "0", "D2NORM.EVALNORM_MODEL.LOG_PERIOD", "0"]


def _signature(row):
    """(meta-architecture, backbone builder, box / mask head builders, norm of every part): rows that share it
    train through the same code."""
    from d2norm.paper_rows import row_cfg

    cfg = row_cfg(row)
    n = row["stated"]["norms"]
    return (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_BOX_HEAD.NAME,
            cfg.MODEL.ROI_MASK_HEAD.NAME if cfg.MODEL.MASK_ON else "", cfg.D2NORM.PRECISE_BN.ENABLED,
            cfg.D2NORM.FROZEN_BN_SWITCH.ENABLED, cfg.D2NORM.SHUFFLE_HEAD.ENABLED,
            tuple((k, str(v)) for k, v in sorted(n.items())))


def _smoke_rows():
    seen, out = set(), []
    for r in ROWS:
        s = _signature(r)
        if s not in seen:
            seen.add(s)
            out.append(r)
    return out


SMOKE = _smoke_rows()


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """One folder for every smoke run (``<root>/<row_slug>``, as tools/paper_rows.py --commands lays a table out)
    and one synthetic set."""
    return tmp_path_factory.mktemp("paper_rows_smoke")


@pytest.mark.slow
@pytest.mark.parametrize("row", SMOKE, ids=[f"{r['paper']}-T{r['table']}-{r['row']}" for r in SMOKE])
def test_row_trains_two_iterations_and_evaluates(row, smoke_root):
    """The row's own architecture and norms (only sizes, batch, schedule length, data and — without its ImageNet
    weights, e.g. the no-norm head row on an identity FrozenBN backbone, the paper's LR diverges in one step — the
    LR overridden) trains with finite losses and is COCO-evaluated: configs that load but do not train are caught
    here."""
    import json
    import math
    import sys

    import torch
    from detectron2.engine import default_argument_parser

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_net

    from d2norm.paper_rows import row_slug

    out = smoke_root / row_slug(row)
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, row["config"]), *row.get("overrides", []), *TINY,
         "OUTPUT_DIR", str(out), "D2NORM.DATA.SYNTHETIC_ROOT", str(smoke_root / "data")])
    torch.manual_seed(0)
    results = train_net.main(args)
    ap = results["bbox"]["AP"]  # COCO evaluation ran; after 2 iterations a model may detect nothing (AP nan)
    assert ap != ap or 0.0 <= ap <= 100.0, results
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if x.strip()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses), losses


def test_smoke_covers_every_layout():
    assert len(SMOKE) >= 15 and {r["paper"] for r in SMOKE} == {r["paper"] for r in ROWS}


def _tool():
    spec = importlib.util.spec_from_file_location("_paper_rows_tool2", os.path.join(ROOT, "tools", "paper_rows.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.slow
def test_collect_reads_the_smoke_runs_into_the_paper_table(smoke_root, capsys):
    """Runs after the smoke trainings (same module): their metrics.json under <root>/<config name> are the table's
    "ours"; rows without a run stay "-"."""
    import json

    from d2norm.paper_rows import collect

    got = {c["config"]: c for c in collect(ROWS, str(smoke_root))}
    ran = [r for r in SMOKE if (smoke_root / __import__("d2norm.paper_rows").paper_rows.row_slug(r) / "metrics.json").exists()]
    assert ran, "the smoke trainings wrote no metrics.json"
    for r in ran:
        c = got[r["config"]]
        assert c["ours"] is not None and set(c["ours"]) == set(r["ap"]) & set(c["ours"])
        assert c["delta"]["bbox"] == pytest.approx(c["ours"]["bbox"] - r["ap"]["bbox"], nan_ok=True)
    assert _tool().main(["--collect", str(smoke_root)]) == 0
    out = capsys.readouterr().out
    assert f"{sum(got[c]['ours'] is not None for c in got)} of {len(ROWS)} rows have results" in out
    saved = json.loads((smoke_root / "paper_rows.json").read_text())
    assert len(saved) == len(ROWS) and (smoke_root / "paper_rows.md").read_text().startswith("| paper | table |")


def test_commands_give_each_row_its_workers(capsys):
    from d2norm.paper_rows import launch_commands

    rows = [r for r in ROWS if r["paper"] == "rethinking" and r["table"] == "6"]
    plans = {p["row"]["row"]: p for p in launch_commands(rows, 8, "out")}
    one = plans["row 2 (BN, 2 img/GPU, μ_pop)"]
    assert one["machines"] == 1 and one["commands"][0][:4] == ["python", "tools/train_net.py", "--num-gpus", "8"]
    assert one["commands"][0][-2:] == ["OUTPUT_DIR", "out/mask_rcnn_R50_FPN_table6_row2"]
    two = plans["row 1 (BN, 1 img/GPU, μ_pop)"]  # 16 workers of 1 image: two machines of 8
    assert two["machines"] == 2 and [c[c.index("--machine-rank") + 1] for c in two["commands"]] == ["0", "1"]
    assert launch_commands(rows, 16, "out")[0]["machines"] == 1
    with pytest.raises(ValueError, match="needs 8 workers of 2 image"):
        launch_commands([r for r in rows if r["row"].startswith("row 2")], 3, "out")
    tool = _tool()
    assert tool.main(["--paper", "rethinking", "--table", "6", "--launch", "--gpus-per-machine", "8"]) == 2
    assert "need 2+ machines" in capsys.readouterr().err  # nothing was started
