#!/usr/bin/env python
"""GPU self-check: every d2norm layer on CUDA against the same layer on CPU in float64, distributed layers on
2 NCCL processes, and a short training of the main job on the GPU. Without CUDA it says so and exits 0.

    python tools/gpu_selfcheck.py                 # all checks that the machine allows
    python tools/gpu_selfcheck.py --skip-train    # layers (+ 2-GPU) only, about a minute
    python tools/gpu_selfcheck.py --dry-run --out DIR   # the same checks on the CPU at toy size (the test suite)

On a lent GPU machine without a package registry: ``make gpu-bundle`` here (scripts/make_gpu_bundle.py: the
pure-Python dependencies and cp312 wheels in ``.gpu_bundle/``), carry it, and run
``PYTHONPATH=.gpu_bundle/site:.gpu_bundle/site-cp312:. D2NORM_NATIVE=0 python tools/gpu_selfcheck.py --out $OUT``;
``gpu_selfcheck.json`` is written after every check.
    pytest -m cuda                                # the layer check as a test (skipped without CUDA)

Checks:

1. **Layers** — every registered ``NORM`` name (and FrozenBatchNorm), in training and eval mode, forward and
   backward, contiguous and channels-last, on an ResNet-like (8, 64, 28, 28) and an RoI-like (256, 64, 7, 7)
   input: CUDA float32 output, input gradient, parameter gradients and updated buffers equal the CPU float64
   layer's (whose paths the test suite checks against the papers' equations) to float32 accuracy. EvalNorm's
   eq-9 aux loss is part of the loss. This covers the CUDA branches of the fast kernels
   (``d2norm/layers/kernels.py``).
2. **2 processes** — AnySyncBN with uneven and empty ranks (on CUDA both of its routes: torch ops, and torch's
   SyncBN kernels behind ``D2NORM_SYNCBN_CUDA_KERNELS=1``), SyncDomainBN over two levels and the shuffled-RoI box
   head, forward + backward + EMA, on CUDA (NCCL with 2+ GPUs; with one GPU both ranks share it and exchange over
   gloo) vs the same two-rank run on gloo/CPU in float64; beside it, AnySyncBN's training step (both routes) vs
   torch's ``nn.SyncBatchNorm`` at (8, 64, 56, 56) per rank (a measurement; meaningful with NCCL on 2+ GPUs).
3. **Training** — ``tools/train_net.py`` on the main-job config with ``MODEL.DEVICE cuda`` and
   ``SOLVER.AMP.ENABLED True`` (detectron2's AMPTrainer) for a few iterations and a COCO evaluation; the losses
   must be finite and the AP table printed.
4. **Host syncs** — every layer's training step and eval forward under ``torch.cuda.set_sync_debug_mode("error")``.
5. **AMP** — every layer fed a float16 / bfloat16 input under ``torch.autocast``, train and eval, vs the CPU float64
   layer within multiples of the dtype's unit roundoff; statistics buffers stay float32.
6. **Detectors under AMP** — fp16 training steps (autocast + GradScaler) of the main job's detector with each
   registered norm in the backbone at 512 px: finite losses, not every step skipped; s/iter vs the BN detector's.
7. **Speed** (a measurement) — ``tools/benchmark_norms.py``'s ratios and peak memory vs cuDNN ``nn.BatchNorm2d``
   at (2, 256, 200, 336), (8, 64, 56, 56), (512, 256, 7, 7), float32 and fp16 autocast, in the JSON.
8. **torch.compile** (a measurement) — GhostBN, BGN, EvalNorm, ExampleWeightedBN compiled (inductor) vs eager over
   FPN-level and RoI shapes: first-call time, recompiles, graph breaks (and why), steady-state ratios.

``--budget-s`` (default 480) starts no check after that many seconds; ``--dry-run`` runs checks 1, 2 (gloo, float32
vs float64), 3, 5 (CPU autocast bf16), 6 (bf16, BN and EvalNorm, 64 px), 7 and 8 (aot_eager, GhostBN) on the CPU
at toy size. ``tools/bench_report.py --gpu gpu_selfcheck.json --readme docs/speed.md`` turns the JSON into the
GPU section of docs/speed.md.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import d2norm
import torch
from detectron2.config import get_cfg

from d2norm.layers import NORM_REGISTRY
from d2norm.layers.evalnorm import evalnorm_aux_loss
from d2norm.layers.frozen import FrozenBatchNorm

from gpu_measure import ATOL, RTOL, measure_compile, measure_detectors_amp, measure_speed  # noqa: E402  (tools/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layers(c):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    cfg.D2NORM.GHOST_BN.SIZE = 3  # several sub-batches at both shapes
    cfg.D2NORM.MABN.WARMUP_ITERS = 1  # the second step uses the moving averages
    cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS = 16
    out = {name: (lambda cls=cls: cls(**cls.from_config(cfg, c))) for name, cls in sorted(NORM_REGISTRY)}
    out["FrozenBatchNorm"] = lambda: FrozenBatchNorm(c)
    return out


@torch.no_grad()
def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if not t.is_floating_point() or "buffer" in name:
            continue
        if name.endswith("weight"):
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
        elif name.endswith(("bias", "running_mean")):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.5)
        elif name.endswith(("running_var", "running_chi")):
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 + 0.5)


def _layer_pair(make, device):
    """(float64 CPU reference, float32 copy on ``device``) of one layer, same randomized parameters and buffers."""
    ref = make().double()
    _randomize(ref, 1)
    dev = make()
    dev.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    return ref, dev.to(device)


def _run_layer(m, x, dy, training, steps=2, amp=None):
    """``steps`` forward/backward passes (under ``torch.autocast`` of dtype ``amp`` when given); returns outputs,
    grads and the final state."""
    import contextlib

    m.train(training)
    res = []
    for _ in range(steps):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with (torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()):
            y = m(xi)
            loss = (y.to(dy.dtype) * dy).sum() + (evalnorm_aux_loss(m) if training else 0.0)
        loss.backward()
        res.append({"y": y.detach(), "gx": xi.grad,
                    "gp": {k: p.grad for k, p in m.named_parameters() if p.grad is not None}})
    state = {k: v.detach() for k, v in m.state_dict().items() if v.is_floating_point()}
    return res, state


def _close(a, b, what, failures):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0  # an empty rank's outputs are empty
    if a.shape != b.shape or not torch.allclose(a, b, rtol=RTOL, atol=ATOL * scale):
        err = float((a - b).abs().max()) if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        failures.append(f"{what}: max abs difference {err}")


SHAPES = ((8, 64, 28, 28), (256, 64, 7, 7))
DRY_SHAPES = ((4, 32, 6, 6), (24, 32, 3, 3))  # --dry-run: the same checks at toy size on the CPU
#: unit roundoff of the half dtypes (the AMP check's tolerances are multiples of it, as in tests/test_amp.py)
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _close_amp(a, b, what, failures, u, kind):
    """Half-precision result ``a`` vs the float64 reference ``b``: finite, and an output within 8u·max|b| + 8u
    (max norm), a gradient within 16u·||b|| (2-norm), a buffer within 8u relative; buffers must stay float32."""
    if kind == "buffer" and a.is_floating_point() and a.dtype != torch.float32:
        failures.append(f"{what}: buffer dtype {a.dtype}, expected float32")
        return
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        failures.append(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    elif not torch.isfinite(a).all():
        failures.append(f"{what}: non-finite values")
    elif b.numel():
        if kind == "grad":
            err, bound = float((a - b).norm()), 16 * u * float(b.norm()) + 1e-6
        else:
            scale = float(b.abs().max())
            err = float((a - b).abs().max())
            bound = (8 * u * scale + 8 * u) if kind == "output" else (8 * u * scale + 1e-6)
        if err > bound:
            failures.append(f"{what}: error {err:.3g} > {bound:.3g}")


def check_layers_amp(device="cuda", shapes=SHAPES, dtypes=(torch.float16, torch.bfloat16)):
    """Every layer fed a half-precision input under ``torch.autocast`` (what the convolution before it hands it in
    AMP training), train (2 steps, forward + backward, EvalNorm's aux loss included) and eval, vs the CPU float64
    layer: tolerances from the dtype's unit roundoff; statistics buffers stay float32."""
    failures = []
    for shape in shapes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
        dy = torch.randn(*shape, generator=g, dtype=torch.float64)
        for name, make in _layers(shape[1]).items():
            for dtype in dtypes:
                u = UNIT[dtype]
                for training in (True, False):
                    tag = f"{name} {tuple(shape)} {str(dtype).split('.')[-1]} {'train' if training else 'eval'}"
                    try:
                        ref, dev = _layer_pair(make, device)
                        xr = x.to(dtype).double()  # the reference sees the same (rounded) input
                        r_steps, r_state = _run_layer(ref, xr, dy, training)
                        d_steps, d_state = _run_layer(dev, x.to(device, dtype), dy.float().to(device), training,
                                                      amp=dtype)
                        for i, (r, d) in enumerate(zip(r_steps, d_steps)):
                            if d["y"].dtype != dtype:
                                failures.append(f"{tag} step {i}: output dtype {d['y'].dtype}, expected {dtype}")
                            _close_amp(d["y"], r["y"], f"{tag} step {i} output", failures, u, "output")
                            _close_amp(d["gx"], r["gx"], f"{tag} step {i} input grad", failures, u, "grad")
                            for k in r["gp"]:
                                _close_amp(d["gp"][k], r["gp"][k], f"{tag} step {i} grad {k}", failures, u, "grad")
                        for k in r_state:
                            _close_amp(d_state[k], r_state[k], f"{tag} buffer {k}", failures, u, "buffer")
                    except Exception:  # noqa: BLE001
                        failures.append(f"{tag}: {traceback.format_exc(limit=3)}")
    return failures


def check_syncs(device="cuda", shape=(8, 64, 28, 28)):
    """No host-device synchronization in any layer's training forward + backward (EvalNorm's aux loss included)
    or eval forward: each runs under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up step."""
    failures = []
    x = torch.randn(*shape, device=device) * 2 + 1
    for name, make in _layers(shape[1]).items():
        m = make().to(device)
        for training in (True, False):
            m.train(training)
            tag = f"{name} {'train' if training else 'eval'}"
            try:
                for audited in (False, True):  # warm-up: first-use paths (handles, lazy state) may sync once
                    xi = x.clone().requires_grad_(training)
                    torch.cuda.set_sync_debug_mode("error" if audited else 0)
                    try:
                        y = m(xi)
                        if training:
                            ((y * y).mean() + evalnorm_aux_loss(m)).backward()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{tag}: {str(e).splitlines()[0]}")
    return failures


def check_layers(device="cuda", shapes=SHAPES):
    """Failures (strings) of check 1; empty = every layer agrees."""
    failures = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
        x = x + torch.randn(shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64)
        dy = torch.randn(*shape, generator=g, dtype=torch.float64)
        for name, make in _layers(shape[1]).items():
            for training in (True, False):
                for layout in (torch.contiguous_format, torch.channels_last):
                    tag = f"{name} {tuple(shape)} {'train' if training else 'eval'} {layout}"
                    try:
                        ref, dev = _layer_pair(make, device)
                        r_steps, r_state = _run_layer(ref, x, dy, training)
                        xd = x.float().to(device).contiguous(memory_format=layout)
                        d_steps, d_state = _run_layer(dev, xd, dy.float().to(device), training)
                        for i, (r, d) in enumerate(zip(r_steps, d_steps)):
                            _close(d["y"], r["y"], f"{tag} step {i} output", failures)
                            _close(d["gx"], r["gx"], f"{tag} step {i} input grad", failures)
                            for k in r["gp"]:
                                _close(d["gp"][k], r["gp"][k], f"{tag} step {i} grad {k}", failures)
                        for k in r_state:
                            _close(d_state[k], r_state[k], f"{tag} buffer {k}", failures)
                    except Exception:  # noqa: BLE001  (a crash on CUDA is a failure to report, not to hide)
                        failures.append(f"{tag}: {traceback.format_exc(limit=3)}")
    return failures


# ---- 2 processes ----------------------------------------------------------------------------------------------

#: the two-process runs: (backend, device, dtype); "ref" is what every other run is compared with
TWO_PROCESS_RUNS = {
    "ref": ("gloo", "cpu", torch.float64),
    "cpu32": ("gloo", "cpu", torch.float32),  # --dry-run: the same check without a GPU
    "cuda_gloo": ("gloo", "cuda", torch.float32),  # one GPU: both ranks on cuda:0, statistics exchanged over gloo
    "cuda_nccl": ("nccl", "cuda", torch.float32),  # two GPUs or more: a rank per GPU
}


def _dist_worker(rank, world, run, tmpdir):
    import torch.distributed as dist
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import build_box_head
    from detectron2.utils import comm

    from d2norm.layers import AnySyncBatchNorm2d, norm_options
    from d2norm.layers.sync_domain_bn import SyncDomainBatchNorm2d

    backend, device, dtype = TWO_PROCESS_RUNS[run]
    dist.init_process_group(backend, init_method="file://" + os.path.join(tmpdir, f"rdv_{run}"),
                            rank=rank, world_size=world)
    index = rank if backend == "nccl" else 0
    if device == "cuda":
        torch.cuda.set_device(index)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    dev = torch.device(device, index) if device == "cuda" else torch.device("cpu")
    out = {}
    # AnySyncBN on both of its routes where they differ (CUDA: torch's SyncBN kernels, D2NORM_SYNCBN_CUDA_KERNELS)
    routes = ("0", "1") if device == "cuda" else ("0",)
    for route in routes:
        os.environ["D2NORM_SYNCBN_CUDA_KERNELS"] = route
        for case, sizes in enumerate(((5, 3), (0, 6))):  # uneven, and an empty rank
            g = torch.Generator().manual_seed(10 + case)
            xs = [torch.randn(n, 8, 5, 5, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]
            dys = [torch.randn(n, 8, 5, 5, generator=g, dtype=torch.float64) for n in sizes]
            m = AnySyncBatchNorm2d(8).to(dev, dtype).train()
            x = xs[rank].to(dev, dtype).requires_grad_()
            y = m(x)
            (y * dys[rank].to(dev, dtype)).sum().backward()
            # keyed without the route: both routes are compared with the one float64 reference
            out[f"syncbn{case} route {route}"] = {"y": y.detach().cpu(), "gx": x.grad.cpu(),
                                                  "gw": m.weight.grad.cpu(), "rm": m.running_mean.cpu(),
                                                  "rv": m.running_var.cpu()}
    os.environ["D2NORM_SYNCBN_CUDA_KERNELS"] = "0"
    # SyncDomainBN (the Table 5 RetinaNet head with SyncBN): two levels per rank, uneven sizes
    g = torch.Generator().manual_seed(5)
    levels = [[torch.randn(n, 8, h, h, generator=g, dtype=torch.float64) * 2 + 1 for n, h in ((2, 6), (2, 3))],
              [torch.randn(n, 8, h, h, generator=g, dtype=torch.float64) * 2 + 1 for n, h in ((3, 6), (3, 3))]]
    dn = SyncDomainBatchNorm2d(8, 2, train_stats="per_domain", pop_stats="per_domain", affine_per_domain=True,
                               eps=1e-5, momentum=0.1).to(dev, dtype).train()
    xs = [t.to(dev, dtype).requires_grad_() for t in levels[rank]]
    ys = dn.forward_domains(xs)
    sum((y.square() * (i + 1)).sum() for i, y in enumerate(ys)).backward()
    out["sync_domain_bn"] = {"y": [y.detach().cpu() for y in ys], "gx": [t.grad.cpu() for t in xs],
                             "buffers": {k: v.cpu() for k, v in dn.state_dict().items()}}
    cfg = d2norm.add_d2norm_config(get_cfg())
    b = cfg.MODEL.ROI_BOX_HEAD
    b.NAME, b.NUM_CONV, b.CONV_DIM, b.NUM_FC, b.FC_DIM, b.NORM = "ShuffledConvFCHead", 2, 8, 1, 16, "BN"
    cfg.D2NORM.SHUFFLE_HEAD.SEED = 7
    torch.manual_seed(0)
    with norm_options(cfg):
        head = build_box_head(cfg, ShapeSpec(channels=4, height=5, width=5))
    head.to(dev, dtype).train()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64) for n in (7, 4)]
    x = xs[rank].to(dev, dtype).requires_grad_()
    y = head(x)
    y.square().sum().backward()
    out["shuffle"] = {"y": y.detach().cpu(), "gx": x.grad.cpu(),
                      "gp": {k: p.grad.cpu() for k, p in head.named_parameters()}}
    if run != "ref":  # a measurement beside the check (not compared): AnySyncBN vs torch's SyncBatchNorm
        from gpu_measure import time_sync_bns

        out["timing"] = time_sync_bns(dev, (8, 64, 56, 56) if device == "cuda" else (4, 32, 8, 8),
                                      20 if device == "cuda" else 2)
    torch.save(out, os.path.join(tmpdir, f"{run}_{rank}.pt"))
    dist.destroy_process_group()


