#!/usr/bin/env python
"""Train / evaluate a detectron2 model with d2norm layers, heads and hooks.

    python tools/train_net.py --config-file configs/cpu/retinanet_R18_ghostbn.yaml
    python tools/train_net.py --config-file <yaml> --num-gpus 2            # 2 processes (NCCL, or gloo on CPU)
    python tools/train_net.py --config-file <yaml> --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python tools/train_net.py --config-file <yaml> --eval-only --fold MODEL.WEIGHTS ...   # norms folded into convs
    python tools/train_net.py --config-file <yaml> --resume                # continue from last checkpoint
"""
import d2norm  # noqa: F401  (compat + registrations before detectron2 is used)
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from d2norm.engine import Trainer, setup_cfg
from d2norm.engine.trainer import preflight
from d2norm.deploy import fold_norms
from d2norm.engine.checkpoint import D2NormCheckpointer
from d2norm.engine.cli import launch_main, load_weights


def main(args):
    if getattr(args, "fold", False) and not args.eval_only:
        argument_parser().error("--fold is an inference transform: use it with --eval-only (folding while "
                                "training changes what SGD optimizes, rethinking A.8)")
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # evaluating a model whose parameters were partly not loaded (another architecture) is an error
        # (and missing or non-finite statistics): an error line naming the checkpoint
        load_weights(D2NormCheckpointer(model, save_dir=cfg.OUTPUT_DIR, on_mismatch="error", on_bad_stats="error"),
                     cfg.MODEL.WEIGHTS, resume=args.resume)
        if args.fold:
            # every fixed-affine norm into its convolution (d2norm.deploy); the report is logged
            print(fold_norms(model.eval()).summary())
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train returns results only with TEST.EXPECTED_RESULTS; return the final evaluation always.
    return getattr(trainer, "_last_eval_results", None)


def argument_parser():
    """detectron2's ``default_argument_parser`` with ``--fold``."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.add_argument(
        "--fold", action="store_true",
        help="with --eval-only: fold every norm whose inference is a fixed affine map into the preceding "
             "convolution before evaluating (d2norm.deploy.fold_norms; prints what was folded and what not)",
    )
    return parser


def cli(argv=None) -> None:
    """The command line: parse ``argv``, check the launch (:func:`d2norm.engine.trainer.preflight`: an
    ``error:`` line and exit code 2 before anything is written), run :func:`main` on ``--num-gpus`` processes."""
    launch_main(main, argv, parser=argument_parser(), preflight=preflight)


if __name__ == "__main__":
    cli()
