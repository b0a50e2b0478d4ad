"""Paper effects at CPU scale: experiment definitions (claim, paper numbers, expected ordering written before
running, verdict rule) and a runner that trains and evaluates them with the project's tools.
``tools/reproduce.py`` is the command line; results go to ``results/paper_effects/``."""
from .core import REQUIRED_KEYS, VERDICTS, Experiment, clause_verdict, parse_expected, result_record, verdict
from .runner import Context, ExperimentError, Run, parse_coco_log
from .definitions import EXPERIMENTS, get_experiments
from .suite import run_experiment, verdict_line, write_record

__all__ = [
    "REQUIRED_KEYS", "VERDICTS", "Experiment", "clause_verdict", "parse_expected", "result_record", "verdict",
    "Context", "ExperimentError", "Run", "parse_coco_log", "EXPERIMENTS", "get_experiments", "run_experiment",
    "verdict_line", "write_record",
]