def _compare(got, ref, tag, failures):
    if isinstance(ref, dict):
        for k in ref:
            _compare(got[k], ref[k], f"{tag} {k}", failures)
    elif isinstance(ref, list):
        for i, (a, b) in enumerate(zip(got, ref)):
            _compare(a, b, f"{tag} [{i}]", failures)
    else:
        _close(got, ref, tag, failures)


def check_two_process(run=None):
    """AnySyncBN (both routes on CUDA), SyncDomainBN and the shuffled box head on 2 processes (``run``: a key of
    :data:`TWO_PROCESS_RUNS`; default: NCCL with 2+ GPUs, else both ranks on the one GPU over gloo) against the
    same two ranks on gloo/CPU in float64."""
    import torch.multiprocessing as mp

    if run is None:
        run = "cuda_nccl" if torch.cuda.device_count() >= 2 else "cuda_gloo"
    failures, timing = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for r in ("ref", run):
            mp.start_processes(_dist_worker, args=(2, r, tmp), nprocs=2, start_method="spawn")
        for rank in range(2):
            ref = torch.load(os.path.join(tmp, f"ref_{rank}.pt"))
            got = torch.load(os.path.join(tmp, f"{run}_{rank}.pt"))
            rank_timing = got.pop("timing")
            timing = timing or dict(rank_timing, backend=TWO_PROCESS_RUNS[run][0])  # rank 0's
            for key in got:
                base = key.replace("route 1", "route 0")
                _compare(got[key], ref[base], f"rank {rank} {key}", failures)
    return {"failures": failures, "data": {"sync_bn_timing": timing}}


