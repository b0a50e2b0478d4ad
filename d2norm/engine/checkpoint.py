"""d2norm's checkpointer, for training and for inference: detectron2's ``DetectionCheckpointer`` that, before it
loads a checkpoint's model state, converts the model the way the training run had converted it when the checkpoint
was written. The one such conversion is the FrozenBN switch (rethinking §4.3): a checkpoint written after it holds
FrozenBN layers, recorded in the switch hook's state (``checkpoint["trainer"]["hooks"]``) as a conversion
(``"conversion": "frozen_bn"``, the layers, γ/β trainable or not) that the checkpointer replays through the
layers (:func:`d2norm.layers.frozen.freeze_bn_layers`) without importing the hook."""
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..layers.base import nonfinite_statistics
from ..layers.frozen import freeze_bn_layers

__all__ = ["D2NormCheckpointer", "atomic_write", "write_checkpoint", "NonFiniteCheckpointError",
           "CheckpointMismatchError", "ParameterLoadReport", "TRAINING_CHECKPOINT_NAME", "unloaded_statistics",
           "report_unloaded_statistics", "is_remote", "training_checkpoints",
           "check_loaded_statistics"]

logger = logging.getLogger(__name__)


class D2NormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts the model before loading a checkpoint written after the FrozenBN
    switch.

    * Inference (``--eval-only``, tools): the model's BN layers named in the checkpoint are frozen
      (:func:`d2norm.layers.frozen.freeze_bn_layers`, same affine choice) and the weights load into them.
    * Training (:class:`d2norm.engine.Trainer`'s checkpointer): the :class:`FrozenBNSwitchHook` attached with
      :meth:`attach_frozen_bn_switch` converts the running trainer instead (model, optimizer, scheduler, DDP), so a
      resumed run continues with the optimizer state of the converted model.

    A checkpoint written before the switch (or without it) loads unchanged.

    Besides, what fvcore's ``Checkpointer`` lacks:

    * **atomic writes** of every ``.pth`` and of ``last_checkpoint`` (:func:`atomic_write`): fvcore writes the
      target file in place, so an interrupted write leaves a truncated file that ``--resume`` stops on;
    * **resume fallback**: fvcore's ``resume_or_load`` stops on an empty ``last_checkpoint`` ("Checkpoint ...
      not found") or an unreadable file (``PytorchStreamReader failed``); here the newest readable training
      checkpoint of the folder (``model_final.pth``, ``model_NNNNNNN.pth``) is loaded instead, with a warning
      naming the unreadable one; no readable one at all is an error;
    * **non-finite statistics** are never written silently (:func:`write_checkpoint`, ``on_nonfinite``);
    * **checkpoints that do not fit the model** (another architecture) are reported with counts
      (:class:`ParameterLoadReport`): ``on_mismatch="warn"`` (training: fine-tuning from another model's
      checkpoint is legitimate) logs a prominent warning; ``"error"`` (tools, ``--eval-only``: parameters left
      at their initialization give meaningless results) raises :class:`CheckpointMismatchError`. fvcore only
      lists the keys, at the level of harmless notes. The report of the last load is :attr:`load_report`.
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: Optional[bool] = None, on_mismatch: str = "warn",
                 on_nonfinite: str = "warn", on_bad_stats: str = "warn", **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        for name, v in (("on_mismatch", on_mismatch), ("on_nonfinite", on_nonfinite), ("on_bad_stats", on_bad_stats)):
            if v not in ("warn", "error"):
                raise ValueError(f"{name} must be 'warn' or 'error', got {v!r}")
        self.on_mismatch, self.on_nonfinite, self.on_bad_stats = on_mismatch, on_nonfinite, on_bad_stats
        self.load_report: Optional[ParameterLoadReport] = None
        self._preloaded = None
        self._loading: Optional[str] = None
        self._switch_hook = None
        self._switch_trainer = None

    def attach_frozen_bn_switch(self, trainer, hook) -> None:
        """Let ``hook`` (a :class:`FrozenBNSwitchHook` of ``trainer``) convert ``trainer`` before a post-switch
        checkpoint loads (resume, or ``MODEL.WEIGHTS`` of such a checkpoint)."""
        self._switch_hook, self._switch_trainer = hook, trainer

    def frozen_bn_switch_state(self, checkpoint) -> Optional[dict]:
        """The FrozenBN switch recorded in ``checkpoint`` if it was written after the switch, else ``None``: the
        attached switch hook's state, or (inference) the trainer-hook state whose ``"conversion"`` is ``"frozen_bn"`` (the layers converted and whether γ/β stayed
        trainable; checkpoints written before that key existed: the state with ``switched`` and
        ``trainable_affine``). No hook class is needed to read it."""
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("trainer"), dict):
            return None
        hooks = checkpoint["trainer"].get("hooks", {})
        # the attached hook's own entry (detectron2 keys a hook's state by its class's __qualname__); without one
        # (inference) any hook state recording the conversion
        states = [hooks.get(type(self._switch_hook).__qualname__)] if self._switch_hook is not None else hooks.values()
        for state in states:
            if not isinstance(state, dict):
                continue
            if state.get("conversion") == "frozen_bn" or ("conversion" not in state and "switched" in state
                                                            and "trainable_affine" in state):
                return state if state.get("switched") else None
        return None

    def prepare_model(self, checkpoint) -> bool:
        """Convert the model as the run had when ``checkpoint`` was written; True when a conversion was applied."""
        state = self.frozen_bn_switch_state(checkpoint)
        if state is None:
            return False
        hook = self._switch_hook
        if hook is None:
            freeze_bn_layers(self.model, bool(state.get("trainable_affine", True)), names=state.get("layers") or [])
            return True
        if hook.switched:
            return False
        hook.convert_for_checkpoint(self._switch_trainer, state)
        return True

    def _load_model(self, checkpoint):  # fvcore's extension point, overridden by DetectionCheckpointer too
        self.prepare_model(checkpoint)
        author = checkpoint.get("__author__")
        loaded = {}

        def capture(module, state_dict, prefix, *args):
            if prefix == "":
                loaded["keys"] = set(state_dict)

        handle = self.model.register_load_state_dict_pre_hook(capture)
        try:
            incompatible = super()._load_model(checkpoint)
        finally:
            handle.remove()
        unloaded = []
        if incompatible is not None and "keys" in loaded:
            report_unloaded_statistics(self.model, loaded["keys"], incompatible.missing_keys, author)
            if author != "Caffe2":  # Caffe2 files fold the statistics into the affine by convention
                unloaded = [f"{n}.{b}" if n else b
                            for n, bs in unloaded_statistics(self.model, loaded["keys"]).items() for b in bs]
        self.load_report = ParameterLoadReport.of(self.model, incompatible)
        self.load_report.check(self.on_mismatch, self._loading or "the checkpoint")
        optional = [k for k in (incompatible.missing_keys if incompatible is not None else [])
                    if k in set(_optional_keys(self.model))]
        if optional:  # one line for all layers (e.g. EvalNorm's α̂, β̂ from a BN checkpoint)
            logger.warning("%s has no %s: kept at their documented initial values", self._loading or "the checkpoint",
                           _by_kind(optional))
        check_loaded_statistics(self.model, unloaded, self.on_bad_stats, self._loading or "the checkpoint")
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        """fvcore's list of missing keys, without the optional state already summarized in one line
        (:meth:`_load_model`): a BN checkpoint into EvalNorm would otherwise list 4 keys per layer."""
        optional = set(_optional_keys(self.model))
        if optional and incompatible is not None:
            incompatible = incompatible._replace(
                missing_keys=[k for k in incompatible.missing_keys if k not in optional])
        super()._log_incompatible_keys(incompatible)

    # ---- reading ---------------------------------------------------------------------------------------------
    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_file(self, filename):
        if self._preloaded is not None and self._preloaded[0] == filename:
            return self._preloaded[1]
        return super()._load_file(filename)

    def _read_outside_load(self, filename: str):
        """``_load_file`` for probing a resume candidate. detectron2 main's ``DetectionCheckpointer._load_file``
        asserts it runs inside ``load``, which sets ``_parsed_url_during_load`` (query options of the path); v0.6
        has no such attribute. Set it here for the read, as ``load`` would."""
        if getattr(self, "_parsed_url_during_load", False) is None:
            from urllib.parse import urlparse

            self._parsed_url_during_load = urlparse(filename)
            try:
                return self._load_file(filename)
            finally:
                self._parsed_url_during_load = None
        return self._load_file(filename)

    def resume_or_load(self, path: str, *, resume: bool = True):
        # fvcore resumes only through last_checkpoint; a folder whose last_checkpoint is missing but which holds
        # training checkpoints would restart from iteration 0 and overwrite them: resume from them instead
        if not resume or is_remote(self.save_dir) or not self.has_checkpoint():
            return super().resume_or_load(path, resume=resume)
        unreadable = []
        for candidate in self._resume_candidates():
            try:
                checkpoint = self._read_outside_load(candidate)
            except Exception as e:  # truncated / corrupt: PytorchStreamReader, EOFError, UnpicklingError, ...
                unreadable.append(f"{candidate} ({type(e).__name__}: {e})")
                logger.warning("Cannot read checkpoint %s (%s: %s); trying the newest readable one instead",
                               candidate, type(e).__name__, e)
                continue
            if unreadable:
                logger.warning("Resuming from %s (newest readable checkpoint in %s)", candidate, self.save_dir)
            self._preloaded = (candidate, checkpoint)
            try:
                return self.load(candidate)
            finally:
                self._preloaded = None
        raise RuntimeError(
            f"cannot resume: {self.save_dir!r} has "
            f"{'a last_checkpoint' if super().has_checkpoint() else 'training checkpoints'} but no readable training "
            f"checkpoint"
            + (f"; unreadable: {'; '.join(unreadable)}" if unreadable else "")
            + ". Start without --resume (or restore a checkpoint there)."
        )

    def has_checkpoint(self) -> bool:
        """fvcore's test (a ``last_checkpoint`` file), or training checkpoints in the folder: what detectron2's
        ``DefaultTrainer.resume_or_load`` asks before continuing at the loaded iteration + 1 instead of 0."""
        if super().has_checkpoint():
            return True
        return not is_remote(self.save_dir) and bool(self._training_files())

    def _training_files(self) -> List[str]:
        return training_checkpoints(self.save_dir)

    def _resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names (if it exists), then the folder's other training checkpoints,
        newest first."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag) as f:
                named = f.read().strip()
        except OSError:
            named = None
        first = os.path.join(self.save_dir, named) if named else ""
        if named is None:
            logger.warning("%s does not exist; resuming from the newest readable checkpoint in %s", tag,
                           self.save_dir)
        elif not named:
            logger.warning("%s is empty; resuming from the newest readable checkpoint in %s", tag, self.save_dir)
        elif not os.path.isfile(first):
            logger.warning("%s names %r, which does not exist; resuming from the newest readable checkpoint",
                           tag, named)
            first = ""
        others = [os.path.join(self.save_dir, f) for f in self._training_files()]
        others = sorted((p for p in others if p != first), key=lambda p: (os.path.getmtime(p), p), reverse=True)
        return ([first] if first else []) + others

    # ---- writing ---------------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs) -> None:
        if is_remote(self.save_dir):
            return super().save(name, **kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        data = {key: obj.state_dict() for key, obj in self.checkpointables.items()}
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        write_checkpoint(self.model, path, on_nonfinite=self.on_nonfinite, **data)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if is_remote(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))


