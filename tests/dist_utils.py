"""Run a function in several real processes on gloo (CPU), for tests of distributed code.

Usage (define the function at module level of an importable module, e.g. the test file, so that it also
works with the "spawn" start method)::

    from dist_utils import run_distributed

    def _worker(rank, world_size, data):
        ...                       # torch.distributed is initialized (gloo), detectron2.utils.comm works
        return {"y": y}           # anything torch.save can store; tensors are fine

    def test_something():
        results = run_distributed(_worker, world_size=2, args=(data,))
        assert torch.equal(results[0]["y"], results[1]["y"])

Guarantees:

* each rank runs ``fn(rank, world_size, *args)`` with ``torch.distributed`` initialized on gloo (file
  rendezvous in a temporary directory: no TCP port to race for) and ``detectron2.utils.comm`` usable
  (``_LOCAL_PROCESS_GROUP`` is set: every rank is on this machine), one intra-op thread;
* the return values come back as a list indexed by rank (through ``torch.save`` files);
* an exception in any rank fails the caller with that rank's traceback (``DistributedTestError``);
* a deadlock fails instead of hanging: after ``timeout`` seconds (default 120) every process is killed and
  ``DistributedTestError`` is raised; collectives also time out after ``timeout`` seconds inside the ranks.

Start method: "fork" where available and CUDA is not initialized in the parent (about 0.1 s per call), else
"spawn" (several seconds: each child re-imports torch, detectron2 and the test module); the environment
variable ``D2NORM_TEST_START_METHOD`` overrides it. Still, run several cases inside one call.
"""
import os
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_distributed", "DistributedTestError"]


class DistributedTestError(AssertionError):
    """A rank raised, died, or the group did not finish in time. An AssertionError, so pytest reports a
    failure (not an error) with the message."""


def _entry(rank, fn, world_size, tmpdir, timeout, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    result_file = os.path.join(tmpdir, f"result_{rank}.pt")
    error_file = os.path.join(tmpdir, f"error_{rank}.txt")
    try:
        dist.init_process_group(
            backend="gloo",
            init_method="file://" + os.path.join(tmpdir, "rendezvous"),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        from detectron2.utils import comm

        # All ranks are on this machine; comm.get_local_rank()/get_local_size() need the local group.
        comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
        result = fn(rank, world_size, *args)
        torch.save(result, result_file)
        # No rank tears the group down while another is still inside a collective (gloo would then report
        # "connection closed" there). Only on success: a failed rank makes the parent terminate the others.
        dist.barrier()
    except BaseException:
        with open(error_file, "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_method() -> str:
    # fork costs ~0.1 s per run, spawn several seconds (each child re-imports torch, detectron2 and the test
    # module). fork is safe here: children only use CPU/gloo, set one intra-op thread before any op (as
    # DataLoader workers do), and we never fork a parent that has initialized CUDA.
    method = os.environ.get("D2NORM_TEST_START_METHOD")
    if method:
        return method
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: Sequence = (), timeout: float = 120.0
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return their results
    (a list indexed by rank). Raises :class:`DistributedTestError` on any rank's exception or on timeout."""
    tmpdir = tempfile.mkdtemp(prefix="d2norm_dist_")
    old_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children before they import torch
    try:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, tmpdir, timeout, tuple(args)),
            nprocs=world_size,
            join=False,
            start_method=_start_method(),
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    for p in ctx.processes:
                        p.join(5)
                    raise DistributedTestError(
                        f"distributed test {getattr(fn, '__name__', fn)} did not finish in {timeout:.0f}s "
                        f"(deadlock?); ranks still alive were killed"
                    )
        except ProcessException as e:
            details = []
            for r in range(world_size):
                path = os.path.join(tmpdir, f"error_{r}.txt")
                if os.path.exists(path):
                    with open(path) as f:
                        details.append(f"--- rank {r} ---\n{f.read()}")
            raise DistributedTestError(
                f"distributed test {getattr(fn, '__name__', fn)} failed: {e}\n" + "\n".join(details)
            ) from None
        results = []
        for r in range(world_size):
            path = os.path.join(tmpdir, f"result_{r}.pt")
            if not os.path.exists(path):
                raise DistributedTestError(f"rank {r} exited without a result")
            results.append(torch.load(path, weights_only=False))
        return results
    finally:
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
        shutil.rmtree(tmpdir, ignore_errors=True)
