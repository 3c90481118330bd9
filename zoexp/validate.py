"""Checks of a composed config before any data or model is loaded, and the exit codes of ``zoexp``.

``check_config(cfg)`` raises ``ConfigError`` (a ``ValueError``) with one line that names the key, the
value and what to do; the command line prints it and exits with code 2 (a user error: no row, no
traceback). ``check_results_file`` makes sure the row can be appended before an hour of training.

Exit codes (docs/errors.md): a shell loop or a cluster scheduler tells the outcomes apart by them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from zoexp.paths import conf_dir

EXIT_OK = 0  # the run finished; its row says ok
EXIT_FAILED = 1  # the run crashed while running (a `failed` row and a traceback)
EXIT_USER_ERROR = 2  # a bad value, missing data or model, a refused run directory: no row, one line
EXIT_DIVERGED = 3  # the loss became non-finite; the row says diverged (its metrics are of the last good weights)
# preempted: 128 + the signal number (143 for SIGTERM, 140 for SIGUSR2); interrupted (SIGINT): 130


class ConfigError(ValueError):
    """A value of the composed config that cannot work (a user error)."""


class UserError(ValueError):
    """A run that cannot start as configured (bad value, missing data, refused directory): exit code 2, no row."""


_CHOICES = {
    "run.dtype": ("fp32", "fp16", "bf16"),
    "run.keep_best": ("disk", "memory", "none"),
    "run.lr_schedule": ("constant", "linear"),
    "run.loss": ("lm", "classification", "auto"),
}
# (key, smallest value allowed, what the value means)
_BOUNDS = [
    ("run.steps", 0, "optimizer steps"),
    ("run.batch_size", 1, "training examples per step"),
    ("run.eval_batch_size", 1, "sequences per evaluation forward pass"),
    ("run.eval_every", 0, "steps between dev evaluations (0 = only at the end)"),
    ("run.log_every", 1, "steps per point of the loss curve"),
    ("run.checkpoint_every", 0, "steps between checkpoints (0 = only on a signal)"),
    ("run.checkpoint_keep", 1, "checkpoints kept"),
    ("run.offload_ring", 1, "device buffers of the offload ring"),
    ("task.num_train", 0, "training examples sampled"),
    ("task.num_dev", 0, "dev examples sampled"),
    ("task.num_test", 1, "test examples sampled (a run needs a test set)"),
]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fail(key: str, value, what: str) -> None:
    raise ConfigError(f"{key}={_show(value)}: {what}")


def _show(value) -> str:
    return "null" if value is None else str(value)


def _method_defaults(name: str | None) -> dict:
    """The shipped YAML of method ``name`` (its defaults say which hyperparameters are numbers)."""
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.get("name") == name:
            return OmegaConf.to_container(node, resolve=False)
    return {}


def _check_types(prefix: str, node: DictConfig, defaults: dict) -> None:
    """A value whose shipped default is a number must be a number (``method.lr=abc`` is not)."""
    for key, default in defaults.items():
        if key not in node or not _is_number(default):
            continue
        value = node.get(key)
        if value is None or _is_number(value):
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"{prefix}.{key}", value, "must be a finite number")
            continue
        kind = "an integer" if isinstance(default, int) else "a number"
        _fail(f"{prefix}.{key}", value, f"must be {kind} (default {default}), e.g. {prefix}.{key}={default}")


def check_config(cfg: DictConfig, device: bool = True) -> None:
    """Raise ``ConfigError`` for the first value that cannot work; see the module docstring."""
    run, task, method = cfg.get("run"), cfg.get("task"), cfg.get("method")
    if run is None or task is None or method is None:
        raise ConfigError("the config needs run, task and method groups (compose it with zoexp's conf/)")
    _check_types("run", run, OmegaConf.to_container(OmegaConf.load(conf_dir() / "run" / "default.yaml"),
                                                    resolve=False))
    _check_types("method", method, _method_defaults(method.get("name")))
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in choices:
            _fail(key, value, f"choose one of {', '.join(choices)}")
    for key, low, what in _BOUNDS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(key, value, f"must be an integer >= {low} ({what})")
        if value < low:
            _fail(key, value, f"must be >= {low} ({what})")
    trains = method.get("_target_") is not None
    if trains and task.get("num_train") == 0 and not task.get("k_shot"):
        _fail("task.num_train", 0, f"method={method.get('name')} trains: it needs training examples "
                                   "(or choose method=zero-shot)")
    lr = method.get("lr")
    if _is_number(lr) and lr < 0:
        _fail("method.lr", lr, "must be >= 0")
    if device:
        _check_device(str(run.get("device", "auto")))


def check_active_blocks(method: DictConfig, optimizer) -> None:
    """``method.active_blocks`` must not exceed the model's transformer blocks (a block-coordinate method
    may cap k itself, e.g. on a toy; from a config, the row would say k while fewer blocks trained)."""
    k = method.get("active_blocks")
    if optimizer is None or not isinstance(k, int) or isinstance(k, bool):
        return
    blocks = sum(1 for g in optimizer.param_groups if g.get("role") == "block")
    if blocks and k > blocks:
        _fail("method.active_blocks", k, f"{method.get('name')} on this model has only {blocks} transformer "
                                         f"blocks; choose method.active_blocks between 1 and {blocks}")


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        _fail("run.device", name, "choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _fail("run.device", name, "no CUDA device is visible on this machine; use run.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail("run.device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_results_file(path: str | os.PathLike | None) -> None:
    """Fail now, not after training, if the results file cannot be appended to (a directory, read-only).
    Creates nothing: a run refused later leaves no folder or empty file behind."""
    if not path:
        return
    path = Path(path)
    problem = None
    if path.is_dir():
        problem = "Is a directory"
    elif path.exists():
        if not os.access(path, os.W_OK):
            problem = "Permission denied"
    else:  # the nearest existing folder above must let the runner create the rest
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            problem = f"{parent} is not a directory"
        elif not os.access(parent, os.W_OK | os.X_OK):
            problem = f"Permission denied ({parent})"
    if problem:
        raise ConfigError(f"run.results_file={path}: cannot append a row ({problem}); "
                          "choose a writable file with run.results_file=... or results_dir=...")


# --------------------------------------------------------------------------- run directories


def claim_dir(path: str | os.PathLike) -> str:
    """Create ``path`` exclusively (``path-2``, ``path-3``, ... when it exists) and return the one made:
    runs launched in the same second never share a timestamped directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def run_dir(root: str, name, stamp: str) -> str:
    """``hydra.run.dir`` / ``hydra.sweep.dir``: ``root/name`` when ``run.name`` is set (stable: a re-launch
    resumes there), else ``root/stamp``. Pure (Hydra resolves it while it merges configs, too); the
    timestamped directory is created exclusively by ``PreRunChecks`` before Hydra uses it."""
    if name is not None and str(name) != "":
        return f"{root}/{name}"
    return f"{root}/{stamp}"


