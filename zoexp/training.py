"""The parts the experiment loop is built from (``zoexp.runner`` assembles them): the batch order, the
best-by-dev weights, the training loss a run uses, ZO gradient accumulation, the learning-rate schedule,
the progress display, and the error a diverged loss raises.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from zoexp import resume, validate
from zoexp.checkpoint import file_crc32, load_into, save_tensors
from zoexp.methods import ZOMethod
from zoexp.tasks import Task


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class BatchSampler:
    """Shuffled mini-batches without replacement within an epoch; the order depends only on the seed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def next(self) -> list[int]:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation()
        batch = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def training_loss(cfg: DictConfig, task: Task) -> str:
    """``run.loss``: auto (default: the task spec's MeZO choice) | lm | classification. An offloaded run
    computes the LM loss only (its dual forward), so there auto means lm."""
    loss = str(cfg.run.get("loss", "auto"))
    if loss == "auto":
        offloaded = bool(cfg.run.get("offload", False))
        return "classification" if task.spec.get("train_as_classification") and not offloaded else "lm"
    if loss not in ("lm", "classification"):
        raise ValueError(f"run.loss must be lm, classification or auto, not {loss!r}")
    if loss == "classification" and task.type != "classification":
        raise ValueError(f"run.loss=classification needs a classification task; {task.name} is {task.type}")
    return loss


class SettingsError(validate.ConfigError):
    """Run settings that do not work together (the command line prints the message as one line)."""


def accumulation_steps(cfg: DictConfig, world_size: int = 1) -> int:
    """``run.accumulation_steps`` (ZO micro-batches per step), refusing what it cannot do correctly.
    Checked from the config alone, before any data or model is loaded."""
    k = int(cfg.run.get("accumulation_steps") or 1)
    if k == 1:
        return 1
    if k < 1:
        raise SettingsError(f"run.accumulation_steps must be >= 1, not {k}")
    target = cfg.method.get("_target_")
    if not target:
        raise SettingsError(f"run.accumulation_steps={k} needs a training method; {cfg.method.name} does not train")
    from hydra.utils import get_class

    if not issubclass(get_class(target), ZOMethod):
        raise SettingsError(f"run.accumulation_steps is for ZO methods; {cfg.method.name} is first-order: "
                            f"use method.accumulation_steps={k}")
    if cfg.run.get("offload", False):
        raise SettingsError("run.offload streams each block once per step for the whole batch: it does not "
                            "combine with run.accumulation_steps > 1")
    per_rank = int(cfg.run.batch_size) // max(world_size, 1)
    if k > per_rank:
        raise SettingsError(f"run.accumulation_steps={k} exceeds the {per_rank} examples per step"
                            + (f" per process ({world_size} processes)" if world_size > 1 else "")
                            + f" of run.batch_size={cfg.run.batch_size}")
    return k


class BestWeights:
    """Keeps the weights with the best dev metric: on disk (safetensors in the run directory), in memory
    (a copy), or not at all (test uses the final weights).

    The weights kept are ``params`` (the parameters the optimizer owns) when given -- block-coordinate
    methods switch ``requires_grad`` on and off as they go, so it cannot tell what is trained -- else
    the parameters that require grad.
    """

    def __init__(self, model, mode: str, run_dir: Path, params=None, name: str = "best.safetensors"):
        self.mode, self.path = mode, run_dir / name
        self._memory: dict[str, torch.Tensor] | None = None
        self.saved = False
        owned = None if params is None else {id(p) for p in params}
        named = {}
        seen = set()
        for name, p in model.named_parameters():
            keep = p.requires_grad if owned is None else id(p) in owned
            if keep and id(p) not in seen:
                seen.add(id(p))
                named[name] = p
        self.params = named
        if mode not in ("disk", "memory", "none"):
            raise ValueError(f"run.keep_best must be disk, memory or none, not {mode!r}")

    def save(self) -> None:
        if self.mode == "memory":
            self._memory = {n: p.detach().clone() for n, p in self.params.items()}
        elif self.mode == "disk":
            save_tensors(self.path, self.params)
        self.saved = self.mode != "none"

    @torch.no_grad()
    def restore(self) -> None:
        if not self.saved:
            return
        if self.mode == "disk":
            load_into(self.path, self.params)
            return
        for n, p in self.params.items():
            p.copy_(self._memory[n])

    def cleanup(self, keep: bool) -> None:
        if self.mode == "disk" and self.path.exists() and not keep:
            self.path.unlink()

    # checkpoints carry the best weights so far (zoexp.resume)
    def export_to(self, path: Path) -> int | None:
        """Put the best weights into ``path`` (a hard link of the disk copy when possible); CRC-32 or None."""
        if not self.saved:
            return None
        if self.mode == "memory":
            return save_tensors(path, self._memory)
        try:
            os.link(self.path, path)  # save() replaces the file (new inode), so the link keeps this version
        except OSError:
            shutil.copyfile(self.path, path)
        return file_crc32(path)

    def import_from(self, path: Path) -> None:
        self.saved = path.is_file() and self.mode != "none"
        if not self.saved:
            return
        if self.mode == "memory":
            self._memory = resume.load_best(path)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.path)


def progress_display(enabled: bool):
    """One live display for the whole run (training and evaluation bars); silent when not enabled."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )



LR_SCHEDULES = ("constant", "linear")


def check_lr_schedule(kind: str) -> str:
    """``kind`` if it is a ``run.lr_schedule`` this loop knows, else one clear error."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"run.lr_schedule must be constant or linear, not {kind!r}")
    return kind


def lr_scheduler(optimizer, kind: str, steps: int):
    """``run.lr_schedule``: constant (None: no scheduler) or linear decay to 0 over ``steps``."""
    if kind == "constant":
        return None
    check_lr_schedule(kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
