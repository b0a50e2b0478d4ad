"""The measurements of tools/gpu_selfcheck.py (never failures by themselves, except where a measured run breaks):
speed and peak memory of every layer (tools/benchmark_norms.py), AMP training steps of the detectors with each norm
in the backbone, and torch.compile vs eager. Each returns ``{"failures": [...], "data": ...}`` or the data alone
(speed), written into the check's JSON; tools/bench_report.py --gpu reads them against the issue's targets."""
import copy
import time

import d2norm
import torch
from detectron2.config import get_cfg

from d2norm.layers import NORM_REGISTRY
from d2norm.layers.evalnorm import evalnorm_aux_loss

from benchmark_norms import _sync, _time_once  # noqa: E402  (tools/ is on sys.path when run)

#: float32 accuracy: the layer check's tolerance (CUDA float32 vs CPU float64) and compiled vs eager
RTOL, ATOL = 2e-4, 2e-4


def measure_speed(device="cuda", shapes=((2, 256, 200, 336), (8, 64, 56, 56), (512, 256, 7, 7)), rounds=5,
                  window_ms=20.0, amp=None):
    """tools/benchmark_norms.py's ratios to ``nn.BatchNorm2d`` (cuDNN on CUDA) for every layer, train fwd+bwd and
    eval, and peak memory on CUDA; float32, or under autocast with ``amp`` ("fp16"/"bf16"). A measurement, never
    a failure."""
    import benchmark_norms

    results = benchmark_norms.run([list(s) for s in shapes], window_ms, rounds, device, torch.get_num_threads(),
                                  clock="wall", amp=amp)
    per_sample = _per_sample_inference()
    for r in results:  # which eval target applies (tools/bench_report.py): affine inference or per-sample statistics
        for name, row in r["layers"].items():
            row["eval_per_sample"] = per_sample[name]
    return results


def _per_sample_inference():
    """{registered name: True when its inference is not a fixed affine map (per-sample / batch statistics)}, as the
    layer protocol says (``inference_affine`` raises NotAnAffine)."""
    from d2norm.layers.base import NotAnAffine
    from d2norm.layers.protocol import norm_protocol

    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    out = {}
    for name, cls in NORM_REGISTRY:
        layer = cls(**cls.from_config(cfg, 32)).eval()
        try:
            norm_protocol(layer).inference_affine()
            out[name] = False
        except NotAnAffine:
            out[name] = True
    return out


def measure_detectors_amp(device="cuda", dtype=torch.float16, image_size=512, iters=6, warmup=3, names=None):
    """AMP training steps of the main job's detector (Faster R-CNN R18-FPN) with each registered norm in the
    backbone (MABN with its weight-centralized backbone), by detectron2's AMPTrainer's recipe: forward and losses
    under ``torch.autocast(dtype)``, a ``GradScaler`` for float16, SGD. Failures: a non-finite loss in any iteration,
    or a float16 run whose scaler skipped every step after the warm-up (non-finite gradients every time). Data per
    norm: seconds per iteration (median of ``iters`` timed iterations), its ratio to the BN detector's (the target:
    it/s >= 0.9x BN's, i.e. ratio <= 1.11), the steps the scaler skipped, peak memory (CUDA)."""
    import benchmark_models

    config, mabn_backbone = benchmark_models.MODELS["faster_rcnn_R18_FPN"]
    names = names or ["BN"] + sorted(n for n, _ in NORM_REGISTRY if n != "BN")
    failures, data = [], {"image_size": image_size, "dtype": str(dtype).replace("torch.", ""), "norms": {}}
    for name in names:
        try:
            row = _detector_amp_run(name, benchmark_models, config, mabn_backbone, device, dtype, image_size, iters,
                                    warmup, failures)
        except Exception as e:  # noqa: BLE001 -- one norm's crash is its failure; the other norms still run
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        data["norms"][name] = row
    bn = data["norms"].get("BN")
    for row in data["norms"].values():
        if bn:
            row["ratio_vs_BN"] = row["s_per_iter"] / bn["s_per_iter"]
    return {"failures": failures, "data": data}


