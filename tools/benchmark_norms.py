#!/usr/bin/env python
"""Speed of every registered d2norm layer relative to torch's BatchNorm2d (train fwd+bwd, eval fwd).

Prints ratios (layer time / BatchNorm2d time); no assertions. The machine may be shared and noisy, so every
layer and both baselines (``nn.BatchNorm2d``; ``nn.GroupNorm`` with BGN's channel groups) are timed
*interleaved* in the same rounds; a ratio is the median over the rounds of the per-round ratio, with its
interquartile range (a single lucky baseline round would otherwise move every ratio of a shape), and the
best-of-rounds ratio (timeit's convention) is kept in the JSON; absolute times are best rounds. On
CPU the clock is this process's CPU time by default (``--clock process``), which other processes on the
machine do not inflate; ``--clock wall`` for elapsed time.
Training cost includes EvalNorm's eq-9 aux loss. ``eval_GBps`` is the achieved bandwidth of one read of x and
one write of y per eval call (BN's minimal traffic, the same byte count for every layer). Example:

    python tools/benchmark_norms.py --shape 8 64 56 56 --shape 512 256 7 7 --json bench/norms.json
"""
import argparse
import datetime
import json
import os
import random
import sys
import time

import d2norm  # noqa: F401
import torch
from detectron2.config import get_cfg
from torch import nn

from d2norm.layers import NORM_REGISTRY
from d2norm.layers.evalnorm import evalnorm_aux_loss

DEFAULT_SHAPES = ([8, 64, 56, 56], [512, 256, 7, 7])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: --amp: the autocast dtype (the input is then that dtype too: what a convolution under autocast hands a norm)
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _steps(layer, x, amp=None):
    """(train_step, eval_step) closures for one layer on input x (under ``torch.autocast`` of dtype ``amp`` when
    given, as in an AMP training: detectron2's AMPTrainer runs the model's forward under autocast)."""
    xg = x.clone().requires_grad_()

    def autocast():
        return torch.autocast(x.device.type, dtype=amp, enabled=amp is not None)

    def train_step():
        layer.train()
        with autocast():
            # EvalNorm's aux loss (eq 9) is part of its training cost: collect it as a model would
            loss = layer(xg).float().sum() + evalnorm_aux_loss(layer)
        loss.backward()

    def eval_step():
        layer.eval()
        with torch.no_grad(), autocast():
            layer(x)

    return train_step, eval_step


