"""Running the paper-effects experiments through the project's ordinary tools.

Every training is ``tools/train_net.py`` and every inference-time measurement is one of the statistics tools
(``tools/recompute_bn_stats.py``, ``tools/tune_example_weight.py``, ``tools/fit_evalnorm.py``,
``tools/analyze_bn.py``) or ``tools/train_net.py --eval-only``, each run as a subprocess exactly as a user would
type it. :class:`Context` adds only bookkeeping: a run directory per (command, seed, data seed), reuse of a
finished run (so experiments that evaluate the same checkpoint share its training), and reading the COCO AP
back from detectron2's ``copypaste:`` log lines or the tools' JSON reports.
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .core import code_commit, training_environment

__all__ = ["Run", "Context", "parse_coco_log", "ExperimentError", "config_digest"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ExperimentError(RuntimeError):
    """A subprocess of an experiment failed; the message names the command and its log."""


def parse_coco_log(text: str, task: str = "bbox") -> Optional[Dict[str, float]]:
    """The last COCO result of ``task`` printed by detectron2's ``print_csv_format`` (``copypaste:`` lines):
    ``{"AP": .., "AP50": .., ...}`` or None when the log has none."""
    lines = [ln.split("copypaste: ", 1)[1].strip() for ln in text.splitlines() if "copypaste: " in ln]
    found = None
    for i, ln in enumerate(lines):
        if ln == f"Task: {task}" and i + 2 < len(lines):
            keys, vals = lines[i + 1].split(","), lines[i + 2].split(",")
            if len(keys) == len(vals):
                found = {k: float(v) for k, v in zip(keys, vals)}
    return found


def ap_pair(res: Dict[str, Dict[str, float]]) -> Tuple[float, float]:
    """(AP, AP50) of a tools-style evaluation result ``{"bbox": {"AP": .., "AP50": ..}}``."""
    b = res.get("bbox", {})
    return float(b.get("AP", float("nan"))), float(b.get("AP50", float("nan")))


@dataclass(frozen=True)
class Run:
    """One training run: ``tools/train_net.py --config-file CONFIG [--num-gpus N] OPTS... SEED s`` (plus the
    synthetic-data seed and OUTPUT_DIR that :class:`Context` sets). ``tag`` names its directory."""

    tag: str
    config: str
    opts: Tuple[str, ...] = ()
    num_gpus: int = 1

    def __post_init__(self):
        if len(self.opts) % 2:
            raise ValueError(f"Run {self.tag!r}: opts must be KEY VALUE pairs, got {list(self.opts)}")
        if self.num_gpus < 1:
            raise ValueError(f"Run {self.tag!r}: num_gpus must be >= 1, got {self.num_gpus}")

    def with_opts(self, tag: str, *opts: str) -> "Run":
        return Run(tag, self.config, tuple(self.opts) + tuple(str(o) for o in opts), self.num_gpus)


def config_digest(path: str) -> str:
    """sha1 of a yacs config file and its ``_BASE_`` chain (paths relative to the repository or the file). A
    finished run records it; reusing the run after one of those files changed is refused (the directory key
    holds the path and the overrides only)."""
    import yaml

    h, todo, seen = hashlib.sha1(), [path if os.path.isabs(path) else os.path.join(REPO, path)], set()
    while todo:
        p = os.path.normpath(todo.pop(0))
        if p in seen:
            continue
        seen.add(p)
        with open(p, "rb") as f:
            text = f.read()
        h.update(os.path.relpath(p, REPO).encode() + b"\0" + text + b"\0")
        base = (yaml.safe_load(text) or {}).get("_BASE_")
        for b in [base] if isinstance(base, str) else (base or []):
            todo.append(os.path.join(os.path.dirname(p), b))
    return h.hexdigest()[:16]


class _RunLock:
    """An exclusive lock on a run directory (``fcntl.flock``), so two runner processes that need the same
    training (experiments run in parallel) train it once: the second waits, then reuses it."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, ".lock")

    def __enter__(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
        return False


def _measurement(fn):
    """A measurement on a trained run, under the lock of its directory ``measure/<name>``."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, run, trained, name, *args, **kwargs):
        with self._locked(trained, name):
            return fn(self, run, trained, name, *args, **kwargs)

    return wrapper


@dataclass
class Context:
    """Where runs go, which seeds, and how subprocesses are started. ``python`` defaults to this interpreter;
    ``nice`` lowers the subprocesses' priority (a shared machine); ``extra_opts`` (KEY VALUE pairs) are
    appended to every command."""

    work_dir: str
    data_seed: int = 0
    python: str = sys.executable
    nice: int = 0
    threads: int = 1
    quiet: bool = False
    dry_run: bool = False
    extra_opts: Tuple[str, ...] = ()
    commands: List[str] = field(default_factory=list)
    trainings: List[Dict] = field(default_factory=list)

    def __post_init__(self):
        if len(self.extra_opts) % 2:
            raise ValueError(f"extra_opts must be KEY VALUE pairs, got {list(self.extra_opts)}")
        self.extra_opts = tuple(str(o) for o in self.extra_opts)
        # absolute: run.json records paths that other processes (another checkout, another cwd) read back
        self.work_dir = os.path.abspath(self.work_dir)

    # ---- subprocesses ----------------------------------------------------------------------------------
    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def _call(self, argv: List[str], log_path: str) -> Tuple[float, str]:
        """Run ``argv`` in the repository root, stdout+stderr to ``log_path``; returns (wall time, the command
        line). Callers record *this* command line, never ``self.commands[-1]``: with ``--jobs`` > 1 other seeds'
        threads append to ``commands`` while this subprocess runs."""
        full = (["nice", "-n", str(self.nice)] if self.nice else []) + argv
        command = " ".join(shlex.quote(a) for a in argv)
        self.commands.append(command)
        if not self.quiet:
            print(f"  $ {command}", flush=True)
        if self.dry_run:
            return 0.0, command
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        t0 = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.run(full, cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = open(log_path).read()[-3000:]
            raise ExperimentError(f"command failed (exit {proc.returncode}): {command}\n"
                                  f"log: {log_path}\n{tail}")
        return time.time() - t0, command

    def _tool(self, name: str) -> str:
        return os.path.join("tools", name)

    def data_opts(self) -> List[str]:
        """cfg overrides of every command: the synthetic-data seed and ``extra_opts`` (e.g. a shorter schedule
        for a smoke run; they are part of each run's directory key)."""
        return ["D2NORM.DATA.SYNTHETIC_SEED", str(self.data_seed), *self.extra_opts]

    # ---- training ----------------------------------------------------------------------------------------
    def run_dir(self, run: Run, seed: int, init_checkpoint: Optional[str] = None) -> str:
        key = [run.config, list(run.opts), run.num_gpus, seed, self.data_seed]
        if self.extra_opts:
            key.append(list(self.extra_opts))
        key = json.dumps(key + [init_checkpoint] if init_checkpoint else key)
        h = hashlib.sha1(key.encode()).hexdigest()[:8]
        return os.path.join(self.work_dir, "runs", f"{run.tag}_s{seed}_d{self.data_seed}_{h}")

    def train(self, run: Run, seed: int, init_checkpoint: Optional[str] = None) -> Dict:
        """Train ``run`` with ``SEED seed`` (or reuse the finished run); returns ``{"dir", "final", "ap",
        "ap50", "wall_s", "command", "commit", "environment", "threads"}``: ap/ap50 the final COCO evaluation of the
        training; commit, environment (:func:`~.core.training_environment`) and threads (OMP/MKL) the code, the
        machine and the thread count that trained it (absent in records written before they were recorded).

        ``init_checkpoint``: continue that training checkpoint (model, optimizer, scheduler, iteration) with
        ``train_net.py --resume`` in the new run directory, e.g. the same iteration-k state with and without
        a change for the rest of the schedule. A run directory with a checkpoint but no finished record (an
        interrupted training) is continued with ``--resume`` from its last checkpoint."""
        out = self.run_dir(run, seed, init_checkpoint)
        done = os.path.join(out, "run.json")
        with _RunLock(out):
            if os.path.isfile(done):
                with open(done) as f:
                    info = json.load(f)
                digest = config_digest(run.config)
                if info.get("config_sha", digest) != digest:
                    raise ExperimentError(
                        f"finished run {out} was trained from another version of {run.config} (or its _BASE_ "
                        f"files: sha {info['config_sha']} vs {digest} now); delete that directory or use another "
                        f"--work-dir")
                # the paths of this checkout (the record may come from another cwd or checkout)
                info.update(dir=out, final=os.path.join(out, "model_final.pth"))
            else:
                info = self._train(run, seed, out, done, init_checkpoint)
        # the code and machine that trained it (None: a record from before they were recorded)
        self.trainings.append({"dir": info["dir"], "wall_s": info["wall_s"], "commit": info.get("commit"),
                               "environment": info.get("environment")})
        return info

    def _train(self, run: Run, seed: int, out: str, done: str, init_checkpoint: Optional[str]) -> Dict:
        argv = [self.python, self._tool("train_net.py"), "--config-file", run.config]
        if init_checkpoint:
            if not self.dry_run:
                if not os.path.isfile(init_checkpoint):
                    raise ExperimentError(f"init checkpoint {init_checkpoint} not found")
                os.makedirs(out, exist_ok=True)
                name = "model_init.pth"
                link = os.path.join(out, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(init_checkpoint), link)
                with open(os.path.join(out, "last_checkpoint"), "w") as f:
                    f.write(name)
            argv.append("--resume")
        elif os.path.isfile(os.path.join(out, "last_checkpoint")):
            argv.append("--resume")  # an interrupted training of this run: continue from its last checkpoint
        if run.num_gpus > 1:
            argv += ["--num-gpus", str(run.num_gpus)]
        argv += list(run.opts) + ["SEED", str(seed)] + self.data_opts() + ["OUTPUT_DIR", out]
        wall, command = self._call(argv, os.path.join(out, "train_stdout.log"))
        if self.dry_run:
            return {"dir": out, "final": os.path.join(out, "model_final.pth"), "ap": float("nan"),
                    "ap50": float("nan"), "wall_s": 0.0, "command": command}
        res = parse_coco_log(open(os.path.join(out, "log.txt")).read())
        if res is None:
            raise ExperimentError(f"no COCO bbox result in {out}/log.txt")
        info = {"dir": out, "final": os.path.join(out, "model_final.pth"), "ap": res["AP"], "ap50": res["AP50"],
                "wall_s": wall, "command": command, "config_sha": config_digest(run.config),
                "commit": code_commit(), "environment": training_environment(), "threads": self.threads}
        with open(done, "w") as f:
            json.dump(info, f, indent=1)
        return info

    def checkpoint(self, trained: Dict, iteration: int) -> str:
        """Path of the periodic checkpoint ``model_{iteration-1:07d}.pth`` of a trained run (detectron2's
        PeriodicCheckpointer numbering)."""
        path = os.path.join(trained["dir"], f"model_{iteration - 1:07d}.pth")
        if not self.dry_run and not os.path.isfile(path):
            raise ExperimentError(f"checkpoint {path} missing (is SOLVER.CHECKPOINT_PERIOD set?)")
        return path

    # ---- inference-time measurements on a checkpoint ------------------------------------------------------
    def _cached(self, path: str):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return None

    def _mdir(self, trained: Dict, name: str) -> str:
        return os.path.join(trained["dir"], "measure", name)

    def _locked(self, trained: Dict, name: str):
        """Lock of a measurement directory (two experiments may measure the same thing concurrently)."""
        return _RunLock(self._mdir(trained, name))

    @_measurement
    def evaluate(self, run: Run, trained: Dict, name: str, weights: Optional[str] = None,
                 opts: Sequence[str] = (), config: Optional[str] = None) -> Tuple[float, float]:
        """``tools/train_net.py --eval-only`` of ``weights`` (default the final checkpoint) with ``run``'s
        config (or ``config``, e.g. one a tool wrote next to its checkpoint) plus ``opts`` (e.g. another NORM
        that loads the same state); (AP, AP50)."""
        out = self._mdir(trained, name)
        cached = self._cached(os.path.join(out, "result.json"))
        if cached:
            return tuple(cached["ap"])
        argv = [self.python, self._tool("train_net.py"), "--config-file", config or run.config, "--eval-only"]
        argv += (list(run.opts) if config is None else []) + self.data_opts() + list(opts)
        argv += ["MODEL.WEIGHTS", weights or trained["final"], "OUTPUT_DIR", out]
        _, command = self._call(argv, os.path.join(out, "stdout.log"))
        if self.dry_run:
            return float("nan"), float("nan")
        res = parse_coco_log(open(os.path.join(out, "log.txt")).read())
        if res is None:
            raise ExperimentError(f"no COCO bbox result in {out}/log.txt")
        ap = (res["AP"], res["AP50"])
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"ap": ap, "command": command}, f)
        return ap

    @_measurement
    def precise_bn(self, run: Run, trained: Dict, name: str, num_samples: int, batch_size: int,
                   weights: Optional[str] = None, seed: int = 0) -> Tuple[float, float]:
        """``tools/recompute_bn_stats.py`` (PreciseBN statistics of ``num_samples`` training images forwarded
        in batches of ``batch_size``) on ``weights`` (default the final checkpoint), then
        :meth:`evaluate` of the written checkpoint: (AP, AP50)."""
        out = self._mdir(trained, name)
        ckpt = os.path.join(out, "precise.pth")
        if not os.path.isfile(os.path.join(out, "precise.json")):
            argv = [self.python, self._tool("recompute_bn_stats.py"), "--config-file", run.config,
                    "--weights", weights or trained["final"], "--num-samples", str(num_samples),
                    "--batch-size", str(batch_size), "--seed", str(seed), "--output-dir", out,
                    "--output-name", "precise", "--overwrite", *run.opts, *self.data_opts()]
            self._call(argv, os.path.join(out, "stdout.log"))
        return self.evaluate(run, trained, os.path.join(name, "eval"), weights=ckpt)

    @_measurement
    def example_weight_sweep(self, run: Run, trained: Dict, name: str,
                             alphas: Sequence[float]) -> Dict[float, Tuple[float, float]]:
        """``tools/tune_example_weight.py``: {α: (AP, AP50)} on the same checkpoint."""
        out = self._mdir(trained, name)
        report = os.path.join(out, "example_weight_sweep.json")
        rep = self._cached(report)
        if rep is None:
            argv = [self.python, self._tool("tune_example_weight.py"), "--config-file", run.config,
                    "--weights", trained["final"], "--alphas", *[f"{a:g}" for a in alphas],
                    "--output-dir", out, "--overwrite", *run.opts, *self.data_opts()]
            self._call(argv, os.path.join(out, "stdout.log"))
            if self.dry_run:
                return {float(a): (float("nan"),) * 2 for a in alphas}
            rep = self._cached(report)
        return {float(a): ap_pair(r) for a, r in rep["results"].items()}

    @_measurement
    def fit_evalnorm(self, run: Run, trained: Dict, name: str, args: Sequence[str]) -> Tuple[float, float]:
        """``tools/fit_evalnorm.py ARGS`` (offline fit or ``--rule B``) on the final checkpoint, then
        :meth:`evaluate` of the EvalNorm checkpoint with the config the tool wrote next to it."""
        out = self._mdir(trained, name)
        if not os.path.isfile(os.path.join(out, "evalnorm.json")):
            argv = [self.python, self._tool("fit_evalnorm.py"), "--config-file", run.config,
                    "--weights", trained["final"], "--output-dir", out, "--output-name", "evalnorm",
                    "--overwrite", *args, *run.opts, *self.data_opts()]
            self._call(argv, os.path.join(out, "stdout.log"))
        return self.evaluate(run, trained, os.path.join(name, "eval"), weights=os.path.join(out, "evalnorm.pth"),
                             config=os.path.join(out, "evalnorm.yaml"))

    @_measurement
    def calibrate_bn(self, run: Run, trained: Dict, name: str, args: Sequence[str]) -> Dict:
        """``tools/calibrate_bn.py ARGS`` on the final checkpoint; its JSON report."""
        out = self._mdir(trained, name)
        report = os.path.join(out, "calibrated.json")
        rep = self._cached(report)
        if rep is None:
            argv = [self.python, self._tool("calibrate_bn.py"), "--config-file", run.config,
                    "--weights", trained["final"], "--output-dir", out, "--output-name", "calibrated",
                    "--overwrite", *args, *run.opts, *self.data_opts()]
            self._call(argv, os.path.join(out, "stdout.log"))
            if self.dry_run:
                return {"test": {}, "oracle": {}, "chosen": "?"}
            rep = self._cached(report)
        return rep

    @_measurement
    def analyze_bn(self, run: Run, trained: Dict, name: str, args: Sequence[str] = ()) -> Dict:
        """``tools/analyze_bn.py`` on the final checkpoint; its JSON report."""
        out = self._mdir(trained, name)
        rep = self._cached(os.path.join(out, "analyze_bn.json"))
        if rep is None:
            argv = [self.python, self._tool("analyze_bn.py"), "--config-file", run.config,
                    "--weights", trained["final"], "--output-dir", out, "--overwrite", *args, *run.opts, *self.data_opts()]
            self._call(argv, os.path.join(out, "stdout.log"))
            if self.dry_run:
                return {"checkpoints": [{"esm": []}]}
            rep = self._cached(os.path.join(out, "analyze_bn.json"))
        return rep