def is_remote(path: str) -> bool:
    """True for a URL-like path (``scheme://...``: fvcore's PathManager handlers), which is not checked or written
    as a local file."""
    return "://" in (path or "")


#: the names detectron2's trainer gives its checkpoints (PeriodicCheckpointer, file_prefix "model"), without .pth
TRAINING_CHECKPOINT_NAME = re.compile(r"^model_(\d{7}|final)$")


def training_checkpoints(folder: str) -> List[str]:
    """The file names of the trainer's checkpoints in ``folder`` (``model_final.pth``, ``model_NNNNNNN.pth``),
    sorted; ``[]`` for a missing or remote folder. Tools' outputs (other names) are not training checkpoints."""
    if not folder or is_remote(folder) or not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".pth") and TRAINING_CHECKPOINT_NAME.match(f[:-4]))


class CheckpointMismatchError(ValueError):
    """A checkpoint left parameters of the model missing or with other shapes (``on_mismatch="error"``), or
    its normalization statistics are missing or non-finite (``on_bad_stats="error"``)."""


def _optional_keys(model: nn.Module) -> List[str]:
    """State keys a checkpoint may lack because their layer documents a meaningful initial value
    (:attr:`D2NormModule.optional_state`)."""
    return [f"{mname}.{p}" if mname else p for mname, m in model.named_modules()
            for p in getattr(m, "optional_state", ())]


