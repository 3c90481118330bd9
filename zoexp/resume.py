"""Checkpoints, exact resume and preemption.

Every ``run.checkpoint_every`` steps (and when a preemption signal arrives) the runner saves what it
needs to continue the identical trajectory into the run directory::

    checkpoints/step-00000040/
        model.safetensors      the parameters the optimizer trains (all of them for full fine-tuning,
                               only the adapters for LoRA): the rest of the model is reloaded as at start
        optimizer.safetensors  Optimizer.state_dict(): step seeds and counters, Hessians, bandit
                               distribution, U/V seeds, first-order moments, ... (tensors + JSON)
        trainer.safetensors    step, sampler position, scheduler, counters and curves, best-dev
                               bookkeeping, RNG states of every rank
        best.safetensors       the best-by-dev weights so far (when the run keeps them)
        manifest.json          sizes and CRC-32 of the files above and the config fingerprint;
                               written last, so a directory without a valid manifest is incomplete
    result.json                the final row, once the run has finished

A checkpoint is written into ``step-N.tmp/`` and renamed into place (atomic on POSIX); on resume
every file is checked against the manifest, and a corrupt or partial checkpoint is skipped in
favour of the previous one. ``run.resume=auto`` (default) continues the newest valid checkpoint
of the run directory, which is stable when ``run.name`` is set; ``run.resume=<dir>`` continues the
run in ``<dir>`` (a run directory or one checkpoint directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from zoexp.checkpoint import (
    file_crc32,
    load_into,
    load_tensors,
    load_tree,
    read_header,
    save_tensors,
    save_tree,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RESULT = "result.json"

# Keys that say where or how a run executes, not what it computes: changing them between a run and
# its continuation is allowed (everything else must match the checkpoint's config exactly).
PLACEMENT_KEYS = {
    "data_dir", "results_dir", "experiment_name",
    "run.resume", "run.name", "run.dir", "run.progress", "run.results_file", "run.device",
    "run.checkpoint_every", "run.checkpoint_keep", "run.keep_checkpoints",
    "run.distributed", "run.dist_backend", "run.dist_timeout_min", "run.eval_batch_size",
    "model.device_map", "model.max_memory", "method.noise_threads", "run.save_predictions", "run.test_final",
    "run.dry_run", "run.memory_check", "model.architecture",  # zoexp.memory: prediction, not trajectory
}


class ResumeError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised by the runner after it saved a checkpoint because a preemption signal arrived."""

    def __init__(self, signum: int | None, step: int | None, checkpoint: Path | None,
                 where: str = "before training", saved: str | None = None):
        name = signal.Signals(signum).name if signum else "a preemption signal"
        where = f"at step {step}" if step is not None else where
        saved = saved or (f"checkpoint {checkpoint}" if checkpoint else "no checkpoint")
        super().__init__(f"received {name} {where}; {saved}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# --------------------------------------------------------------------------- signals


class PreemptionGuard:
    """SIGTERM / SIGINT / SIGUSR2 (SLURM and submitit's pre-timeout signal) handling.

    While ``armed`` (the training loop, the test evaluation) a first signal only sets ``requested``
    and says what the run finishes first: the current step (then a checkpoint and a ``preempted``
    row), or the test evaluation (its row is the result; the runner stops after writing it). Outside
    it, or at a second signal, it interrupts at once (SIGINT as KeyboardInterrupt), naming the phase
    it stopped in. ``chain()`` then calls the handler that was installed before (e.g. submitit's
    requeue on SIGUSR2).
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                                getattr(signal, "SIGUSR2", None)) if s is not None)

    def __init__(self):
        self.signum: int | None = None
        self._armed = False
        self._previous: dict[int, object] = {}  # kept after exit, for chain()
        self._installed = False
        self.phase = "while setting up"  # where an immediate stop happened, for its message
        self.deferred_phase: str | None = None  # where the first, deferred signal arrived

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._installed = False

    @contextmanager
    def armed(self, phase: str = "training", first: str = "saving a checkpoint after this step") -> Iterator[None]:
        """Defer a first signal while ``phase`` runs; ``first`` says what the run does before it stops."""
        self._armed, self.phase, self._first = True, f"during {phase}", first
        try:
            yield
        finally:
            self._armed, self.phase = False, f"after {phase}"

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self._armed:
            self.deferred_phase = self.phase
            log.warning("received %s %s: %s, then stopping (send it again to stop at once)",
                        signal.Signals(signum).name, self.phase, self._first)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Preempted(signum, None, None, where=self.phase)

    def chain(self) -> None:
        """Call the previously installed Python handler of the signal received (submitit requeues the
        job on SIGUSR2); Python's default SIGINT handler and SIG_DFL/SIG_IGN are not chained."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


# --------------------------------------------------------------------------- run state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_params(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """The parameters the optimizer owns, by their qualified names: the part of the model training
    changes (a LoRA method owns only its adapters, full fine-tuning owns every block)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                out[names.get(id(p), f"param_groups.{gi}.{pi}")] = p
    return out


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def run_identity(cfg: DictConfig) -> dict:
    """The config keys that determine a run's trajectory (dotted), without the placement keys."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items()
            if k not in PLACEMENT_KEYS and not k.startswith(("hydra.", "logger."))}


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def verify(path: Path) -> dict:
    """The manifest of checkpoint ``path`` if every file it lists is there, of the right size and
    CRC-32; raises ``ResumeError`` saying what is wrong otherwise."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path}: no readable manifest ({exc})") from None
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ResumeError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise ResumeError(f"{path}: {name} has {size} bytes, the manifest says {info['bytes']}")
        if file_crc32(file) != info["crc32"]:
            raise ResumeError(f"{path}: {name} is corrupt (CRC-32 mismatch)")
        if name.endswith(".safetensors"):
            _check_layout(path, name, file, size)
    return manifest


