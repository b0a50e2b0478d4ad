"""Experiment definitions and their verdicts.

An :class:`Experiment` states a paper's claim, the paper's numbers and, *before anything is run*, the expected
ordering of its conditions as a string such as ``"PreciseBN B=64 > PreciseBN B=2; PreciseBN B=64 ~= PreciseBN
B=16"``. Its ``measure(ctx, seed)`` trains/evaluates through :class:`~d2norm.experiments.runner.Context` and
returns ``{condition: (AP, AP50)}`` for one training seed. :func:`verdict` turns the per-seed APs into
``"yes"`` / ``"no"`` / ``"inconclusive"``:

* each clause ``L > R`` (or ``L ~= R``) compares two *terms*; a term is a condition or the difference of two
  conditions (``"A - B > C - D"``: the gap between A and B is larger than between C and D);
* paired experiments (all conditions evaluated on the same checkpoint of a seed) compare the per-seed
  differences ``d_s = L_s − R_s``: gap = mean(d), spread = sample std of d over seeds;
  unpaired experiments (each condition its own training): gap = mean(L) − mean(R), spread = the larger sample
  std of L and R over seeds;
* ``>``: "yes" when gap > 0 and gap > spread; "no" when gap ≤ 0 (the direction fails for the mean);
  "inconclusive" otherwise (right direction, within the seed spread);
  ``~=`` (within ``approx_tol`` AP points): "yes" when |gap| ≤ approx_tol, "no" when |gap| − spread >
  approx_tol, "inconclusive" otherwise;
* fewer than 2 seeds or a NaN AP: "inconclusive" (no spread to compare with);
* the experiment: "yes" if every clause is "yes", "no" if any clause is "no", otherwise "inconclusive".
"""
import datetime
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Experiment",
    "Clause",
    "parse_expected",
    "clause_verdict",
    "verdict",
    "combine_verdicts",
    "result_record",
    "REQUIRED_KEYS",
    "mean_std",
    "VERDICTS",
]

VERDICTS = ("yes", "no", "inconclusive")
#: the keys of every experiment JSON (results/paper_effects/<name>.json)
REQUIRED_KEYS = ("name", "paper", "section", "claim", "paper_values", "conditions", "expected", "verdict",
                 "seeds", "command", "wall_s", "commit", "date")

_OPS = (">", "~=")


@dataclass(frozen=True)
class Clause:
    """``lhs op rhs``; each side is a tuple of (sign, condition) terms, e.g. ``((1, "A"), (-1, "B"))``."""

    lhs: Tuple[Tuple[int, str], ...]
    op: str
    rhs: Tuple[Tuple[int, str], ...]
    text: str

    def conditions(self) -> List[str]:
        return [c for _, c in self.lhs + self.rhs]


def _side(text: str, clause: str) -> Tuple[Tuple[int, str], ...]:
    parts = [p.strip() for p in text.split(" - ")]
    if not 1 <= len(parts) <= 2 or any(not p for p in parts):
        raise ValueError(f"expected clause {clause!r}: a side must be 'COND' or 'COND - COND', got {text!r}")
    return tuple(zip((1, -1), parts))