def _by_kind(keys) -> str:
    """``"alpha_logit (20 layers), beta_logit (20 layers)"``: parameter names with their layer counts."""
    counts: Dict[str, int] = {}
    for k in keys:
        leaf = k.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{leaf} ({n} layer{'s' if n > 1 else ''})" for leaf, n in counts.items())


def _layers_of(keys) -> List[str]:
    return list(dict.fromkeys(k.rsplit(".", 1)[0] if "." in k else "(model)" for k in keys))


def check_loaded_statistics(model: nn.Module, unloaded: List[str], policy: str, source: str) -> None:
    """After a load: population statistics the checkpoint did not hold (``unloaded``: keys from
    :func:`report_unloaded_statistics`, which already warned) or that hold a NaN/Inf. Non-finite ones are
    always a warning naming the layers; with ``policy="error"`` (evaluation: ``--eval-only``) both are a
    :class:`CheckpointMismatchError` — such layers would normalize with their initial values (e.g. MABN's
    χ̂ = 1 from a BN checkpoint, whose BN statistics do not map onto MABN's uncentred, weight-centralized
    inputs, mabn §4.2) or make every output NaN ("No predictions from the model!")."""
    bad = nonfinite_statistics(model)
    if bad:
        what = "; ".join(f"{n}: {', '.join(b)}" for n, b in list(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
        msg = f"non-finite (NaN/Inf) statistics in {len(bad)} layer(s) after loading {source}: {what}"
        if policy == "error":
            raise CheckpointMismatchError(
                f"{msg}. Evaluating with them gives NaN outputs. Recompute the statistics (tools/"
                f"recompute_bn_stats.py, PreciseBN) or load another checkpoint.")
        logger.warning("%s", msg)
    if unloaded and policy == "error":
        layers = _layers_of(unloaded)
        raise CheckpointMismatchError(
            f"checkpoint {source} has no population statistics for {len(layers)} normalization layer(s) "
            f"(e.g. {', '.join(unloaded[:3])}): evaluated, they would normalize with their initial values. Is it a "
            f"checkpoint of another norm (e.g. BN into MABN)? Recompute the statistics on training data first "
            f"(tools/recompute_bn_stats.py, PreciseBN), or evaluate with the norm it was trained with."
        )


@dataclass
class ParameterLoadReport:
    """What a checkpoint gave the model's parameters (buffers are the layers' business: e.g. FrozenBN lacks
    ``num_batches_tracked``). ``optional``: parameters the checkpoint may lack because their layer documents a
    meaningful initial value (:attr:`D2NormModule.optional_state`, e.g. EvalNorm's α̂, β̂ from a BN checkpoint)."""

    total: int
    missing: List[str]
    mismatched: List[str]
    unused: List[str]
    optional: List[str]

    @classmethod
    def of(cls, model: nn.Module, incompatible) -> "ParameterLoadReport":
        params = [n for n, _ in model.named_parameters()]
        names = set(params)
        optional = set(_optional_keys(model))
        missing = [k for k in incompatible.missing_keys if k in names]
        mismatched = [k for k, *_ in incompatible.incorrect_shapes if k in names]
        return cls(len(params), [k for k in missing if k not in optional], mismatched,
                   list(incompatible.unexpected_keys), [k for k in missing if k in optional])

    @property
    def loaded(self) -> int:
        return self.total - len(self.missing) - len(self.mismatched) - len(self.optional)

    def summary(self) -> str:
        def by_part(keys):
            parts: Dict[str, int] = {}
            for k in keys:
                parts[k.split(".")[0]] = parts.get(k.split(".")[0], 0) + 1
            return ", ".join(f"{p}: {n}" for p, n in parts.items())

        s = (f"{self.loaded} of {self.total} parameter tensors of the model loaded; "
             f"{len(self.missing)} not in the checkpoint ({by_part(self.missing) or '-'}), "
             f"{len(self.mismatched)} with another shape ({by_part(self.mismatched) or '-'}); "
             f"{len(self.unused)} checkpoint entries unused by the model ({by_part(self.unused) or '-'})")
        if self.optional:
            s += f"; {len(self.optional)} optional ones kept at their initial value ({by_part(self.optional)})"
        return s

    def check(self, policy: str, source: str) -> None:
        bad = len(self.missing) + len(self.mismatched)
        if not bad:
            return
        if policy == "error":
            raise CheckpointMismatchError(
                f"checkpoint {source} does not fit this model: {self.summary()}. Is it the checkpoint of another "
                f"architecture or config? These parameters would keep their random initialization."
            )
        most = self.loaded * 2 < self.total
        bar = "=" * 100
        logger.warning(
            "\n%s\n%s: %s.\n%s\n%s",
            bar,
            "MOST OF THE MODEL WAS NOT LOADED from " + str(source) if most else f"Loading {source}",
            self.summary(),
            "Is this the checkpoint of another architecture? The parameters not loaded start from their "
            "initialization (expected when fine-tuning, e.g. from ImageNet weights).",
            bar,
        )


# ---- writing -------------------------------------------------------------------------------------------------
# What fvcore's Checkpointer lacks: its save() and tag_last_checkpoint() open the target file itself for
# writing, so a crash, a kill or a full disk mid-write leaves a truncated .pth or an empty last_checkpoint
# behind, on which --resume then stops. Here every file is written to a temporary name in the same folder,
# flushed to disk and renamed over the target (os.replace is atomic on POSIX and Windows).
def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temporary file next to ``path``, then rename it to ``path`` (local paths)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class NonFiniteCheckpointError(ValueError):
    """A checkpoint would be written with non-finite (NaN/Inf) statistics and the policy is ``"error"``."""


def write_checkpoint(model: nn.Module, path: str, *, on_nonfinite: str = "warn", **extra) -> Dict[str, List[str]]:
    """Write ``{"model": model.state_dict(), **extra}`` to ``path`` atomically (:func:`atomic_write`).

    A model whose buffers (the normalization statistics) hold a NaN/Inf is never written silently:
    ``on_nonfinite="error"`` refuses (:class:`NonFiniteCheckpointError` naming the layers); ``"warn"`` writes it
    with a warning naming the layers and records them under ``"nonfinite_statistics"`` in the checkpoint (a
    training run keeps its checkpoint, to be inspected or resumed). Returns the non-finite buffers found.
    """
    if on_nonfinite not in ("error", "warn"):
        raise ValueError(f"on_nonfinite must be 'error' or 'warn', got {on_nonfinite!r}")
    bad = nonfinite_statistics(model)
    data = {"model": model.state_dict(), **extra}
    if bad:
        what = (f"non-finite (NaN/Inf) statistics in {len(bad)} module(s): "
                + "; ".join(f"{n}: {', '.join(b)}" for n, b in list(bad.items())[:5])
                + (" ..." if len(bad) > 5 else ""))
        if on_nonfinite == "error":
            raise NonFiniteCheckpointError(f"refusing to write {path}: {what}")
        logger.warning("Checkpoint %s is written with %s (recorded under 'nonfinite_statistics')", path, what)
        data["nonfinite_statistics"] = bad
    atomic_write(path, lambda f: torch.save(data, f))
    return bad

def unloaded_statistics(model: nn.Module, loaded_keys) -> Dict[str, List[str]]:
    """``{layer name: [buffer names]}``: the population statistics (``running_*`` buffers: BN family, FrozenBN,
    DomainBN, EvalNorm, BGN, MABN's ``running_chi``) of every layer of ``model`` that ``loaded_keys`` (the keys of
    a checkpoint's model state) does not hold."""
    out: Dict[str, List[str]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        miss = [b for b, v in m._buffers.items()
                if v is not None and b.startswith("running_") and prefix + b not in loaded_keys]
        if miss:
            out[name] = miss
    return out


def report_unloaded_statistics(model: nn.Module, loaded_keys, missing_keys: List[str], author=None) -> List[str]:
    """Make a load that leaves normalization layers without statistics loud: a warning naming the layers, and
    their keys appended to ``missing_keys`` (fvcore's checkpointer prints that list as its "not found in the
    checkpoint" report). Needed because detectron2's ``FrozenBatchNorm2d`` fills a missing ``running_mean`` /
    ``running_var`` with 0 / 1 without a report for checkpoints without version metadata (converted ``.pkl``
    files), so a layer that was GN/IN in the checkpoint (e.g. the XBNBlock authors' GN stem) silently stops
    normalizing. Caffe2 checkpoints (``__author__`` "Caffe2", detectron2's ImageNet ``R-50.pkl``) fold the
    statistics into the affine by convention: logged at INFO only. Returns the keys added."""
    per_layer = unloaded_statistics(model, loaded_keys)
    keys = [f"{n}.{b}" if n else b for n, bs in per_layer.items() for b in bs]
    if not keys:
        return []
    what = "; ".join(f"{n or '(model)'}: {', '.join(bs)}" for n, bs in list(per_layer.items())[:8])
    what += " ..." if len(per_layer) > 8 else ""
    if author == "Caffe2":
        logger.info("Checkpoint (Caffe2) has no statistics for %d normalization layer(s) (folded into the affine "
                    "by convention): %s", len(per_layer), what)
        return []
    logger.warning(
        "The checkpoint has no population statistics for %d normalization layer(s); they keep their current "
        "values (a FrozenBN keeps mean 0 / var 1 and no longer normalizes). If the checkpoint's layer there was "
        "GN/IN, build the model with the same norm (e.g. D2NORM.XBNBLOCK.STEM_NORM). Layers: %s",
        len(per_layer), what,
    )
    added = [k for k in keys if k not in missing_keys]
    missing_keys.extend(added)
    return added
