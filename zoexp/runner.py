"""The experiment loop: setup -> train (dev eval every N steps, keep the best by dev) -> test -> one row.

``run(cfg)`` is the whole experiment; the command-line entry point only calls it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from zoexp.checkpoint import load_into, save_tensors
from zoexp.evaluation import evaluate
from zoexp.measure import Meter, device_name
from zoexp.methods import META_KEYS, build_method
from zoexp.models import count_params, load_model, resolve_device, resolve_dtype
from zoexp.results import append_row, git_commit, versions
from zoexp.scoring import Encoder, lm_loss
from zoexp.tasks import Example, Task

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


@dataclass
class Counters:
    forward_passes: int = 0
    tokens: int = 0
    curve: list = field(default_factory=list)
    dev_curve: list = field(default_factory=list)


class LossClosure:
    """One forward pass on ``batch``: the loss on the answer tokens. No backward (methods decide).

    ``dual(perturbation)`` is the offloaded variant for ZO methods: both perturbed losses from one pass
    through resident blocks (``zoexp.offload.dual_lm_loss``); it counts as two forward passes.
    """

    def __init__(self, model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters):
        self.model, self.encoder, self.batch, self.pad_id, self.counters = model, encoder, batch, pad_id, counters
        self.n_tokens = sum(len(encoder.encode(ex.prompt, ex.target)[0]) for ex in batch)

    def __call__(self):
        self.counters.forward_passes += 1
        self.counters.tokens += self.n_tokens
        return lm_loss(self.model, self.encoder, self.batch, self.pad_id)

    def dual(self, perturbation):
        from zoexp.offload import dual_lm_loss

        self.counters.forward_passes += 2
        self.counters.tokens += 2 * self.n_tokens
        return dual_lm_loss(self.model, self.encoder, self.batch, self.pad_id, perturbation)


def make_closure(model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters) -> LossClosure:
    return LossClosure(model, encoder, batch, pad_id, counters)


class BestWeights:
    """Keeps the weights with the best dev metric: on disk (safetensors in the run directory), in memory
    (a copy), or not at all (test uses the final weights)."""

    def __init__(self, model, mode: str, run_dir: Path):
        self.mode, self.path = mode, run_dir / "best.safetensors"
        self._memory: dict[str, torch.Tensor] | None = None
        self.saved = False
        named = {}
        seen = set()
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
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


def _progress(enabled: bool):
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


def _hyperparameters(cfg: DictConfig) -> dict:
    method = OmegaConf.to_container(cfg.method, resolve=True)
    return {k: v for k, v in method.items() if k not in META_KEYS and not k.startswith("_")}


def base_row(cfg: DictConfig, run_dir: Path) -> dict:
    return {
        "status": "running",
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "task_version": cfg.task.get("version"),
        "seed": int(cfg.run.seed),
        "dtype": cfg.run.dtype,
        "hparams": _hyperparameters(cfg),
        "run": OmegaConf.to_container(cfg.run, resolve=True),
        "experiment": cfg.get("experiment_name"),
        "run_dir": str(run_dir),
        "git_commit": git_commit(),
        "versions": versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one experiment described by a composed config and return its result row (also appended to
    ``cfg.run.results_file``). A failure writes a row with status ``failed`` and re-raises."""
    run_dir = Path(run_dir or cfg.run.get("dir") or ".")
    row = base_row(cfg, run_dir)
    device = resolve_device(cfg.run.device)
    meter = Meter(device)
    row["device"] = device_name(device)
    t_start = time.perf_counter()
    try:
        _run(cfg, run_dir, device, meter, row)
        row["status"] = "ok"
    except Diverged as exc:
        row.update(status="diverged", message=str(exc), diverged_step=exc.step)
        log.error("run diverged: %s", exc)
    except KeyboardInterrupt:
        row.update(status="interrupted", message="interrupted by the user (SIGINT)")
        _finish(cfg, row, meter, t_start)
        raise
    except Exception as exc:
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        _finish(cfg, row, meter, t_start)
        raise
    _finish(cfg, row, meter, t_start)
    return row