def setup_errors() -> tuple[type[BaseException], ...]:
    """Errors that, raised while a run is being set up (before its first step), are the user's: a
    ``ValueError`` from a method's or a loader's own checks of its arguments counts with them."""
    from zoexp.models import ModelLoadError
    from zoexp.resume import ResumeError
    from zoexp.tasks import DataError

    return (ValueError, ModelLoadError, DataError, ResumeError)


# --------------------------------------------------------------------------- before Hydra touches the run directory


def job_config(config: DictConfig) -> DictConfig:
    """The job's part of Hydra's full config (what the runner receives: everything but ``hydra``)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def _refuse(exc: BaseException) -> None:
    import sys

    print(f"zoexp: error: {exc}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class PreRunChecks(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a single run's config is checked when it
    is composed, before Hydra creates the run directory or writes ``.hydra/`` into it; a bad value, an
    unwritable results file, or a ``run.name`` directory that holds another configuration's run ends the
    command with one line and exit code 2, leaving the earlier run's files untouched."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from zoexp.resume import ResumeError, check_run_dir

        job = job_config(config)
        if job.get("bench") is not None:  # zoexp-bench composes this config too; it writes no run rows
            return
        named = job.run.get("name") is not None
        try:
            check_config(job)
            check_results_file(job.run.get("results_file"))
            if named:  # a stable directory may hold an earlier run: the same configuration, or refused
                check_run_dir(job, Path(str(config.hydra.run.dir)))
        except (ConfigError, ResumeError) as exc:
            _refuse(exc)
        if not named:  # a timestamped directory: claimed for this run alone (another run may hold the stamp)
            _claim(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        job = job_config(config)
        if OmegaConf.select(config, "hydra.sweeper.dry_run", default=False):  # lists the jobs, writes nothing
            return
        if job.get("bench") is None and job.get("run") is not None and job.run.get("name") is None:
            _claim(config, "sweep")


def _claim(config: DictConfig, mode: str) -> None:
    """Create ``hydra.<mode>.dir`` exclusively; if another run took it (the same second), use the next
    free name, for Hydra and -- through the hydra overrides every job of a sweep is composed from -- for
    every job."""
    from omegaconf import open_dict, read_write

    wanted = str(OmegaConf.select(config, f"hydra.{mode}.dir"))
    claimed = claim_dir(wanted)
    if claimed == wanted:
        return
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra[mode].dir = claimed
        if mode == "sweep":
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{claimed}'")


