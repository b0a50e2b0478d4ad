"""The paper-row catalogue (configs/paper_rows.yaml): every row's config exists, its built cfg and model carry what
the paper states (norm of every part read from the built model; images per iteration, iterations, LR, training
sizes, norm options), deviations are listed with a reason; README's table is the generated one; the check fails
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
    text = open(os.path.join(ROOT, "README.md")).read()
    assert tool.replace_block(text, markdown_table(ROWS)) == text, "run: python tools/paper_rows.py --readme README.md"
    assert tool.main(["--paper", "nope"]) == 2