# ---- training -------------------------------------------------------------------------------------------------

def check_training(iters=20, device="cuda", extra=()):
    with tempfile.TemporaryDirectory() as tmp:
        # -S propagated: a check run without site-packages (only PYTHONPATH, e.g. the bundle) trains the same way
        cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), os.path.join(ROOT, "tools", "train_net.py"),
               "--config-file",
               os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml"), "MODEL.DEVICE", device,
               "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "5", "OUTPUT_DIR", os.path.join(tmp, "out"),
               "D2NORM.DATA.SYNTHETIC_ROOT", os.path.join(tmp, "data"), *extra]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        log = res.stdout + res.stderr
        failures = []
        if res.returncode != 0:
            failures.append(f"training exited with {res.returncode}:\n{log[-3000:]}")
        elif not re.search(r"copypaste: [-0-9.,nan]+", log):
            failures.append("no COCO AP table in the training log")
        elif re.search(r"total_loss: (nan|inf)", log):
            failures.append("non-finite total_loss in the training log")
        return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-train", action="store_true", help="skip the short training run (check 3)")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="every check on the CPU at toy size (layers float32 vs "
                   "float64, 2 training iterations at 64 px): what the test suite runs to keep this tool working")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="start no check after this many seconds (a lent machine gives one command ~9 minutes); "
                        "the checks not started are listed as skipped")
    p.add_argument("--out", metavar="DIR", default=os.environ.get("OUT"),
                   help="write gpu_selfcheck.json (environment, every check's failures and wall time) into DIR "
                        "(default: $OUT, the device machine's output folder)")
    args = p.parse_args(argv)
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count(), "dry_run": bool(args.dry_run),
           "native": os.environ.get("D2NORM_NATIVE", "1"),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_selfcheck: CUDA is not available on this machine: skipped (nothing was checked)")
        _write(args.out, {"environment": env, "checks": [], "skipped": "no CUDA"})
        return 0
    print(f"gpu_selfcheck on {env['device']} ({env['gpus']} GPU(s)), torch {env['torch']}"
          + (" -- dry run on the CPU" if args.dry_run else ""))
    if args.dry_run:
        checks = [("layers CPU float32 vs CPU float64 (toy size)", lambda: check_layers("cpu", DRY_SHAPES)),
                  ("layers under CPU autocast bf16 vs CPU float64 (toy size)",
                   lambda: check_layers_amp("cpu", DRY_SHAPES, (torch.bfloat16,))),
                  ("AnySyncBN + SyncDomainBN + shuffled head on 2 gloo processes, float32 vs float64",
                   lambda: check_two_process("cpu32")),
                  ("speed: every layer vs nn.BatchNorm2d on the CPU (toy size, 2 rounds; a measurement)",
                   lambda: {"failures": [], "data": measure_speed("cpu", ((4, 32, 8, 8),), 2, 2.0)}),
                  ("detectors: an AMP (CPU bf16) training step, BN and EvalNorm backbones at 64 px",
                   lambda: measure_detectors_amp("cpu", torch.bfloat16, 64, iters=1, warmup=0,
                                                 names=["BN", "EvalNorm"])),
                  ("torch.compile (aot_eager backend) vs eager: GhostBN (toy size)",
                   lambda: measure_compile("cpu", DRY_SHAPES, ("GhostBN",), "aot_eager", rounds=1))]
        if not args.skip_train:
            checks.append(("main job: 2 training iterations + COCO eval on the CPU at 64 px",
                           lambda: check_training(2, "cpu", DRY_TRAINING)))
    else:
        two = ("2 NCCL processes" if torch.cuda.device_count() >= 2 else "2 processes on the one GPU (gloo)")
        checks = [("layers CUDA vs CPU float64", check_layers),
                  ("host syncs: every layer's training step and eval forward under set_sync_debug_mode('error')",
                   check_syncs),
                  ("layers under CUDA autocast fp16 / bf16 (half input) vs CPU float64", check_layers_amp),
                  (f"AnySyncBN (both routes) + SyncDomainBN + shuffled head on {two} vs 2 gloo/CPU float64 processes",
                   check_two_process),
                  ("detectors: AMP fp16 training steps with each norm in the backbone, s/iter vs BN (+ failures)",
                   measure_detectors_amp),
                  ("speed + peak memory: every layer vs cuDNN nn.BatchNorm2d (fp32; a measurement)",
                   lambda: {"failures": [], "data": measure_speed()}),
                  ("speed + peak memory: every layer vs cuDNN nn.BatchNorm2d (fp16 autocast; a measurement)",
                   lambda: {"failures": [], "data": measure_speed(amp="fp16")})]
        if not args.skip_train:
            checks.append((f"main job with AMP: {args.train_iters} training iterations + COCO eval on CUDA",
                           lambda: check_training(args.train_iters, extra=("SOLVER.AMP.ENABLED", "True"))))
        checks.append(("torch.compile (inductor) vs eager: the per-sample and ghost paths (a measurement)",
                       lambda: measure_compile(deadline=begin + args.budget_s)))
    failed, record, begin = 0, [], time.perf_counter()
    for title, fn in checks:
        if time.perf_counter() - begin > args.budget_s:
            record.append({"check": title, "ok": None, "skipped": f"over the {args.budget_s:g} s budget"})
            print(f"[skipped: over the {args.budget_s:g} s budget] {title}")
            _write(args.out, {"environment": env, "checks": record})
            continue
        start = time.perf_counter()
        res = fn()
        failures, data = (res["failures"], res.get("data")) if isinstance(res, dict) else (res, None)
        entry = {"check": title, "ok": not failures, "failures": failures[:50],
                 "wall_s": round(time.perf_counter() - start, 1)}
        if data is not None:
            entry["data"] = data
        record.append(entry)
        print(f"[{'ok' if not failures else 'FAIL'}] {title}")
        for f in failures[:50]:
            print("    " + f.replace("\n", "\n    "))
        failed += bool(failures)
        _write(args.out, {"environment": env, "checks": record})  # after every check: a timeout keeps the rest
    return 1 if failed else 0


#: --dry-run's training: the main job at 64 px on 4 images
DRY_TRAINING = ("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
                "INPUT.MAX_SIZE_TEST", "64", "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", "64",
                "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "4", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "2", "SOLVER.WARMUP_ITERS",
                "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")


def _write(out, doc) -> None:
    if not out:
        return
    import json

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_selfcheck.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