def parse_expected(expected: str, conditions: Sequence[str] = ()) -> List[Clause]:
    """Parse ``"L > R; L ~= R; ..."``; each clause has exactly one of ``>`` / ``~=``; with ``conditions``,
    every named condition must be one of them (a clear ValueError naming the unknown one)."""
    if not isinstance(expected, str) or not expected.strip():
        raise ValueError(f"expected must be a non-empty string like 'A > B', got {expected!r}")
    clauses = []
    for raw in expected.split(";"):
        text = raw.strip()
        if not text:
            continue
        found = [op for op in _OPS if f" {op} " in text]
        if len(found) != 1 or text.count(f" {found[0]} ") != 1:
            raise ValueError(f"expected clause {text!r} needs exactly one ' > ' or ' ~= ' (spaces around it)")
        op = found[0]
        left, right = text.split(f" {op} ")
        c = Clause(_side(left, text), op, _side(right, text), text)
        if conditions:
            unknown = [n for n in c.conditions() if n not in conditions]
            if unknown:
                raise ValueError(f"expected clause {text!r} names unknown condition(s) {unknown}; "
                                 f"conditions: {list(conditions)}")
        clauses.append(c)
    if not clauses:
        raise ValueError(f"expected {expected!r} has no clause")
    return clauses


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _std(v: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than 2 values."""
    if len(v) < 2:
        return float("nan")
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample std) of per-seed values; the std is NaN for one value."""
    v = [float(x) for x in values]
    return _mean(v), _std(v)


def _term(side, values: Dict[str, Sequence[float]]) -> List[float]:
    n = len(values[side[0][1]])
    return [sum(sign * values[c][s] for sign, c in side) for s in range(n)]


def clause_verdict(clause: Clause, values: Dict[str, Sequence[float]], paired: bool,
                   approx_tol: float = 1.0) -> Dict:
    """Verdict of one clause from per-seed values ``{condition: [v_seed0, v_seed1, ...]}`` (see module doc).
    Returns ``{"clause", "gap", "spread", "verdict"}``."""
    lens = {c: len(values[c]) for c in clause.conditions()}
    if len(set(lens.values())) != 1:
        raise ValueError(f"clause {clause.text!r}: conditions have different numbers of seeds {lens}")
    lhs, rhs = _term(clause.lhs, values), _term(clause.rhs, values)
    if paired:
        d = [a - b for a, b in zip(lhs, rhs)]
        gap, spread = _mean(d), _std(d)
    else:
        gap = _mean(lhs) - _mean(rhs)
        spread = max(_std(lhs), _std(rhs))
    out = {"clause": clause.text, "gap": gap, "spread": spread}
    if any(math.isnan(x) for x in lhs + rhs) or math.isnan(spread):
        out["verdict"] = "inconclusive"
    elif clause.op == ">":
        out["verdict"] = "no" if gap <= 0 else ("yes" if gap > spread else "inconclusive")
    else:
        out["verdict"] = ("yes" if abs(gap) <= approx_tol else
                          "no" if abs(gap) - spread > approx_tol else "inconclusive")
    return out


def combine_verdicts(verdicts: Sequence[str]) -> str:
    for v in verdicts:
        if v not in VERDICTS:
            raise ValueError(f"unknown verdict {v!r}; allowed: {VERDICTS}")
    if not verdicts:
        raise ValueError("no verdicts to combine")
    if all(v == "yes" for v in verdicts):
        return "yes"
    return "no" if "no" in verdicts else "inconclusive"


def verdict(expected: str, conditions: Dict[str, Dict[str, List[float]]], paired: bool,
            approx_tol: float = 1.0, metric: str = "ap") -> Tuple[str, List[Dict]]:
    """The experiment's verdict and per-clause details from ``conditions`` in the JSON layout
    (``{cond: {"ap": [...], "ap50": [...]}}``)."""
    values = {c: v[metric] for c, v in conditions.items()}
    clauses = [clause_verdict(c, values, paired, approx_tol) for c in parse_expected(expected, list(values))]
    return combine_verdicts([c["verdict"] for c in clauses]), clauses


def code_commit() -> str:
    """The commit of this checkout's code, ``+modified`` when tracked files differ from it (the numbers then come
    from code no commit holds); "unknown" outside a git checkout. Recorded in every result and every training's
    run.json: a reused training may come from older code than the experiment that reuses it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True).returncode
    except Exception:  # not a git checkout, no git
        return "unknown"
    return head if clean == 0 else f"{head}+modified"


def training_environment() -> Dict[str, str]:
    """What besides the code and the command decides a CPU training's numbers: torch's version and the vector
    instruction set its CPU kernels dispatch to. The same command is bitwise repeatable on one machine, but
    another instruction set rounds convolutions differently and the trajectory diverges within 20 iterations
    (docs/paper_effects.md, "Repeatability"), so every training records it."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu}


def result_record(exp: "Experiment", per_seed: Dict[int, Dict[str, Tuple[float, float]]], command: str,
                  wall_s: float, details: Optional[Dict] = None) -> Dict:
    """The JSON record of ``exp`` from ``{seed: {condition: (AP, AP50)}}``; verdict computed here."""
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError(f"experiment {exp.name!r}: no seed was measured")
    for s in seeds:
        missing = [c for c in exp.conditions if c not in per_seed[s]]
        if missing:
            raise ValueError(f"experiment {exp.name!r} seed {s}: conditions {missing} were not measured")
    conds = {c: {"ap": [float(per_seed[s][c][0]) for s in seeds], "ap50": [float(per_seed[s][c][1]) for s in seeds]}
             for c in exp.conditions}
    v, clauses = verdict(exp.expected, conds, exp.paired, exp.approx_tol)
    rec = {
        "name": exp.name, "paper": exp.paper, "section": exp.section, "claim": exp.claim,
        "paper_values": dict(exp.paper_values), "conditions": conds, "expected": exp.expected, "verdict": v,
        "seeds": seeds, "command": command, "wall_s": float(wall_s), "commit": code_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rec["details"] = {"paired": exp.paired, "approx_tol": exp.approx_tol, "clauses": clauses, **(details or {})}
    return rec


@dataclass
class Experiment:
    """One paper effect. ``measure(ctx, seed) -> {condition: (AP, AP50)}`` (optionally also returning extra
    plot data as ``(results, extra)``); ``paired``: every condition of a seed is measured on the same
    checkpoint; ``plot(record, path)`` overrides the default bar chart; ``summarize_extra({seed: extra})``
    adds a summary of the extra measurements (e.g. a second claim's verdict) to the record's details."""

    name: str
    paper: str
    section: str
    claim: str
    paper_values: Dict
    conditions: List[str]
    expected: str
    measure: Callable
    paired: bool
    approx_tol: float = 1.0
    default_seeds: int = 2
    #: how to test the claim at COCO scale (configs of this repository)
    coco: str = ""
    scale_note: str = ""
    plot: Optional[Callable] = None
    summarize_extra: Optional[Callable] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9_]+", self.name):
            raise ValueError(f"experiment name {self.name!r} must be lower-case letters, digits, underscores")
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"experiment {self.name!r}: duplicate conditions {self.conditions}")
        parse_expected(self.expected, self.conditions)  # fails at definition time, before any run