def _detector_amp_run(name, benchmark_models, config, mabn_backbone, device, dtype, image_size, iters, warmup,
                      failures):
    from detectron2.utils.events import EventStorage

    from d2norm.layers import build_model

    cfg = benchmark_models.model_cfg(config, name, mabn_backbone, image_size)
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = benchmark_models._batch(cfg.SOLVER.IMS_PER_BATCH, image_size, 0)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 and device == "cuda" else None
    times, skipped, bad = [], 0, None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with EventStorage(0):
        for it in range(warmup + iters):
            scale = scaler.get_scale() if scaler is not None else None  # a host read: outside the timed part
            _sync(torch.device(device))
            start = time.perf_counter()
            with torch.autocast(device, dtype=dtype):
                losses = model(batch)
                loss = sum(losses.values()) + evalnorm_aux_loss(model)
            opt.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            _sync(torch.device(device))
            if it >= warmup:
                times.append(time.perf_counter() - start)
                skipped += scaler is not None and scaler.get_scale() < scale  # a skipped step lowers the scale
            finite = {k: bool(torch.isfinite(v).all()) for k, v in dict(losses, total_with_aux=loss).items()}
            if not all(finite.values()) and bad is None:
                bad = f"{name}: non-finite loss(es) {[k for k, ok in finite.items() if not ok]} at iteration {it}"
    if bad:
        failures.append(bad)
    if scaler is not None and skipped == iters:
        failures.append(f"{name}: the GradScaler skipped all {iters} steps after the warm-up (non-finite "
                        "gradients in every iteration)")
    row = {"s_per_iter": sorted(times)[len(times) // 2], "skipped_steps": int(skipped)}
    if device == "cuda":
        row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


#: the paths torch.compile is measured on (issue item: the per-sample and ghost paths)
COMPILE_LAYERS = ("GhostBN", "BGN", "EvalNorm", "ExampleWeightedBN")
#: FPN-level-like sizes (P2..P4 of an 800x1344 image at batch 2) and an RoI-head batch: the recompiles a
#: detector's varying feature-map sizes cause are part of the measurement
COMPILE_SHAPES = ((2, 256, 200, 336), (2, 256, 100, 168), (2, 256, 50, 84), (512, 256, 7, 7))


def measure_compile(device="cuda", shapes=COMPILE_SHAPES, names=COMPILE_LAYERS, backend="inductor", rounds=5,
                    deadline=None):
    """``torch.compile`` of each layer vs eager (a measurement): the first call's time (compilation included),
    recompiles and graph breaks over the shapes (dynamo's counters), then per shape the steady-state time of a
    training forward + backward and of an eval forward, compiled / eager (median of ``rounds``), and the largest
    difference of the compiled output from the eager one. Failures: a compiled output that differs from eager by
    more than float32 accuracy, or an error. No layer is started after ``deadline`` (``time.perf_counter()``
    seconds; inductor compiles take tens of seconds per layer): those are listed as skipped."""
    import logging

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks are counted (and their reasons kept), not printed

    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    failures, data = [], {"backend": backend, "layers": {}}
    for name in names:
        if deadline is not None and time.perf_counter() > deadline:
            data["layers"][name] = {"skipped": "over the time budget"}
            continue
        cls = NORM_REGISTRY.get(name)
        torch._dynamo.reset()
        counters.clear()
        eager = cls(**cls.from_config(cfg, shapes[0][1])).to(device)
        compiled_mod = copy.deepcopy(eager)
        compiled = torch.compile(compiled_mod, backend=backend)
        row = {"shapes": {}}
        try:
            for i, shape in enumerate(shapes):
                x = torch.randn(*shape, device=device) * 2 + 1
                entry = {}
                for mode in ("train", "eval"):
                    def step(m, mod):
                        mod.train(mode == "train")
                        if mode == "train":
                            xg = x.clone().requires_grad_()
                            y = m(xg)
                            (y.sum() + evalnorm_aux_loss(mod)).backward()
                            return y.detach()
                        with torch.no_grad():
                            return m(x)

                    _sync(torch.device(device))
                    start = time.perf_counter()
                    y_c = step(compiled, compiled_mod)
                    _sync(torch.device(device))
                    if i == 0 and mode == "train":
                        row["first_call_s"] = time.perf_counter() - start
                    y_e = step(eager, eager)
                    diff = float((y_c.float() - y_e.float()).abs().max())
                    entry[f"{mode}_max_abs_diff"] = diff
                    if not diff <= RTOL * float(y_e.abs().max()) + ATOL:
                        failures.append(f"{name} {mode} {tuple(shape)}: compiled differs from eager by {diff:.3g}")
                    ratios = []
                    for _ in range(rounds):
                        t_c = _time_once(lambda: step(compiled, compiled_mod), 1, torch.device(device))
                        t_e = _time_once(lambda: step(eager, eager), 1, torch.device(device))
                        ratios.append(t_c / t_e)
                    entry[f"{mode}_ratio"] = sorted(ratios)[len(ratios) // 2]
                row["shapes"]["x".join(map(str, shape))] = entry
        except Exception as e:  # noqa: BLE001 -- a layer torch.compile cannot take is a finding, not a crash
            failures.append(f"{name}: torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
        row["unique_graphs"] = int(counters["stats"]["unique_graphs"])
        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
        row["recompiles"] = max(0, row["unique_graphs"] - 1)
        row["graph_break_reasons"] = [k[:200] for k, _ in counters["graph_break"].most_common(3)]
        data["layers"][name] = row
    torch._dynamo.reset()
    return {"failures": failures, "data": data}


def time_sync_bns(device, shape, iters, warmup=3):
    """Inside a 2-process group: seconds per training step (forward + backward) of AnySyncBN (torch-ops route,
    and on CUDA the SyncBN-kernel route, D2NORM_SYNCBN_CUDA_KERNELS=1) and of torch's ``nn.SyncBatchNorm`` on
    this rank's ``shape`` input, and AnySyncBN's ratio to it (the target: <= 1.1). torch's SyncBatchNorm runs on
    accelerators only: on the CPU its entry says so. Every rank must call it (collectives inside)."""
    import os

    import torch.distributed as dist

    from d2norm.layers import AnySyncBatchNorm2d

    def time_module(make):
        m = make().to(device).train()
        x = (torch.randn(*shape, device=device) * 2 + 1).requires_grad_()
        for _ in range(warmup):
            m(x).sum().backward()
        dist.barrier()
        return _time_once(lambda: m(x).sum().backward(), iters, torch.device(device))

    c = shape[1]
    out = {"shape": list(shape), "s_per_step": {}}
    routes = ("0", "1") if torch.device(device).type == "cuda" else ("0",)
    for route in routes:
        os.environ["D2NORM_SYNCBN_CUDA_KERNELS"] = route
        out["s_per_step"][f"AnySyncBN route {route}"] = time_module(lambda: AnySyncBatchNorm2d(c))
    os.environ["D2NORM_SYNCBN_CUDA_KERNELS"] = "0"
    try:
        ref = time_module(lambda: torch.nn.SyncBatchNorm(c))
    except ValueError as e:  # "SyncBatchNorm expected input tensor to be on GPU ..."
        out["s_per_step"]["nn.SyncBatchNorm"] = f"unavailable: {e}"
        return out
    out["s_per_step"]["nn.SyncBatchNorm"] = ref
    out["ratio_vs_torch_syncbn"] = {k: v / ref for k, v in out["s_per_step"].items() if k.startswith("AnySyncBN")}
    return out
