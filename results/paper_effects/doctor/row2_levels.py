"""Which FPN levels' per-level population statistics cost RetinaNet Table 5 row 2 its AP (rethinking §5.2).

For each row-1 run directory given (shared training statistics, checkpoint ``model_final.pth``) two PreciseBN
passes exist or are made, both N = 256, B = 16, seed 0 as in the experiment: the row-2 one
(``measure/table5_pop_per_level/precise.pth``: per-level population statistics of every head BN layer, shape (5, C),
each level normalized by its own statistics in the pass — the per-level inference path) and a row-1 one with
shared population statistics (made here: ``tools/recompute_bn_stats.py`` with the row-1 layout). The head is
applied to each level separately, so a model whose head BN rows are row 2's at the levels in L and row 1's
(replicated) at the others normalizes every level in L exactly as row 2 and every other level exactly as row 1
with PreciseBN statistics. Each such model is evaluated with the row-2 config (``train_net.py --eval-only``).

Conditions: ``E`` row 1's statistics at every level (the control: equals row 1 with PreciseBN), ``P3`` row 2's at
P3 only, ``P4-7`` row 2's at P4–P7 only, ``B`` row 2's everywhere (row 2). Expectation and results: README.md here.

The first version of this ablation put at the other levels the union of the per-level populations (μ = Σ w_j μ_j,
σ² = Σ w_j (σ_j² + (μ_j − μ)²)): exact for the first BN of each subnet, whose input does not depend on a head norm
(``layer1_pooled_max_abs_diff`` below checks it), but not for the second, whose per-level populations in the row-2
pass are those of inputs normalized per level; its control E was 2.8 AP off row 1 on seed 1.

    PYTHONPATH=. python results/paper_effects/doctor/row2_levels.py /tmp/pe4/runs/retinanet_row1_s{0,1,2}_d0_* \
        --out results/paper_effects/doctor/row2_levels.json
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from d2norm.experiments import parse_coco_log

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = "configs/cpu/retinanet_R18_table5_cpu.yaml"
ROW1 = ["D2NORM.RETINANET_HEAD.TRAIN_STATS", "shared", "D2NORM.RETINANET_HEAD.POP_STATS", "shared",
        "D2NORM.RETINANET_HEAD.AFFINE", "shared"]
ROW2 = ROW1[:3] + ["per_level"] + ROW1[4:]
#: feature-map side per level at the 128 px training size (strides 8 ... 128): the levels' element shares
LEVEL_SIDES = (16, 8, 4, 2, 1)
CONDITIONS = {"E": (), "P3": (0,), "P4-7": (1, 2, 3, 4), "B": (0, 1, 2, 3, 4)}


def pooled(mean: torch.Tensor, var: torch.Tensor, w: torch.Tensor):
    """(μ, σ²) of the union of the levels' populations from per-level (K, C) moments and shares w (K,). Written
    out here rather than with d2norm.stats' moment accumulator: it checks statistics that code wrote."""
    mean, var, w = mean.double(), var.double(), w.double()[:, None]
    mu = (w * mean).sum(0)
    return mu, (w * (var + (mean - mu) ** 2)).sum(0)


def variant(per_level: dict, shared: dict, keep_levels) -> dict:
    """Row-2 checkpoint state with the head BN rows of the levels not in ``keep_levels`` taken from the row-1
    PreciseBN state (its shared statistics). Everything else is the row-2 state (equal to the row-1 one: the
    backbone's statistics come from the same pass over the same images; checked)."""
    out, changed = dict(per_level), 0
    for key, rm in per_level.items():
        if not key.endswith(("running_mean", "running_var")):
            continue
        if key.startswith("head.") and rm.dim() == 2:
            if rm.shape[0] != len(LEVEL_SIDES) or shared[key].shape != rm.shape[1:]:
                raise ValueError(f"{key}: shapes {tuple(rm.shape)} / {tuple(shared[key].shape)}")
            new = rm.clone()
            for j in range(len(LEVEL_SIDES)):
                if j not in keep_levels:
                    new[j] = shared[key]
            out[key] = new
            changed += 1
        elif not torch.equal(rm, shared[key]):
            raise ValueError(f"{key}: the two passes' statistics differ outside the head")
    if not changed:
        raise ValueError("no per-level head statistics in the checkpoint")
    return out