def peak_memory(fn, device):
    """Bytes a call of ``fn`` allocates at its peak above what was allocated before it (CUDA's caching allocator
    statistics); None on other devices (not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


#: the clock of a timed sample: "process" = CPU time of this process (time.process_time): on a shared, busy
#: machine it excludes the time other processes run on our core, which wall time cannot; "wall" = elapsed time
#: (the only meaningful one with CUDA, synchronized)
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
_clock = {"fn": time.perf_counter}


def _time_once(fn, iters, device):
    clock = _clock["fn"]
    _sync(device)
    start = clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (clock() - start) / iters


def quantiles(values):
    """(median, 25th, 75th percentile) of a list (linear interpolation, as numpy's default)."""
    v = sorted(values)

    def q(p):
        i = p * (len(v) - 1)
        lo = int(i)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (i - lo)

    return q(0.5), q(0.25), q(0.75)


def paired_ratio(num_times, den_times):
    """Ratio of two entries timed in the same rounds: the median over rounds of the per-round ratio (a pair
    measured moments apart shares the machine's state; one lucky round of either side does not set it), its
    interquartile range, and the best-of-rounds ratio (timeit's convention)."""
    med, q25, q75 = quantiles([a / b for a, b in zip(num_times, den_times)])
    return {"median": med, "iqr": [q25, q75], "best": min(num_times) / min(den_times)}


def bench_shape(shape, cfg, device, window, rounds, names=None, amp=None):
    """Seconds per call of every entry in each of ``rounds`` rounds, all entries interleaved within each round:
    ``{name: (train_times, eval_times)}``. Each timed sample is as many calls as fit in ``window`` seconds (at
    least one): short samples are the ones a busy machine leaves undisturbed. Also ``{name: (train_peak,
    eval_peak)}`` bytes (CUDA; None elsewhere). ``amp``: a half dtype, the input in it and the calls under
    autocast."""
    n, c = shape[0], shape[1]
    x = (torch.randn(*shape, device=device) * 2 + 1).to(amp or torch.float32)
    groups = cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS
    entries = {"BatchNorm2d": nn.BatchNorm2d(c), "GroupNorm": nn.GroupNorm(groups, c)}
    for name, cls in sorted(NORM_REGISTRY):
        if names is None or name in names:
            entries[name] = cls(**cls.from_config(cfg, c))
    steps, iters, peaks = {}, {}, {}
    for name, layer in entries.items():
        layer.to(device)
        steps[name] = _steps(layer, x, amp)
        for fn in steps[name]:  # warm-up (allocator, first-use paths, MABN/EvalNorm state)
            fn()
        peaks[name] = [peak_memory(fn, device) for fn in steps[name]]
        iters[name] = [max(1, int(window / _time_once(fn, 1, device))) for fn in steps[name]]
    times = {name: ([], []) for name in entries}
    for r in range(rounds):
        for name in round_order(steps, r):
            train_step, eval_step = steps[name]
            times[name][0].append(_time_once(train_step, iters[name][0], device))
            times[name][1].append(_time_once(eval_step, iters[name][1], device))
    return times, x.numel() * x.element_size(), iters, peaks


def round_order(entries, r):
    """The entries of round ``r`` in a shuffled order (seeded by ``r``: reproducible). What ran just before an
    entry (the cache and allocator state it leaves) differs from round to round instead of always favouring or
    penalizing the same entry; measured: with a fixed order, layers that are BN's own kernel at inference read
    1.15–1.34× BN at (8, 64, 56, 56) in a full run and 0.90–1.06× alone."""
    order = list(entries)
    random.Random(r).shuffle(order)
    return order


def run(shapes, window_ms, rounds, device, threads, names=None, clock="wall", amp=None):
    """One result per shape (see the module docstring); ``amp``: a key of AMP_DTYPES or None (float32)."""
    torch.set_num_threads(threads)
    _clock["fn"] = CLOCKS[clock]
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    results = []
    for shape in shapes:
        load_before = os.getloadavg()[0]
        times, nbytes, iters, peaks = bench_shape(shape, cfg, torch.device(device), window_ms / 1e3, rounds, names,
                                                  AMP_DTYPES[amp] if amp else None)
        best = {name: (min(t), min(e)) for name, (t, e) in times.items()}
        bn_t, bn_e = best["BatchNorm2d"]
        gn_t, gn_e = best["GroupNorm"]
        layers = {}
        for name, (t, e) in times.items():
            if name in ("BatchNorm2d", "GroupNorm"):
                continue
            row = {}
            for kind, mine, base in (("train_ratio", t, times["BatchNorm2d"][0]),
                                     ("eval_ratio", e, times["BatchNorm2d"][1])):
                r = paired_ratio(mine, base)
                row.update({kind: r["median"], kind + "_iqr": r["iqr"], kind + "_best": r["best"]})
            row.update(train_ms=best[name][0] * 1e3, eval_ms=best[name][1] * 1e3,
                       eval_GBps=2 * nbytes / best[name][1] / 1e9)
            if peaks[name][0] is not None:  # peak memory of a call, as a ratio to BatchNorm2d's (CUDA only)
                row["train_peak_MiB"], row["eval_peak_MiB"] = (b / 2 ** 20 for b in peaks[name])
                row["train_peak_ratio"], row["eval_peak_ratio"] = (
                    mine / max(base, 1) for mine, base in zip(peaks[name], peaks["BatchNorm2d"]))
            if name == "BGN":
                row["train_ratio_vs_groupnorm"] = paired_ratio(t, times["GroupNorm"][0])["median"]
                row["eval_ratio_vs_groupnorm"] = paired_ratio(e, times["GroupNorm"][1])["median"]
            layers[name] = row
        results.append({
            "shape": list(shape),
            "amp": amp,
            "device": device if device != "cpu" else f"cpu ({torch.backends.cpu.get_cpu_capability()})",
            "threads": threads,
            "clock": clock,
            "window_ms": window_ms,
            "calls_per_sample": {k: {"train": v[0], "eval": v[1]} for k, v in iters.items()},
            "rounds": rounds,
            "loadavg_1min": [load_before, os.getloadavg()[0]],
            "baseline": {
                "BatchNorm2d": {"train_ms": bn_t * 1e3, "eval_ms": bn_e * 1e3, "eval_GBps": 2 * nbytes / bn_e / 1e9,
                                "peak_MiB": [None if b is None else b / 2 ** 20 for b in peaks["BatchNorm2d"]]},
                "GroupNorm": {"train_ms": gn_t * 1e3, "eval_ms": gn_e * 1e3, "eval_GBps": 2 * nbytes / gn_e / 1e9,
                              "groups": cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS},
            },
            "layers": layers,
        })
    return results


def print_results(results, out=sys.stdout):
    for r in results:
        b = r["baseline"]
        amp = f" amp={r['amp']}" if r.get("amp") else ""
        print(f"shape={tuple(r['shape'])}{amp} device={r['device']} threads={r['threads']} clock={r['clock']} {r['rounds']} "
              f"interleaved rounds of ~{r['window_ms']:g} ms samples (ratios: median of the per-round ratios; times: "
              f"best round), load {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f}"
              + (f", malloc {r['malloc']}" if "malloc" in r else ""),
              file=out)
        print(f"BatchNorm2d: train {b['BatchNorm2d']['train_ms']:.2f} ms, eval {b['BatchNorm2d']['eval_ms']:.3f} ms "
              f"({b['BatchNorm2d']['eval_GBps']:.1f} GB/s); GroupNorm({b['GroupNorm']['groups']}): train "
              f"{b['GroupNorm']['train_ms']:.2f} ms, eval {b['GroupNorm']['eval_ms']:.3f} ms", file=out)
        print(f"{'layer':<20}{'train ratio':>12}{'eval ratio':>12}{'eval GB/s':>11}", file=out)
        for name, v in r["layers"].items():
            extra = ""
            if "train_ratio_vs_groupnorm" in v:
                extra = f"   (vs GroupNorm: train {v['train_ratio_vs_groupnorm']:.2f}, eval {v['eval_ratio_vs_groupnorm']:.2f})"
            print(f"{name:<20}{v['train_ratio']:>12.2f}{v['eval_ratio']:>12.2f}{v['eval_GBps']:>11.1f}{extra}",
                  file=out)
        print(file=out)


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap / trim thresholds at 1 GiB for this process (``mallopt``); False where that is not glibc.

    glibc serves a large allocation (an activation-sized output) from the heap or from a fresh ``mmap``
    depending on the allocation history, and returns freed heap memory to the OS by a dynamic rule; a layer
    whose call allocates a few such tensors then page-faults on every call in one process state and not in
    another (measured in isolation: one per-sample layer 2488 minor faults per call, BN 310, on an
    (8, 64, 56, 56) input). That is allocator noise, not the layer's cost, so every layer and baseline here run
    with the same fixed thresholds (what a long-running training process reaches anyway)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 1 << 30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, action="append", metavar=("N", "C", "H", "W"),
                   help="input shape; repeat for several (default: 8 64 56 56 and 512 256 7 7)")
    p.add_argument("--window-ms", type=float, default=20.0,
                   help="length of one timed sample (as many calls as fit, at least one)")
    p.add_argument("--rounds", type=int, default=20,
                   help="interleaved rounds; ratios are the median of the per-round ratios (best-of kept in the JSON)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                   help="process = this process's CPU time (default on CPU: robust to other load), wall = elapsed "
                        "(default and required on CUDA)")
    p.add_argument("--layers", nargs="*", default=None, help="registered names to time (default: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None,
                   help="time every layer fed a half-precision input under torch.autocast of that dtype "
                        "(default: float32)")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                   help="pinned (default): glibc's mmap/trim thresholds fixed for every layer alike "
                        "(pin_malloc_thresholds); default: glibc's dynamic thresholds")
    args = p.parse_args(argv)
    if not args.window_ms > 0 or args.rounds < 1 or args.threads < 1:
        p.error(f"--window-ms must be > 0 and --rounds, --threads >= 1, got {args.window_ms}, {args.rounds}, "
                f"{args.threads}")
    if args.layers is not None:
        unknown = sorted(set(args.layers) - {k for k, _ in NORM_REGISTRY})
        if unknown:
            p.error(f"unknown layer name(s) {unknown}; registered: {sorted(k for k, _ in NORM_REGISTRY)}")
    groups = d2norm.add_d2norm_config(get_cfg()).D2NORM.BGN.NUM_CHANNEL_GROUPS  # GroupNorm baseline, BGN
    for shape in args.shape or []:
        if min(shape) < 1 or shape[1] % groups:
            p.error(f"--shape {' '.join(map(str, shape))}: every size must be >= 1 and C a multiple of "
                    f"{groups} (D2NORM.BGN.NUM_CHANNEL_GROUPS: the GroupNorm baseline and BGN split C into "
                    f"{groups} groups)")
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "process")
    if clock == "process" and args.device.startswith("cuda"):
        p.error("--clock process measures CPU time; use --clock wall with --device cuda")
    pinned = pin_malloc_thresholds() if args.malloc == "pinned" else False
    shapes = args.shape or [list(s) for s in DEFAULT_SHAPES]
    results = run(shapes, args.window_ms, args.rounds, args.device, args.threads, args.layers, clock, args.amp)
    for r in results:
        r["malloc"] = "pinned" if pinned else "default"
    print_results(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        doc = {
            "tool": "benchmark_norms",
            "command": "python tools/benchmark_norms.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
