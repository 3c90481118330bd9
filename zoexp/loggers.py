"""Streaming training metrics: ``metrics.csv`` in every run directory, plus TensorBoard or W&B on request.

    zoexp run.log_every=10                         # metrics.csv only (logger=csv, the default)
    zoexp logger=tensorboard                       # + <run dir>/tensorboard (pip install 'zoexp[logging]')
    zoexp logger=wandb logger.project=my-zo        # + a W&B run, offline by default (wandb sync later)

Every ``run.log_every`` steps one line is appended to ``metrics.csv`` and flushed, so ``tail -f`` (or
pandas) sees a 20k-step run while it goes: the mean training loss since the previous line, the
learning rate, the last step's projected gradient (ZO methods), the forward passes and tokens so far,
the training and wall-clock seconds so far, and the memory peak of the current training segment (host
RSS; CUDA allocated on a GPU). With the progress bar off (``run.progress=false``, sweeps) the same
numbers go to the log as one line per ``log_every`` steps. Only rank 0 of a data-parallel run writes.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from pathlib import Path

import torch

from zoexp.measure import _status_field

log = logging.getLogger(__name__)

FILE = "metrics.csv"
COLUMNS = ("step", "loss", "lr", "proj_grad", "forward_passes", "tokens", "train_time_s", "elapsed_s",
           "rss_peak_bytes", "gpu_allocated_peak_bytes")
BACKENDS = ("csv", "tensorboard", "wandb")


class LoggerError(RuntimeError):
    """A logger that cannot start (missing package, unknown backend): said in one line, before training."""


def learning_rate(optimizer) -> float | None:
    """The rate of the first transformer-block group (FOCUS may give embeddings/head another), else group 0."""
    groups = optimizer.param_groups
    if not groups:
        return None
    group = next((g for g in groups if g.get("role") == "block" and not g.get("fo")), groups[0])
    return float(group["lr"])


def memory_peaks(device: torch.device) -> tuple[int, int | None]:
    """(host RSS high-water mark, CUDA peak allocated or None), both since the current phase began."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = int(torch.cuda.max_memory_allocated(device))
    return _status_field("VmHWM"), gpu


class MetricsLogger:
    """Writes ``metrics.csv`` (always) and forwards the same scalars to an optional backend.

    ``cfg`` is the ``logger`` config node (``backend``: csv | tensorboard | wandb, and the backend's
    options); ``run_config`` the resolved run config (W&B records it). ``resume_step``: a resumed run keeps
    the lines up to its checkpoint's step and drops those a preempted run wrote after it.
    """

    def __init__(self, run_dir: str | Path, cfg=None, run_config: dict | None = None, enabled: bool = True,
                 console: bool = False, total_steps: int | None = None):
        self.enabled, self.console, self.total_steps = enabled, console, total_steps
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FILE
        self.backend_name = str((cfg or {}).get("backend", "csv"))
        if self.backend_name not in BACKENDS:
            raise LoggerError(f"logger.backend must be one of {', '.join(BACKENDS)}, not {self.backend_name!r}")
        self._t0 = time.perf_counter()
        self._fh = None
        self._writer = None
        # the backend starts now, so a missing package stops the run before any training
        self._backend = _make_backend(self.backend_name, cfg or {}, self.run_dir, run_config or {}) if enabled else None

    def start(self, resume_step: int = 0) -> None:
        """Open ``metrics.csv``: a fresh file, or (resumed at ``resume_step``) the lines up to that step."""
        if not self.enabled or self._fh is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._kept_lines(resume_step) if resume_step else []
        self._fh = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._fh.flush()

    @contextlib.contextmanager
    def closed_on_error(self):
        """Close the file and finish the backend's run if the block raises (then re-raise)."""
        try:
            yield self
        except BaseException:
            self.close()
            raise

    def _kept_lines(self, step: int) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= step]

    def log_train(self, step: int, values: dict) -> None:
        """One line of training metrics at ``step`` (keys from ``COLUMNS``; others go to the backend only)."""
        if not self.enabled:
            return
        self.start()
        line = {"step": step, "elapsed_s": time.perf_counter() - self._t0, **values}
        self._writer.writerow({k: _fmt(v) for k, v in line.items()})
        self._fh.flush()
        if self._backend is not None:
            self._backend.log({f"train/{k}": v for k, v in line.items() if k != "step" and _number(v)}, step)
        if self.console:
            of = f"/{self.total_steps}" if self.total_steps else ""
            extra = "".join(f"  {name} {line[key]:.3g}" for key, name in (("lr", "lr"), ("proj_grad", "proj_grad"))
                            if _number(line.get(key)))
            per_step = line.get("train_time_s", 0.0) / max(step, 1)
            log.info("step %d%s  loss %.4f%s  %.2f s/step", step, of, float(line.get("loss", math.nan)), extra,
                     per_step)

    def log_eval(self, step: int, split: str, metrics: dict) -> None:
        """Dev/test metrics go to the backend (metrics.csv holds training lines; the row holds the evals)."""
        if self.enabled and self._backend is not None:
            self._backend.log({f"{split}/{k}": v for k, v in metrics.items() if _number(v)}, step)

    def close(self, summary: dict | None = None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._backend is not None:
            self._backend.close({k: v for k, v in (summary or {}).items() if _number(v)})
            self._backend = None


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return "" if v is None else v


def _make_backend(name: str, cfg, run_dir: Path, run_config: dict):
    if name == "csv":
        return None
    if name == "tensorboard":
        return _TensorBoard(run_dir / str(cfg.get("subdir") or "tensorboard"))
    return _WandB(cfg, run_dir, run_config)


class _TensorBoard:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise LoggerError("logger=tensorboard needs the tensorboard package: pip install 'zoexp[logging]' "
                              "(or pip install tensorboard); logger=csv needs nothing") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, summary: dict) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.close()


class _WandB:
    def __init__(self, cfg, run_dir: Path, run_config: dict):
        try:
            import wandb
        except ImportError as exc:
            raise LoggerError("logger=wandb needs the wandb package: pip install 'zoexp[logging]' "
                              "(or pip install wandb); logger=csv needs nothing") from exc
        self.wandb = wandb
        mode = str(cfg.get("mode") or "offline")
        if mode not in ("offline", "online", "disabled"):
            raise LoggerError(f"logger.mode must be offline, online or disabled, not {mode!r}")
        self.run = wandb.init(project=cfg.get("project") or "zoexp", entity=cfg.get("entity"),
                              name=cfg.get("name") or run_dir.name, group=cfg.get("group"),
                              tags=list(cfg.get("tags") or []), dir=str(run_dir), mode=mode,
                              config=run_config, reinit=True)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self, summary: dict) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish()
