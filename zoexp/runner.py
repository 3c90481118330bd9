"""The experiment loop: setup -> train (dev eval every N steps, keep the best by dev) -> test -> one row.

``run(cfg)`` is the whole experiment; the command-line entry point only calls it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from zoexp import distributed, resume
from zoexp.checkpoint import file_crc32, load_into, save_tensors
from zoexp.evaluation import evaluate
from zoexp.icl import with_demonstrations
from zoexp.measure import Meter, device_name
from zoexp.methods import META_KEYS, build_method
from zoexp.models import count_params, load_model, model_devices, resolve_device, resolve_dtype
from zoexp.results import append_row, git_commit, versions
from zoexp.resume import Checkpointer, Preempted, PreemptionGuard
from zoexp.scoring import Encoder, classification_loss, lm_loss, request_tokens
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
    """One forward pass on ``batch``: the loss on the answer tokens (``lm``), or MeZO's
    train_as_classification (``classification``: cross-entropy over the candidates' scores).
    No backward (methods decide).

    ``closure(part, parts)`` (gradient accumulation) runs only the ``part``-th of ``parts`` contiguous
    slices of the batch and scales its mean loss by the slice's share of the batch's loss weight (answer
    tokens, or examples for ``classification``), so the parts' losses -- and their gradients -- add up
    to those of the whole batch. The parts of one batch count as one forward pass.

    ``dual(perturbation)`` is the offloaded variant for ZO methods: both perturbed losses from one pass
    through resident blocks (``zoexp.offload.dual_lm_loss``); it counts as two forward passes.
    """

    def __init__(self, model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters,
                 loss: str = "lm"):
        self.model, self.encoder, self.batch, self.pad_id, self.counters = model, encoder, batch, pad_id, counters
        self.loss = loss
        self.loss_fn = {"lm": lm_loss, "classification": classification_loss}[loss]
        self.n_tokens = [request_tokens(encoder, [ex], loss) for ex in batch]
        self.weights = [distributed.loss_weight(encoder, [ex], loss) for ex in batch]

    def __call__(self, part: int = 0, parts: int = 1):
        batch, counters = self.batch, self.counters
        if parts == 1:
            counters.forward_passes += 1
            counters.tokens += sum(self.n_tokens)
            return self.loss_fn(self.model, self.encoder, batch, self.pad_id)
        if not 0 <= part < parts <= len(batch):
            raise ValueError(f"cannot split a batch of {len(batch)} examples into {parts} parts (part {part}); "
                             "accumulation steps must not exceed run.batch_size")
        lo, hi = part * len(batch) // parts, (part + 1) * len(batch) // parts
        counters.forward_passes += part == 0
        counters.tokens += sum(self.n_tokens[lo:hi])
        share = sum(self.weights[lo:hi]) / sum(self.weights)
        return self.loss_fn(self.model, self.encoder, batch[lo:hi], self.pad_id) * share

    def dual(self, perturbation):
        from zoexp.offload import dual_lm_loss

        if self.loss != "lm":
            raise ValueError("run.offload supports run.loss=lm only")
        self.counters.forward_passes += 2
        self.counters.tokens += 2 * sum(self.n_tokens)
        return dual_lm_loss(self.model, self.encoder, self.batch, self.pad_id, perturbation)


def make_closure(model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters,
                 loss: str = "lm") -> LossClosure:
    return LossClosure(model, encoder, batch, pad_id, counters, loss)


def training_loss(cfg: DictConfig, task: Task) -> str:
    """``run.loss``: lm (default) | classification | auto (the task spec's MeZO choice)."""
    loss = str(cfg.run.get("loss", "lm"))
    if loss == "auto":
        return "classification" if task.spec.get("train_as_classification") else "lm"
    if loss not in ("lm", "classification"):
        raise ValueError(f"run.loss must be lm, classification or auto, not {loss!r}")
    if loss == "classification" and task.type != "classification":
        raise ValueError(f"run.loss=classification needs a classification task; {task.name} is {task.type}")
    return loss


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

    # [scale-out] checkpoints carry the best weights so far (zoexp.resume)
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
        # reproduction sweeps (conf/experiment/*): the profile and the table cell this run belongs to,
        # and the task protocol, so the report can select rows and refuse mismatched ones (zoexp.report)
        "profile": cfg.get("profile"),
        "cell": OmegaConf.to_container(cfg.cell, resolve=True) if cfg.get("cell") is not None else None,
        "task_protocol": {"metric": cfg.task.get("metric"),
                          **{k: cfg.task.get(k) for k in ("num_train", "num_dev", "num_test", "k_shot")}},
        "run_dir": str(run_dir),
        "git_commit": git_commit(),
        "versions": versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one experiment described by a composed config and return its result row (also appended to
    ``cfg.run.results_file``). A failure writes a row with status ``failed`` and re-raises; a
    preemption signal saves a checkpoint, writes a ``preempted`` row and raises ``Preempted``."""
    given = run_dir or cfg.run.get("dir")
    run_dir = Path(given or ".")
    # [scale-out] data parallel when launched by torchrun (zoexp.distributed); continue a checkpoint of
    # the run directory if there is one, or return the row of a run that already finished there
    # (zoexp.resume) -- only for a directory given explicitly (the CLI's, or run.dir), never the cwd
    dist = distributed.setup(cfg, resolve_device(cfg.run.device))
    try:
        run_dir = dist.shared_run_dir(run_dir)
        plan = resume.plan(cfg, run_dir, dist) if given else resume.Plan(run_dir)
        if plan.finished is not None:
            log.info("%s already finished (status %s); nothing to do", plan.run_dir, plan.finished["status"])
            return plan.finished
        return _run_and_record(cfg, plan, dist, keep_result=bool(given))
    finally:
        dist.close()


def _run_and_record(cfg: DictConfig, plan: resume.Plan, dist, keep_result: bool = True) -> dict:
    run_dir = plan.run_dir
    row = base_row(cfg, run_dir)
    row["config_fingerprint"] = resume.fingerprint(resume.run_identity(cfg))  # [scale-out] what resume compares
    device = dist.device
    meter = Meter(device)
    row["device"] = device_name(device)
    guard = PreemptionGuard()
    dist.local_stop = lambda: guard.requested
    t_start = time.perf_counter()
    try:
        with guard:
            _run(cfg, run_dir, device, meter, row, dist, plan, guard)
        row["status"] = "ok"
    except Diverged as exc:
        row.update(status="diverged", message=str(exc), diverged_step=exc.step)
        log.error("run diverged: %s", exc)
    except Preempted as exc:
        row.update(status="preempted", preempted_step=exc.step,
                   checkpoint=str(exc.checkpoint) if exc.checkpoint else None,
                   message=f"{exc}; continue with run.resume=auto (same run.name) or run.resume={run_dir}")
        log.warning("preempted: %s", row["message"])
        _finish(cfg, row, meter, t_start, dist, collective=exc.step is not None)
        guard.chain()  # e.g. submitit's requeue on SIGUSR2
        raise
    except KeyboardInterrupt:
        row.update(status="interrupted", message="interrupted by the user (SIGINT)")
        _finish(cfg, row, meter, t_start, dist, collective=False)
        raise
    except Exception as exc:
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        _finish(cfg, row, meter, t_start, dist, collective=False)
        raise
    _finish(cfg, row, meter, t_start, dist)
    if dist.is_main and keep_result:  # [scale-out] a finished run: its row beside it, checkpoints no longer needed
        resume.write_result(run_dir, row)
        if not cfg.run.get("keep_checkpoints", False):
            shutil.rmtree(run_dir / resume.CHECKPOINTS, ignore_errors=True)
    return row


def _finish(cfg: DictConfig, row: dict, meter: Meter, t_start: float, dist=None, collective: bool = True) -> None:
    row.update(meter.values)
    row["time/total_s"] = time.perf_counter() - t_start
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    dist = dist or distributed.Single(meter.device)
    if collective:  # [scale-out] wall-clock and memory: the maximum over ranks
        dist.reduce_measurements(row)
    if dist.enabled:
        row["dist/rank"] = dist.rank
    # one row per run, from rank 0; a rank that fails on its own also says why
    if cfg.run.get("results_file") and (dist.is_main or row["status"] == "failed"):
        append_row(cfg.run.results_file, row)


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, meter: Meter, row: dict,
         dist=None, plan: resume.Plan | None = None, guard: PreemptionGuard | None = None) -> None:
    dist = dist or distributed.Single(device)
    plan = plan or resume.Plan(run_dir)
    guard = guard or PreemptionGuard()
    seed = int(cfg.run.seed)
    seed_everything(seed)
    task = Task.from_config(cfg.task)
    data_dir = cfg.get("data_dir")
    with meter.phase("data"):
        data = task.sample(seed, data_dir=data_dir)
    row.update({"data/train": len(data.train), "data/dev": len(data.dev), "data/test": len(data.test),
                "data/notes": data.notes, "data/splits": data.splits,
                "data/source": str(data_dir) if data_dir else "hub"})
    loss_kind = training_loss(cfg, task)

    offload = bool(cfg.run.get("offload", False))
    with meter.phase("load"):  # offloaded runs load on the host; enable_offload moves the rest
        model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.run.dtype),
                                      device=torch.device("cpu") if offload else device)
    row["model_params"] = count_params(model)
    devices = model_devices(model)  # [scale-out] several with model.device_map
    if len(devices) > 1:
        row["model_devices"] = [str(d) for d in devices]
        meter.devices = devices
    dist.check_replicas(model)
    max_length = int(cfg.run.get("max_length") or getattr(model.config, "max_position_embeddings", 2048))
    encoder = Encoder(tokenizer, max_length=max_length)
    pad_id = tokenizer.pad_token_id
    optimizer = build_method(cfg.method, model, seed=seed)
    if offload:
        from zoexp.offload import enable_offload

        offloader = enable_offload(model, optimizer, device, ring=int(cfg.run.get("offload_ring", 3)))
        row.update(offloader.device_bytes())
    eval_bs = int(cfg.run.eval_batch_size)
    progress_on = bool(cfg.run.get("progress", True)) and dist.is_main
    max_new = cfg.run.get("max_new_tokens")
    max_new = int(max_new) if max_new is not None else task.max_new_tokens
    # In-context learning (method=icl): the first k train examples as demonstrations before every
    # evaluated example (see zoexp/icl.py); evaluation only, training never sees them.
    demos = data.train[: int(cfg.method.get("demonstrations") or 0)]
    if demos:
        row["icl/demonstrations_requested"] = int(cfg.method.demonstrations)

    bar = _progress(progress_on)  # one live display for the whole run: training and eval bars

    def run_eval(examples, split: str) -> dict:
        if demos:
            examples, stats = with_demonstrations(encoder, examples, demos,
                                                  reserve=max_new if task.type == "generation" else 0)
            row.update({f"{k}" if split == "test" else f"{k}_{split}": v for k, v in stats.items()})

        def score(shard) -> dict:
            job = bar.add_task(f"{split} eval", total=len(shard), info="")
            try:
                with meter.phase("eval"):
                    return evaluate(model, encoder, task, shard, batch_size=eval_bs,
                                    progress=lambda n: bar.advance(job, n), max_new_tokens=max_new,
                                    share_prompts=bool(cfg.run.get("eval_share_prompts", True)),
                                    prefix_cache=bool(cfg.run.get("eval_prefix_cache", True)))
            finally:
                bar.remove_task(job)

        t0 = time.perf_counter()
        result = dist.evaluate(score, examples)  # [scale-out] each rank scores its shard
        if split == "test":
            seconds = time.perf_counter() - t0
            row.update({"eval/test_s": seconds, "eval/test_examples_per_s": len(examples) / max(seconds, 1e-9)})
        return result

    metric = task.metric
    best = {"value": -math.inf, "step": None, "metrics": None}
    counters = Counters()
    steps = int(cfg.run.steps) if optimizer is not None else 0
    if optimizer is not None:
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        row.update({"trainable_params": trainable, "forward_passes_per_step": optimizer.forward_passes_per_step})
        keeper = BestWeights(model, str(cfg.run.keep_best), run_dir, name=dist.best_file(),
                             params=[p for g in optimizer.param_groups for p in g["params"]])
        scheduler = _scheduler(optimizer, str(cfg.run.lr_schedule), steps)
        sampler = BatchSampler(len(data.train), int(cfg.run.batch_size), seed)
        eval_every = int(cfg.run.eval_every) or steps
        log_every = max(1, int(cfg.run.log_every))
        max_state = optimizer.state_bytes()
        t_train = 0.0
        window: list[float] = []
        step = 0
        evaluated_at = None  # step of the last dev evaluation
        dist.sync_gradients(optimizer)  # [scale-out] first-order parts all-reduce their gradients
        ckpt = Checkpointer(run_dir, cfg, dist)

        def dev_eval(step: int) -> None:
            nonlocal evaluated_at
            optimizer.flush()  # deferred (offloaded) updates land before the weights are evaluated
            result = run_eval(data.dev, "dev")
            counters.dev_curve.append({"step": step, metric: result[metric], "train_time_s": t_train})
            log.info("step %d dev %s = %.4f", step, metric, result[metric])
            if result[metric] > best["value"]:
                best.update(value=result[metric], step=step, metrics=result)
                keeper.save()
            evaluated_at = step

        def checkpoint() -> Path:
            """[scale-out] Everything the loop needs to continue the identical trajectory (zoexp.resume)."""
            state = {"step": step, "sampler": sampler.state_dict(), "counters": vars(counters),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "window": window, "t_train": t_train, "best": best, "max_state": max_state,
                     "evaluated_at": evaluated_at}
            with meter.phase("checkpoint"):
                return ckpt.save(step, model, optimizer, state, keeper)

        def restore(path: Path) -> tuple:
            """[scale-out] The loop's state from checkpoint ``path``; a dev eval the stopped run owed runs now."""
            state = ckpt.restore(path, model, optimizer, keeper)
            sampler.load_state_dict(state["sampler"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            for key, value in state["counters"].items():
                setattr(counters, key, value)
            best.update(state["best"])
            at = state["step"]
            row.update(resumed_from_step=at, resumed_from=str(path))
            log.info("resumed from %s (step %d)", path, at)
            if data.dev and at and (at % eval_every == 0 or at == steps) and state["evaluated_at"] != at:
                dev_eval(at)
                state["evaluated_at"] = at
            return at, state["window"], state["t_train"], state["max_state"], state["evaluated_at"]

        with bar, guard.armed():
            if plan.checkpoint is not None:  # [scale-out] continue where the checkpoint left off
                step, window, t_train, max_state, evaluated_at = restore(plan.checkpoint)
            elif cfg.run.get("eval_at_start", False) and data.dev:
                dev_eval(0)
            start_step = step
            model.train(optimizer.train_mode)
            job = bar.add_task(f"{cfg.method.name} train", total=steps, completed=step, info="")
            while step < steps:
                # segments end at dev evaluations and checkpoints, which run outside the train phase
                segment_end = min(steps, (step // eval_every + 1) * eval_every, ckpt.next_due(step, steps))
                with meter.phase("train"):
                    while step < segment_end and not dist.stop_requested():
                        batch = [data.train[i] for i in sampler.next()]
                        shard = dist.shard(batch)  # [scale-out] this rank's part of the global batch
                        closure = make_closure(model, encoder, shard, pad_id, counters, loss_kind)
                        closure = dist.wrap_closure(closure, distributed.loss_weight(encoder, shard, loss_kind),
                                                    distributed.loss_weight(encoder, batch, loss_kind))
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
                if dist.stop_requested():  # [scale-out] preemption: save now; a due dev eval runs after resuming
                    raise Preempted(guard.signum, step, checkpoint())
                if data.dev and (step % eval_every == 0 or step == steps) and evaluated_at != step:
                    model.eval()
                    dev_eval(step)
                    model.train(optimizer.train_mode)
                if ckpt.due(step, steps):
                    checkpoint()
        model.eval()
        optimizer.flush()
        tokens = int(dist.sum(counters.tokens))  # [scale-out] all ranks' shards
        row.update({
            "steps": steps,
            "train/loss_kind": loss_kind,
            "train/final_loss": counters.curve[-1]["loss"] if counters.curve else None,
            "train/time_per_step_s": t_train / max(steps, 1),
            "optimizer_state_bytes": optimizer.state_bytes(),
            "optimizer_state_bytes_max": max_state,
            "optimizer_grad_bytes_max": getattr(optimizer, "grad_bytes_max", 0),
            **(optimizer.row_fields() if hasattr(optimizer, "row_fields") else {}),
            "forward_passes": counters.forward_passes,
            "tokens": tokens,
            "tokens_per_s": tokens / t_train if t_train else None,
            "curve": counters.curve,
            "dev_curve": counters.dev_curve,
            f"dev/{metric}": best["value"] if best["step"] is not None else None,
            "best_step": best["step"],
            **dist.row_fields(step - start_step),
        })
        if ckpt.saves:
            row.update({"checkpoints_written": ckpt.saves, "checkpoint_bytes": ckpt.saved_bytes})
        keeper.restore()
    else:
        row.update({"steps": 0, "trainable_params": 0, "forward_passes_per_step": 0, "optimizer_state_bytes": 0,
                    "optimizer_grad_bytes_max": 0})

    encoder.reset_truncated()  # count the test set's truncated prompts only
    with bar, guard.armed():  # [scale-out] a signal now lets the test evaluation finish (the run is complete)
        result = run_eval(data.test, "test")
    for key, value in result.items():
        row[f"test/{key}" if key != "n" else "test/n"] = value
    row["eval/truncated_examples"] = encoder.truncated
    if encoder.truncated:
        log.warning("%d test prompts were longer than %d tokens and lost text from the left of their passage",
                    encoder.truncated, encoder.max_length)
    row["eval/max_length"] = encoder.max_length
    if optimizer is not None:
        keeper.cleanup(keep=bool(cfg.run.get("save_best", False)))
    log.info("test %s = %.4f", metric, result[metric])


def _scheduler(optimizer, kind: str, steps: int):
    if kind == "constant":
        return None
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    raise ValueError(f"run.lr_schedule must be constant or linear, not {kind!r}")
