"""No host-device synchronization in a layer's training forward / backward or eval forward (what a CUDA training
step would wait on), checked on the CPU: every registered layer runs on the ``meta`` device — no data, no CPU
fast path (the native kernels apply to CPU tensors only), every op its accelerator route takes — under

* a dispatch mode that counts ``aten._local_scalar_dense`` (what ``.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``, ``.tolist()`` of a device tensor run: a device-to-host read), answering with a dummy so the
  layer goes on;
* a function mode that counts ``torch.tensor`` / ``torch.as_tensor`` of Python data onto a non-CPU device (a
  host-to-device copy).

Not covered here: ``momentum=None`` in layers whose training forward is torch's ``nn.BatchNorm2d`` (BatchStatsBN,
ExampleWeightedBN, EvalNorm, AnySyncBN) or ``F.batch_norm`` (DomainBN), where torch itself reads the counter on
the host (``1 / float(num_batches_tracked)``); d2norm's own EMA code (GhostBN, BGN) keeps it on the device.
"""
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import d2norm  # noqa: F401
from d2norm.layers import norm_layer
from d2norm.layers.evalnorm import evalnorm_aux_loss
from d2norm.layers.registry import NORM_REGISTRY

NAMES = sorted(k for k, _ in NORM_REGISTRY)


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.hits.append("".join(traceback.format_stack(limit=6)[:-1]))
            if args[0].device.type == "meta":
                return 1  # no value to read: a dummy lets the layer go on
        return func(*args, **(kwargs or {}))


class _HostData(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type != "cpu":
                self.hits.append("".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **kwargs)


class audit:
    """``with audit() as a: ...``; ``a.hits`` lists the stack of every host read / host-data copy."""

    def __enter__(self):
        self.reads, self.data = _HostReads(), _HostData()
        self.reads.__enter__()
        self.data.__enter__()
        return self

    def __exit__(self, *exc):
        self.data.__exit__(*exc)
        self.reads.__exit__(*exc)

    @property
    def hits(self):
        return self.reads.hits + self.data.hits


def _layer(name, **extra):
    opts = {"DomainBN": {"num_domains": 1}, "GhostBN": {"ghost_size": 2}}.get(name, {})
    return norm_layer(name, **opts, **extra)(32).to("meta")


@pytest.mark.parametrize("momentum", ["default", None])
@pytest.mark.parametrize("name", NAMES)
def test_training_and_eval_forward_do_not_sync(name, momentum):
    extra = {} if momentum == "default" else {"momentum": None}
    if momentum is None and name in ("BatchStatsBN", "ExampleWeightedBN", "EvalNorm", "AnySyncBN", "DomainBN",
                                     "MABN", "BRN"):
        pytest.skip("torch's own BatchNorm reads the counter for momentum=None (module docstring); MABN and BRN "
                    "have no cumulative mode")
    layer = _layer(name, **extra)
    x = torch.randn(6, 32, 8, 8, device="meta", requires_grad=True)
    with audit() as a:
        for _ in range(2):  # the second iteration too: nothing cached only after a first read
            y = layer.train()(x)
            aux = evalnorm_aux_loss(layer) if name == "EvalNorm" else None
            (y.sum() + (aux if aux is not None else 0)).backward()
        with torch.no_grad():
            layer.eval()(x)
    assert not a.hits, f"{len(a.hits)} host sync(s) in {name}:\n" + "\n---\n".join(a.hits[:3])


@pytest.mark.parametrize("mode", ["online", "rule", "offline"])
def test_evalnorm_eval_modes_do_not_sync_per_call(mode):
    """Rule mode reads the recorded batch size B once after training (or a load), not once per eval call."""
    layer = _layer("EvalNorm", mode=mode)
    x = torch.randn(4, 32, 8, 8, device="meta")
    with audit() as first:
        with torch.no_grad():
            layer.train()(x)
            layer.eval()(x)  # rule: the one read of B (cached from here on)
    assert len(first.hits) == (2 if mode == "rule" else 0), "\n---\n".join(first.hits)  # seen_batches, B
    with torch.no_grad(), audit() as a:
        for _ in range(3):
            layer(x)
    assert not a.hits, "\n---\n".join(a.hits[:3])
    with audit() as again:  # a new training forward invalidates the cached B
        with torch.no_grad():
            layer.train()(x)
            layer.eval()(x)
    assert len(again.hits) == (2 if mode == "rule" else 0)


def test_the_audit_can_fail():
    """The modes see what they are meant to see (a layer that read on the host would be caught)."""
    t = torch.ones(3, device="meta")
    with audit() as a:
        float(t.sum())
        torch.tensor([1.0, 2.0], device="meta")
        t.sum() * 2  # no sync
    assert len(a.hits) == 2


@pytest.mark.parametrize("layout", [("shared", "shared", False), ("shared", "per_domain", False),
                                    ("per_domain", "shared", False), ("per_domain", "per_domain", True)])
def test_domain_bn_forward_domains_does_not_sync(layout):
    """A RetinaNet head's per-level calls (rethinking Table 5 layouts): one forward_domains over 3 levels."""
    from d2norm.layers.domain_bn import DomainBatchNorm2d

    ts, ps, aff = layout
    layer = DomainBatchNorm2d(16, 3, train_stats=ts, pop_stats=ps, affine_per_domain=aff).to("meta")
    xs = [torch.randn(2, 16, s, s, device="meta", requires_grad=True) for s in (8, 4, 2)]
    with audit() as a:
        for _ in range(2):
            sum(y.sum() for y in layer.train().forward_domains(xs)).backward()
        with torch.no_grad():
            layer.eval().forward_domains(xs)
    assert not a.hits, "\n---\n".join(a.hits[:3])


def test_precise_bn_pass_reads_the_device_a_fixed_number_of_times_not_per_batch():
    """The non-finite check of every recorded call stays on the device until the end of the pass: host reads do
    not grow with the number of batches (they did: one per layer call)."""
    from torch import nn

    from d2norm.stats import recompute_population_stats

    def reads(num_batches):
        # on the CPU (the pass compares states with torch.equal, which meta tensors cannot run): reads are counted
        # and answered with the real value
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        data = [torch.randn(2, 3, 4, 4) for _ in range(num_batches)]
        with audit() as a:
            recompute_population_stats(model, data, num_samples=2 * num_batches, batch_size=2, progress=False)
        return len(a.hits)

    assert reads(8) == reads(2)
