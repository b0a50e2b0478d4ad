"""COCO evaluation for the tools: evaluate a model on a dataset, compare and summarize results, the
``--eval`` before/after pattern of the population-statistics tools."""
import argparse
import os
from typing import Dict, Optional

from torch import nn

from .tool_io import first, format_table, prepare_dataset, test_loader

__all__ = ["evaluate", "same_results", "main_metric", "add_eval_args", "eval_dataset", "record_before_after",
           "maybe_evaluate"]


def evaluate(cfg, model: nn.Module, dataset: str, output_dir: str) -> Dict[str, Dict[str, float]]:
    """COCO evaluation (detectron2's ``inference_on_dataset`` + d2norm's evaluator) of ``model`` on
    ``dataset``; the model's train/eval flags are restored afterwards."""
    from detectron2.evaluation import inference_on_dataset

    from .trainer import Trainer

    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder=output_dir)
    res = inference_on_dataset(model, test_loader(cfg, dataset), evaluator)
    return {k: {m: float(v) for m, v in d.items()} for k, d in (res or {}).items()}


def same_results(a: Dict[str, Dict[str, float]], b: Dict[str, Dict[str, float]]) -> bool:
    """Exact equality of two evaluation results, NaN (a metric without ground truth) equal to NaN."""
    if a.keys() != b.keys():
        return False
    for task in a:
        if a[task].keys() != b[task].keys():
            return False
        for k, v in a[task].items():
            w = b[task][k]
            if not (v == w or (v != v and w != w)):
                return False
    return True


def main_metric(results: Dict[str, Dict[str, float]]) -> float:
    """The first task's AP (``bbox`` for detectors), NaN when there is none."""
    for task in ("bbox", "segm", "keypoints"):
        if task in results and "AP" in results[task]:
            return results[task]["AP"]
    return float("nan")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``--eval`` (COCO AP before and after the tool's change) and ``--eval-dataset``."""
    p.add_argument("--eval", action="store_true", help="COCO AP before and after")
    p.add_argument("--eval-dataset", help="dataset for --eval (default: the cfg's first DATASETS.TEST)")


def eval_dataset(args, cfg) -> Optional[str]:
    """The prepared ``--eval-dataset`` (default: the cfg's first DATASETS.TEST) with ``--eval``, else None."""
    return prepare_dataset(cfg, args.eval_dataset or first(cfg.DATASETS.TEST)) if args.eval else None


def record_before_after(report: dict, dataset: Optional[str], before, after) -> None:
    """With ``--eval`` (``dataset`` given): the AP before/after into ``report`` and printed as a table."""
    if dataset is None:
        return
    report.update(eval_dataset=dataset, before=before, after=after)
    print(format_table(["", "AP"], [["before", main_metric(before)], ["after", main_metric(after)]]))


def maybe_evaluate(enabled: bool, cfg, model, dataset: Optional[str], output_dir: str, tag: str):
    """COCO evaluation under ``output_dir/inference/<tag>`` when ``enabled``; prints the AP."""
    if not enabled:
        return None
    res = evaluate(cfg, model, dataset, os.path.join(output_dir, "inference", tag))
    print(f"[{tag}] {dataset}: AP = {main_metric(res):.4f}", flush=True)
    return res