def _finish(cfg: DictConfig, row: dict, meter: Meter, t_start: float) -> None:
    row.update(meter.values)
    row["time/total_s"] = time.perf_counter() - t_start
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if cfg.run.get("results_file"):
        append_row(cfg.run.results_file, row)


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, meter: Meter, row: dict) -> None:
    seed = int(cfg.run.seed)
    seed_everything(seed)
    task = Task.from_config(cfg.task)
    data_dir = cfg.get("data_dir")
    with meter.phase("data"):
        data = task.sample(seed, data_dir=data_dir)
    row.update({"data/train": len(data.train), "data/dev": len(data.dev), "data/test": len(data.test),
                "data/notes": data.notes, "data/source": str(data_dir) if data_dir else "hub"})

    offload = bool(cfg.run.get("offload", False))
    with meter.phase("load"):  # offloaded runs load on the host; enable_offload moves the rest
        model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.run.dtype),
                                      device=torch.device("cpu") if offload else device)
    row["model_params"] = count_params(model)
    max_length = int(cfg.run.get("max_length") or getattr(model.config, "max_position_embeddings", 2048))
    encoder = Encoder(tokenizer, max_length=max_length)
    pad_id = tokenizer.pad_token_id
    optimizer = build_method(cfg.method, model, seed=seed)
    if offload:
        from zoexp.offload import enable_offload

        offloader = enable_offload(model, optimizer, device, ring=int(cfg.run.get("offload_ring", 3)))
        row.update(offloader.device_bytes())
    eval_bs = int(cfg.run.eval_batch_size)
    progress_on = bool(cfg.run.get("progress", True))

    def run_eval(examples, split: str) -> dict:
        with meter.phase("eval"), _progress(progress_on) as bar:
            job = bar.add_task(f"{split} eval", total=len(examples), info="")
            return evaluate(model, encoder, task, examples, batch_size=eval_bs,
                            progress=lambda n: bar.advance(job, n),
                            max_new_tokens=int(cfg.run.get("max_new_tokens", 50)))

    metric = task.metric
    best = {"value": -math.inf, "step": None, "metrics": None}
    counters = Counters()
    steps = int(cfg.run.steps) if optimizer is not None else 0
    if optimizer is not None:
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        row.update({"trainable_params": trainable, "forward_passes_per_step": optimizer.forward_passes_per_step})
        keeper = BestWeights(model, str(cfg.run.keep_best), run_dir)
        scheduler = _scheduler(optimizer, str(cfg.run.lr_schedule), steps)
        sampler = BatchSampler(len(data.train), int(cfg.run.batch_size), seed)
        eval_every = int(cfg.run.eval_every) or steps
        log_every = max(1, int(cfg.run.log_every))
        max_state = optimizer.state_bytes()
        t_train = 0.0
        window: list[float] = []

        def dev_eval(step: int) -> None:
            optimizer.flush()  # deferred (offloaded) updates land before the weights are evaluated
            result = run_eval(data.dev, "dev")
            counters.dev_curve.append({"step": step, metric: result[metric], "train_time_s": t_train})
            log.info("step %d dev %s = %.4f", step, metric, result[metric])
            if result[metric] > best["value"]:
                best.update(value=result[metric], step=step, metrics=result)
                keeper.save()

        if cfg.run.get("eval_at_start", False) and data.dev:
            dev_eval(0)
        model.train(optimizer.train_mode)
        with _progress(progress_on) as bar:
            job = bar.add_task(f"{cfg.method.name} train", total=steps, info="")
            step = 0
            while step < steps:
                segment_end = min(steps, (step // eval_every + 1) * eval_every)
                with meter.phase("train"):
                    while step < segment_end:
                        batch = [data.train[i] for i in sampler.next()]
                        closure = make_closure(model, encoder, batch, pad_id, counters)
                        t0 = time.perf_counter()
                        loss = float(optimizer.step(closure))
                        t_train += time.perf_counter() - t0
                        step += 1
                        if not math.isfinite(loss):
                            raise Diverged(step, loss)
                        if scheduler is not None:
                            scheduler.step()
                        max_state = max(max_state, optimizer.state_bytes())
                        window.append(loss)
                        if step % log_every == 0 or step == steps:
                            counters.curve.append({"step": step, "loss": sum(window) / len(window),
                                                   "train_time_s": t_train, **optimizer.metrics()})
                            window.clear()
                        bar.update(job, advance=1, info=f"loss {loss:.4f}  {t_train / step:.2f} s/step")
                if data.dev:
                    model.eval()
                    dev_eval(step)
                    model.train(optimizer.train_mode)
        model.eval()
        optimizer.flush()
        row.update({
            "steps": steps,
            "train/final_loss": counters.curve[-1]["loss"] if counters.curve else None,
            "train/time_per_step_s": t_train / max(steps, 1),
            "optimizer_state_bytes": optimizer.state_bytes(),
            "optimizer_state_bytes_max": max_state,
            "forward_passes": counters.forward_passes,
            "tokens": counters.tokens,
            "tokens_per_s": counters.tokens / t_train if t_train else None,
            "curve": counters.curve,
            "dev_curve": counters.dev_curve,
            f"dev/{metric}": best["value"] if best["step"] is not None else None,
            "best_step": best["step"],
        })
        keeper.restore()
    else:
        row.update({"steps": 0, "trainable_params": 0, "forward_passes_per_step": 0, "optimizer_state_bytes": 0})

    result = run_eval(data.test, "test")
    for key, value in result.items():
        row[f"test/{key}" if key != "n" else "test/n"] = value
    row["eval/truncated_examples"] = encoder.truncated
    if optimizer is not None:
        keeper.cleanup(keep=bool(cfg.run.get("save_best", False)))
    log.info("test %s = %.4f", metric, result[metric])


def _scheduler(optimizer, kind: str, steps: int):
    if kind == "constant":
        return None
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    raise ValueError(f"run.lr_schedule must be constant or linear, not {kind!r}")