def layer1_check(per_level: dict, shared: dict) -> dict:
    """Per head BN layer: max |union of the per-level populations − shared population| over mean and variance.
    ~0 for a subnet's first BN (same input in both passes), not for later ones (inputs normalized per level)."""
    sides = torch.tensor(LEVEL_SIDES, dtype=torch.float64)
    w = sides ** 2 / (sides ** 2).sum()
    out = {}
    for key, rm in per_level.items():
        if key.startswith("head.") and key.endswith("running_mean") and rm.dim() == 2:
            vkey = key[: -len("mean")] + "var"
            mu, var = pooled(rm, per_level[vkey], w)
            out[key[: -len(".running_mean")]] = max((mu - shared[key].double()).abs().max().item(),
                                                    (var - shared[vkey].double()).abs().max().item())
    return out


def recompute_shared(run: str, out_dir: str) -> str:
    """Row 1's PreciseBN: the experiment's pass (N 256, B 16, seed 0) with shared population statistics."""
    path = os.path.join(out_dir, "precise.pth")
    if not os.path.isfile(path):
        argv = [sys.executable, "tools/recompute_bn_stats.py", "--config-file", CONFIG, "--weights",
                os.path.join(run, "model_final.pth"), "--num-samples", "256", "--batch-size", "16", "--seed", "0",
                "--output-dir", out_dir, "--output-name", "precise", "--overwrite", *ROW1,
                "D2NORM.DATA.SYNTHETIC_SEED", "0"]
        _run(argv, os.path.join(out_dir, "recompute.log"))
    return path


def _run(argv, log_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log_path, "w") as log:
        subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def evaluate(weights: str, out_dir: str, layout) -> dict:
    _run([sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--eval-only", *layout,
          "D2NORM.DATA.SYNTHETIC_SEED", "0", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out_dir],
         os.path.join(out_dir, "stdout.log"))
    return parse_coco_log(open(os.path.join(out_dir, "log.txt")).read())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="row-1 run directories (with measure/table5_pop_per_level/precise.pth)")
    p.add_argument("--work-dir", default="/tmp/row2_levels")
    p.add_argument("--out", required=True, help="JSON of every condition's COCO numbers per run")
    args = p.parse_args()
    result = {"conditions": {c: list(k) for c, k in CONDITIONS.items()}, "runs": {}}
    for run in args.runs:
        name = os.path.basename(run.rstrip("/"))
        load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
        per_level = load(os.path.join(run, "measure", "table5_pop_per_level", "precise.pth"))
        shared_dir = os.path.join(args.work_dir, name, "row1_precise")
        os.makedirs(shared_dir, exist_ok=True)
        shared_path = recompute_shared(run, shared_dir)
        shared = load(shared_path)["model"]
        rec = result["runs"][name] = {"layer1_pooled_max_abs_diff": layer1_check(per_level["model"], shared)}
        os.makedirs(os.path.join(shared_dir, "eval"), exist_ok=True)
        rec["row 1 PreciseBN"] = evaluate(shared_path, os.path.join(shared_dir, "eval"), ROW1)
        for cond, keep in CONDITIONS.items():
            d = os.path.join(args.work_dir, name, cond)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "model.pth")
            torch.save({**per_level, "model": variant(per_level["model"], shared, keep)}, path)
            rec[cond] = evaluate(path, d, ROW2)
        print(name, {c: round(rec[c]["AP"], 2) for c in ["row 1 PreciseBN", *CONDITIONS]}, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