def _check_layout(path: Path, name: str, file: Path, size: int) -> None:
    """A safetensors file's header must parse and every tensor must lie inside the file: a header forged
    to match re-forged CRCs is a corrupt checkpoint (skipped for the previous one), not a crash."""
    try:
        header, start = read_header(file)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            a, b = (int(x) for x in info["data_offsets"])
            if not 0 <= a <= b or start + b > size:
                raise ValueError(f"{key} lies outside the file")
        if name in ("optimizer.safetensors", "trainer.safetensors") and \
                "zoexp.tree" not in (header.get("__metadata__") or {}):
            raise ValueError("no zoexp.tree metadata")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResumeError(f"{path}: {name} is corrupt ({exc})") from None


def latest_valid(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies, and the reasons newer ones were skipped."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None, []
    found = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True)
    skipped = []
    for path in found:
        try:
            verify(path)
            return path, skipped
        except ResumeError as exc:
            skipped.append(str(exc))
            log.warning("skipping checkpoint: %s", exc)
    return None, skipped


class Checkpointer:
    """Saves and restores the run state under ``<run_dir>/checkpoints`` (see the module docstring).

    Only the main process writes (data-parallel replicas are identical); every process reads.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, dist):
        self.root = Path(run_dir) / CHECKPOINTS
        self.every = int(cfg.run.get("checkpoint_every") or 0)
        self.keep = max(1, int(cfg.run.get("checkpoint_keep") or 2))
        self.identity = run_identity(cfg)
        self.fingerprint = fingerprint(self.identity)
        self.dist = dist
        self.saved_bytes = 0
        self.saves = 0

    def due(self, step: int, steps: int) -> bool:
        """Periodic checkpoint after ``step`` (also after the last step, so the test eval can be resumed)."""
        return self.every > 0 and (step % self.every == 0 or step == steps)

    def next_due(self, step: int, steps: int) -> int:
        return min(steps, (step // self.every + 1) * self.every) if self.every > 0 else steps

    def save(self, step: int, model, optimizer, trainer: dict, keeper) -> Path:
        """Write a checkpoint of the state after ``step``; returns its directory (on every rank)."""
        trainer = dict(trainer, rng=self.dist.all_gather(rng_state()), world_size=self.dist.world_size)
        final = self.root / f"step-{step:08d}"
        if self.dist.is_main:
            t0 = time.perf_counter()
            self._write(final, step, model, optimizer, trainer, keeper)
            log.info("checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
        self.dist.barrier()
        return final

    def _write(self, final: Path, step: int, model, optimizer, trainer: dict, keeper) -> None:
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        files = {
            "model.safetensors": save_tensors(tmp / "model.safetensors", trained_params(model, optimizer),
                                              metadata={"step": step, "format": "pt"}),
            "optimizer.safetensors": save_tree(tmp / "optimizer.safetensors", optimizer.state_dict()),
            "trainer.safetensors": save_tree(tmp / "trainer.safetensors", trainer),
        }
        best = keeper.export_to(tmp / "best.safetensors") if keeper is not None else None
        if best is not None:
            files["best.safetensors"] = best
        manifest = {
            "step": step,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "crc32": crc} for name, crc in files.items()},
            "fingerprint": self.fingerprint,
            "config": self.identity,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(tmp / "manifest.json.part", "w") as fh:
            json.dump(manifest, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp / "manifest.json.part", tmp / "manifest.json")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a preemption right after a periodic save)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self.saves += 1
        self.saved_bytes = sum(info["bytes"] for info in manifest["files"].values())
        self._prune()

    def _prune(self) -> None:
        found = sorted((p for p in self.root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
        for path in found[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def restore(self, path: Path, model, optimizer, keeper) -> dict:
        """Load checkpoint ``path`` into the model (trained parameters), the optimizer and the best-weights
        keeper; returns the trainer state (RNG already restored for this rank)."""
        load_into(path / "model.safetensors", trained_params(model, optimizer))
        optimizer.load_state_dict(load_tree(path / "optimizer.safetensors"))
        trainer = load_tree(path / "trainer.safetensors")
        if keeper is not None:
            keeper.import_from(path / "best.safetensors")
        rngs = trainer.pop("rng")
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        if self.dist.is_main:  # checkpoints after this one belong to the abandoned continuation
            step = _step_of(path)
            for other in self.root.iterdir():
                s = _step_of(other)
                if other != path and (s is None or s > step) and other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
        self.dist.barrier()
        return trainer


# --------------------------------------------------------------------------- where a run continues


@dataclass
class ResumePoint:
    """Where a run starts: its directory, a checkpoint to continue (None: from the beginning), or the row of
    a run that already finished there; ``skipped`` names corrupt checkpoints passed over."""

    run_dir: Path
    checkpoint: Path | None = None
    finished: dict | None = None
    skipped: tuple[str, ...] = ()


def resume_mode(cfg: DictConfig) -> str:
    value = cfg.run.get("resume", "auto")
    if value in (None, False) or str(value).lower() in ("never", "none", "false", "null", ""):
        return "never"
    return str(value)


def resume_point(cfg: DictConfig, run_dir: Path, dist) -> ResumePoint:
    """Decide (on the main process, shared with all) which directory this run uses and what it continues."""
    decision = None
    if dist.is_main:
        try:
            lock_run_dir(Path(run_dir))
            decision = ("ok", _resume_point(cfg, Path(run_dir)))
        except ResumeError as exc:
            decision = ("error", str(exc))
    kind, value = dist.broadcast(decision)
    if kind == "error":
        raise ResumeError(value)
    return value


def _resume_point(cfg: DictConfig, run_dir: Path) -> ResumePoint:
    mode = resume_mode(cfg)
    explicit = None
    if mode not in ("auto", "never"):
        target = Path(mode).expanduser()
        if (target / "manifest.json").exists() or _step_of(target) is not None:
            explicit, run_dir = target, target.parent.parent
        elif target.is_dir():
            run_dir = target
        else:
            raise ResumeError(f"run.resume={mode}: no such run or checkpoint directory")
    result = run_dir / RESULT
    if explicit is None and result.is_file():
        try:
            row = json.loads(result.read_text())
        except ValueError:
            row = {}
        same = row.get("config_fingerprint") == fingerprint(run_identity(cfg))
        if not same:  # never overwrite another run's result and config
            raise ResumeError(f"{run_dir} holds the result of another configuration{_differences(run_dir, cfg)}; "
                              "choose another run.name (or remove that directory)")
        if row.get("status") in ("ok", "diverged"):
            if mode == "never":
                raise ResumeError(f"{run_dir} holds a finished run of this configuration and run.resume=never "
                                  "would overwrite it; choose another run.name, or run.resume=auto to get its row")
            return ResumePoint(run_dir, finished=row)
    if explicit is not None:
        verify(explicit)
        latest, skipped = explicit, []
    else:
        latest, skipped = latest_valid(run_dir)
    if latest is None:
        if mode not in ("auto", "never"):
            raise ResumeError(f"run.resume={mode}: no valid checkpoint in {run_dir / CHECKPOINTS}"
                              + (f" ({'; '.join(skipped)})" if skipped else ""))
        return ResumePoint(run_dir, skipped=tuple(skipped))
    if mode == "never":
        raise ResumeError(f"{run_dir} already holds checkpoints of an earlier run; continue it with "
                          "run.resume=auto, or choose another run.name / run directory")
    manifest = json.loads((latest / "manifest.json").read_text())
    identity = run_identity(cfg)
    if manifest.get("fingerprint") != fingerprint(identity):
        saved = manifest.get("config", {})
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in diff[:8])
        raise ResumeError(f"checkpoint {latest} was made by a different configuration ({shown}); "
                          "resume with the same settings, or start a new run (another run.name)")
    return ResumePoint(run_dir, checkpoint=latest, skipped=tuple(skipped))


def _differences(run_dir: Path, cfg: DictConfig) -> str:
    """`` (a: x -> y, ...)``: the keys where the config saved in ``run_dir/.hydra`` differs from ``cfg``."""
    saved_path = Path(run_dir) / ".hydra" / "config.yaml"
    try:
        saved = run_identity(OmegaConf.load(saved_path))
    except Exception:  # no saved config, or one that no longer resolves
        return ""
    identity = run_identity(cfg)
    diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if not diff:
        return ""
    return " (" + ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in diff[:8]) + \
        (", ..." if len(diff) > 8 else "") + ")"


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Raise ``ResumeError`` if ``run_dir`` holds a run this config may not continue or overwrite (the
    checks of ``resume_point``, done before Hydra writes into the directory; see zoexp.validate.PreRunChecks)."""
    run_dir = Path(run_dir)
    if (run_dir / ".hydra" / "config.yaml").is_file() and resume_mode(cfg) in ("auto", "never"):
        diff = _differences(run_dir, cfg)
        if diff:  # e.g. a run that failed before writing result.json: its config is still its own
            raise ResumeError(f"{run_dir} holds a run of another configuration{diff}; "
                              "choose another run.name (or remove that directory)")
    if run_dir.is_dir() or resume_mode(cfg) not in ("auto", "never"):
        _resume_point(cfg, run_dir)


_LOCKS: dict[str, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on ``run_dir`` for this process's run: two launches with the same run.name at
    the same time would write the same files. Raises ``ResumeError`` if another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _LOCKS:
        return
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ResumeError(f"{run_dir} is in use by another zoexp run (pid {holder}); wait for it to finish, "
                          "or choose another run.name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        (Path(run_dir) / ".lock").unlink(missing_ok=True)
        os.close(fd)


def write_result(run_dir: Path, row: dict) -> None:
    """The final row, beside the checkpoints: a re-launched finished run (run.resume=auto) returns it."""
    from zoexp.results import _clean

    path = Path(run_dir) / RESULT
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(_clean(row), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_best(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]
