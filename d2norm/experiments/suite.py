"""Run experiments: measure every seed, compute the verdict, write ``<name>.json`` + ``<name>.png``, print one
line."""
import json
import math
import os
import time
from typing import Dict, Optional, Sequence

from .core import Experiment, mean_std, result_record
from .runner import Context

__all__ = ["run_experiment", "bar_plot", "write_record", "verdict_line", "summarize"]


def summarize(values: Sequence[float]) -> str:
    """``"mean ± spread"`` (sample std; no spread for one seed)."""
    m, s = mean_std(values)
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def verdict_line(rec: Dict) -> str:
    conds = "; ".join(f"{c} {summarize(v['ap'])}" for c, v in rec["conditions"].items())
    return (f"[{rec['name']}] verdict: {rec['verdict']} (expected {rec['expected']}) | AP over seeds "
            f"{rec['seeds']}: {conds} | {rec['wall_s']:.0f} s")


def bar_plot(rec: Dict, path: str) -> str:
    """Mean AP ± spread per condition with the per-seed values as dots; the verdict in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rec["conditions"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4.2))
    for i, n in enumerate(names):
        ap = rec["conditions"][n]["ap"]
        m, s = mean_std(ap)
        ax.bar(i, m, yerr=0.0 if math.isnan(s) else s, color="#8fb3d9", edgecolor="k", capsize=4)
        ax.scatter([i] * len(ap), ap, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("COCO box AP (synthetic val)")
    ax.set_title(f"{rec['name']}: {rec['verdict']}  ({rec['paper']} {rec['section']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_record(rec: Dict, output_dir: str, plot=None) -> Dict[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    jpath = os.path.join(output_dir, f"{rec['name']}.json")
    with open(jpath, "w") as f:
        json.dump(rec, f, indent=1)
    ppath = (plot or bar_plot)(rec, os.path.join(output_dir, f"{rec['name']}.png"))
    return {"json": jpath, "png": ppath}


def run_experiment(exp: Experiment, ctx: Context, seeds: Sequence[int], output_dir: str, command: str,
                   log=print, jobs: int = 1) -> Dict:
    """Measure ``exp`` for each training seed (``jobs`` seeds at a time: their subprocesses run concurrently),
    write its JSON and PNG into ``output_dir``, print the verdict."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.time()
    first_cmd, first_train = len(ctx.commands), len(ctx.trainings)
    per_seed, extras = {}, {}

    def one(s):
        log(f"[{exp.name}] seed {s}", flush=True)
        return s, exp.measure(ctx, s)

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        results = list(pool.map(one, seeds))
    for s, out in results:
        res, extra = out if isinstance(out, tuple) else (out, None)
        per_seed[s] = {c: tuple(v) for c, v in res.items()}
        if extra is not None:
            extras[str(s)] = extra
    wall = time.time() - start
    used = {t["dir"]: t for t in ctx.trainings[first_train:]}
    # wall_s is this invocation's time; trainings reused from an earlier experiment are listed with their own
    # wall time, the commit of the code and the environment that trained them (the commit can be older than this
    # record's "commit", the machine another)
    details = {"data_seed": ctx.data_seed, "scale_note": exp.scale_note, "subcommands": ctx.commands[first_cmd:],
               "trainings": list(used.values()),
               "training_wall_s": sum(t["wall_s"] for t in used.values())}
    if extras:
        details["extra"] = extras
        if exp.summarize_extra is not None:
            details["extra_summary"] = exp.summarize_extra(extras)
    rec = result_record(exp, per_seed, command, wall, details)
    if ctx.dry_run:  # nothing was trained or measured: there is no verdict to print, only the commands
        rec["verdict"] = "dry run"
        log(f"[{exp.name}] dry run: {len(details['subcommands'])} command(s) listed, nothing trained or measured",
            flush=True)
        return rec
    write_record(rec, output_dir, exp.plot)
    log(verdict_line(rec), flush=True)
    return rec


def _paper_numbers(values: Dict) -> str:
    def fmt(v):
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
        return str(v)

    return "; ".join(f"{k}: {fmt(v)}" for k, v in values.items() if k != "metric")


def markdown_table(experiments: Sequence[Experiment], output_dir: str, notes: Optional[Dict[str, str]] = None) -> str:
    """The docs/paper_effects.md table from the JSON records in ``output_dir``: one row per experiment; an experiment without
    a record is listed as not run; ``notes`` ({name: text}) go after a verdict, and the COCO-scale config after
    every verdict but "yes"."""
    notes = {k: f" {v}" for k, v in (notes or {}).items()}
    rows = ["| experiment | paper claim (paper numbers) | ours: box AP mean ± std over seeds | verdict | command | time |",
            "|---|---|---|---|---|---|"]
    for e in experiments:
        path = os.path.join(output_dir, f"{e.name}.json")
        claim = f"{e.paper} {e.section}: {e.claim} ({_paper_numbers(e.paper_values)})"
        coco = f" COCO scale: `{e.coco}`." if e.coco else ""
        if not os.path.isfile(path):
            rows.append(f"| `{e.name}` | {claim} | not run (time) | –{coco} | "
                        f"`python tools/reproduce.py --only {e.name}` | – |")
            continue
        with open(path) as f:
            rec = json.load(f)
        ours = "; ".join(f"{c} {summarize(v['ap'])}" for c, v in rec["conditions"].items())
        t = rec["wall_s"] + 0.0
        train = rec.get("details", {}).get("training_wall_s", 0.0)
        time_s = f"{t / 60:.0f} min" + (f" (+ {train / 60:.0f} min shared training)" if train else "")
        note = notes.get(e.name, "") + (coco if rec["verdict"] != "yes" else "")
        rows.append(f"| `{e.name}` | {claim} | seeds {rec['seeds']}: {ours} | **{rec['verdict']}**{note} | "
                    f"`{rec['command']}` | {time_s} |")
    return "\n".join(rows)
