"""tools/train_net.py plus a hook that records every rank's parameters after each step (used by tests).

Run exactly like train_net: ``python tests/_train_probe.py --config-file ... --num-gpus 2 KEY VALUE ...``.
Writes ``OUTPUT_DIR/probe_rank{r}.pt`` = {"world_size", "backend", "steps": [per-step float64 param vector]}.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import d2norm  # noqa: E402,F401  (compat before detectron2)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from detectron2.engine import HookBase, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import train_net  # noqa: E402
from d2norm.engine import Trainer  # noqa: E402
from d2norm.engine.launch import training_parser  # noqa: E402


class _ParamProbe(HookBase):
    def __init__(self):
        self.steps = []

    def after_step(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        self.steps.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))

    def after_train(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        out = {
            "world_size": comm.get_world_size(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "steps": torch.stack(self.steps),
            # after every after_train hook that precedes this one (e.g. the EvalNorm fit)
            "final_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        }
        torch.save(out, os.path.join(self.trainer.cfg.OUTPUT_DIR, f"probe_rank{comm.get_rank()}.pt"))


class ProbeTrainer(Trainer):
    def build_hooks(self):
        return super().build_hooks() + [_ParamProbe()]


# Module level: spawned workers import this file as __mp_main__ and must see the probe too.
train_net.Trainer = ProbeTrainer

if __name__ == "__main__":
    # --dist-url auto (a free port): detectron2's default is one fixed port per user, which two of these runs at once
    # (pytest-xdist workers, or two suites on one machine) would both take
    args = training_parser().parse_args()
    launch(train_net.main, args.num_gpus, num_machines=1, machine_rank=0, dist_url=args.dist_url, args=(args,))
