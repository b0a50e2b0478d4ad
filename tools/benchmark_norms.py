#!/usr/bin/env python
"""Speed of every registered d2norm layer relative to torch's BatchNorm2d (train fwd+bwd, eval fwd).

Prints ratios (layer time / BatchNorm2d time); no assertions. Example:

    python tools/benchmark_norms.py --shape 8 64 56 56 --iters 20
"""
import argparse
import time

import d2norm  # noqa: F401
import torch
from detectron2.config import get_cfg
from torch import nn

from d2norm.layers import NORM_REGISTRY
from d2norm.layers.evalnorm import evalnorm_aux_loss


def _time(fn, iters, repeats=5):
    """Best of ``repeats`` averages over ``iters`` calls (after warm-up), as timeit does: the minimum is the
    least disturbed by other load and by first-use allocations."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def bench(layer, x, iters):
    layer.train()
    xg = x.clone().requires_grad_()

    def train_step():
        # EvalNorm's aux loss (eq 9) is part of its training cost: collect it as a model would
        (layer(xg).sum() + evalnorm_aux_loss(layer)).backward()

    layer.eval()
    with torch.no_grad():
        eval_t = _time(lambda: layer(x), iters)
    layer.train()
    return _time(train_step, iters), eval_t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=[8, 64, 56, 56], metavar=("N", "C", "H", "W"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    x = torch.randn(*args.shape, device=args.device) * 2 + 1
    base_train, base_eval = bench(nn.BatchNorm2d(args.shape[1]).to(args.device), x, args.iters)
    print(f"shape={tuple(args.shape)} device={args.device} BatchNorm2d: train {base_train*1e3:.2f} ms, "
          f"eval {base_eval*1e3:.2f} ms")
    print(f"{'layer':<20}{'train ratio':>12}{'eval ratio':>12}")
    for name, cls in sorted(NORM_REGISTRY):
        t, e = bench(cls(**cls.from_config(cfg, args.shape[1])).to(args.device), x, args.iters)
        print(f"{name:<20}{t / base_train:>12.2f}{e / base_eval:>12.2f}")


if __name__ == "__main__":
    main()
