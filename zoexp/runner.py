"""The experiment loop: setup -> train (dev eval every N steps, keep the best by dev) -> test -> one row.

``run(cfg)`` is the whole experiment; the command-line entry point only calls it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from zoexp import distributed, resume, validate
from zoexp.checkpoint import file_crc32, load_into, save_tensors
from zoexp.closure import Counters, make_closure, seed_everything
from zoexp.evaluation import evaluate
from zoexp.icl import with_demonstrations
from zoexp.loggers import MetricsLogger, learning_rate, memory_peaks
from zoexp.measure import Meter, device_name
from zoexp.methods import META_KEYS, ZOMethod, build_method
from zoexp.models import count_params, load_model, model_devices, resolve_device, resolve_dtype
from zoexp.provenance import method_code_version
from zoexp.results import append_row, git_commit, versions
from zoexp.resume import Checkpointer, Preempted, PreemptionGuard
from zoexp.scoring import Encoder
from zoexp.tasks import Example, Task

log = logging.getLogger(__name__)


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
        "code_version": method_code_version(cfg.method),  # the method's own source (zoexp.provenance)
        "versions": versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one experiment described by a composed config and return its result row (also appended to
    ``cfg.run.results_file``). A failure writes a row with status ``failed`` and re-raises; a
    preemption signal saves a checkpoint, writes a ``preempted`` row and raises ``Preempted``."""
    given = run_dir or cfg.run.get("dir")
    run_dir = Path(given or ".")
    # bad values, an unwritable results file: one line before any work (a dry run may name a device this
    # machine does not have: it predicts that device's memory)
    validate.check_config(cfg, device=not cfg.run.get("dry_run"))
    validate.check_results_file(cfg.run.get("results_file"))
    if cfg.run.get("dry_run"):  # run.dry_run=memory: a `predicted` row from fake tensors (zoexp.memory)
        from zoexp.memory import dry_run

        return dry_run(cfg, base_row(cfg, run_dir))
    # [scale-out] data parallel when launched by torchrun (zoexp.distributed); continue a checkpoint of
    # the run directory if there is one, or return the row of a run that already finished there
    # (zoexp.resume) -- only for a directory given explicitly (the CLI's, or run.dir), never the cwd
    dist = distributed.setup(cfg, resolve_device(cfg.run.device))
    finished = False
    try:
        run_dir = dist.shared_run_dir(run_dir)
        plan = resume.plan(cfg, run_dir, dist) if given else resume.Plan(run_dir)
        if plan.finished is not None:
            log.info("%s already finished (status %s); nothing to do", plan.run_dir, plan.finished["status"])
            row = plan.finished
        else:
            row = _run_and_record(cfg, plan, dist, keep_result=bool(given))
        finished = True
        return row
    finally:
        resume.unlock_run_dir(run_dir)
        dist.close(barrier=finished)  # [scale-out] the process group ends with the run (no barrier after a failure)


def _run_and_record(cfg: DictConfig, plan: resume.Plan, dist, keep_result: bool = True) -> dict:
    run_dir = plan.run_dir
    row = base_row(cfg, run_dir)
    row["status"] = "starting"  # until set up: a bad value, missing data or model is a user error, no row
    if plan.skipped:  # [scale-out] corrupt checkpoints passed over; none left: the run started over
        row.update({"resume/skipped_checkpoints": list(plan.skipped),
                    "resume/started_over": plan.checkpoint is None})
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
        if row.get("status") == "starting" and isinstance(exc, validate.setup_errors()):
            # a bad value, missing data or model: the run never started, so no row (exit code 2)
            raise validate.UserError(str(exc)) from exc
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        _finish(cfg, row, meter, t_start, dist, collective=False)
        raise
    # a finished run: its row beside it first (kept even if the results file fails), then appended
    _finish(cfg, row, meter, t_start, dist, result_dir=run_dir if dist.is_main and keep_result else None)
    if dist.is_main and keep_result and not cfg.run.get("keep_checkpoints", False):
        shutil.rmtree(run_dir / resume.CHECKPOINTS, ignore_errors=True)  # [scale-out] no longer needed
    return row


def _finish(cfg: DictConfig, row: dict, meter: Meter, t_start: float, dist=None, collective: bool = True,
            result_dir: Path | None = None) -> None:
    row.update(meter.values)
    row["time/total_s"] = time.perf_counter() - t_start
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    dist = dist or distributed.Single(meter.device)
    if collective:  # [scale-out] wall-clock and memory: the maximum over ranks
        dist.reduce_measurements(row)
    if dist.enabled:
        row["dist/rank"] = dist.rank
    if result_dir is not None:
        resume.write_result(result_dir, row)
    # one row per run, from rank 0; a rank that fails on its own also says why
    if cfg.run.get("results_file") and (dist.is_main or row["status"] == "failed"):
        try:
            append_row(cfg.run.results_file, row)
        except OSError as exc:
            kept = f"; the row is kept in {result_dir / resume.RESULT}" if result_dir is not None else ""
            log.error("could not append the row to %s (%s)%s", cfg.run.results_file, exc, kept)
            raise


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, meter: Meter, row: dict,
         dist=None, plan: resume.Plan | None = None, guard: PreemptionGuard | None = None) -> None:
    dist = dist or distributed.Single(device)
    plan = plan or resume.Plan(run_dir)
    guard = guard or PreemptionGuard()
    seed = int(cfg.run.seed)
    seed_everything(seed)
    # settings that cannot work together, and a logger whose package is missing, stop the run here
    accumulation = accumulation_steps(cfg, dist.world_size if dist.enabled else 1)
    metrics = MetricsLogger(run_dir, cfg.get("logger"), OmegaConf.to_container(cfg, resolve=True),
                            enabled=dist.is_main and bool(cfg.method.get("_target_")),
                            console=not (bool(cfg.run.get("progress", True)) and dist.is_main),
                            total_steps=int(cfg.run.steps))
    task = Task.from_config(cfg.task)
    data_dir = cfg.get("data_dir")
    with meter.phase("data"):
        data = task.sample(seed, data_dir=data_dir)
    row.update({"data/train": len(data.train), "data/dev": len(data.dev), "data/test": len(data.test),
                "data/notes": data.notes, "data/splits": data.splits,
                "data/source": str(data_dir) if data_dir else "hub"})
    _record_provenance(row, task, data_dir)
    loss_kind = training_loss(cfg, task)

    offload = bool(cfg.run.get("offload", False))
    from zoexp.memory import check_fits

    check_fits(cfg, device, row)  # on CUDA: stop now if the predicted peak exceeds the free memory
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
    validate.check_active_blocks(cfg.method, optimizer)  # never silently fewer blocks than the row says
    if offload:
        from zoexp.offload import enable_offload

        offloader = enable_offload(model, optimizer, device, ring=int(cfg.run.get("offload_ring", 3)))
        row.update(offloader.device_bytes())
    eval_bs = int(cfg.run.eval_batch_size)
    progress_on = bool(cfg.run.get("progress", True)) and dist.is_main
    save_predictions = bool(cfg.run.get("save_predictions", False))
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

        keep = save_predictions and split == "test"

        def score(shard) -> dict:
            job = bar.add_task(f"{split} eval", total=len(shard), info="")
            records = [] if keep else None
            try:
                with meter.phase("eval"):
                    result = evaluate(model, encoder, task, shard, batch_size=eval_bs,
                                      progress=lambda n: bar.advance(job, n), max_new_tokens=max_new,
                                      share_prompts=bool(cfg.run.get("eval_share_prompts", True)),
                                      prefix_cache=bool(cfg.run.get("eval_prefix_cache", True)),
                                      predictions=records)
                return {**result, "predictions": records} if keep else result
            finally:
                bar.remove_task(job)

        t0 = time.perf_counter()
        result = dist.evaluate(score, examples)  # [scale-out] each rank scores its shard
        if keep:
            records = result.pop("predictions", None) or []
            if dist.is_main:
                row["predictions_file"] = str(write_predictions(run_dir, records, examples))
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
        # the +- losses of a ZO step are summed over `accumulation` micro-batches (LossClosure)
        per_rank = min(int(cfg.run.batch_size), len(data.train)) // (dist.world_size if dist.enabled else 1)
        row.update({"train/accumulation_steps": accumulation, "train/micro_batch_size": -(-per_rank // accumulation)})
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
            metrics.log_eval(step, "dev", result)
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

        row["status"] = "running"  # set up: from here on a failure is a `failed` run with its row
        with bar, guard.armed(), metrics.closed_on_error():
            if plan.checkpoint is not None:  # [scale-out] continue where the checkpoint left off
                step, window, t_train, max_state, evaluated_at = restore(plan.checkpoint)
            elif cfg.run.get("eval_at_start", False) and data.dev:
                dev_eval(0)
            start_step = step
            metrics.start(resume_step=step)
            model.train(optimizer.train_mode)
            job = bar.add_task(f"{cfg.method.name} train", total=steps, completed=step, info="")
            while step < steps:
                # segments end at dev evaluations and checkpoints, which run outside the train phase
                segment_end = min(steps, (step // eval_every + 1) * eval_every, ckpt.next_due(step, steps))
                with meter.phase("train"):
                    while step < segment_end and not dist.stop_requested():
                        batch = [data.train[i] for i in sampler.next()]
                        shard = dist.shard(batch)  # [scale-out] this rank's part of the global batch
                        closure = make_closure(model, encoder, shard, pad_id, counters, loss_kind, accumulation)
                        closure = dist.wrap_closure(closure, distributed.loss_weight(encoder, shard, loss_kind),
                                                    distributed.loss_weight(encoder, batch, loss_kind))
                        closure.accumulation_steps = accumulation  # HZO's FO step reads it through the wrapper
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
                            point = {"step": step, "loss": sum(window) / len(window), "train_time_s": t_train,
                                     **optimizer.metrics()}
                            counters.curve.append(point)
                            window.clear()
                            rss, gpu = memory_peaks(device)
                            metrics.log_train(step, {"loss": point["loss"], "lr": learning_rate(optimizer),
                                                     "proj_grad": point.get("proj_grad"),
                                                     "forward_passes": counters.forward_passes,
                                                     "tokens": counters.tokens, "train_time_s": t_train,
                                                     "rss_peak_bytes": rss, "gpu_allocated_peak_bytes": gpu})
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

    row["status"] = "running"
    encoder.reset_truncated()  # count the test set's truncated prompts only
    with bar, guard.armed(), metrics.closed_on_error():  # [scale-out] a signal now lets the test evaluation finish
        result = run_eval(data.test, "test")
    metrics.log_eval(steps, "test", result)
    metrics.close({f"test/{metric}": result.get(metric), f"dev/{metric}": row.get(f"dev/{metric}")})
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


def _record_provenance(row: dict, task: Task, data_dir) -> None:
    """sha256 of each data file read, checked against the data folder's MANIFEST.md; pinned hub revisions."""
    from zoexp.provenance import check_manifest

    if task.files_read:
        row["data/sha256"] = dict(sorted(task.files_read.items()))
        row["data/manifest"] = check_manifest(task.files_read, data_dir)
    if task.hub_loads:
        row["data/hub"] = task.hub_loads


def write_predictions(run_dir: Path, records: list[dict], examples: list[Example]) -> Path:
    """``predictions.jsonl`` in the run directory, in test-set order, written whole then renamed into place."""
    import json

    from zoexp.results import _clean

    def key(ex_id) -> str:  # ids may be dicts (MultiRC's idx)
        return json.dumps(ex_id, sort_keys=True, default=str)

    position = {key(ex.id): i for i, ex in enumerate(examples)}
    records = sorted(records, key=lambda r: position.get(key(r["id"]), len(position)))
    path = Path(run_dir) / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(_clean(rec), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _scheduler(optimizer, kind: str, steps: int):
    if kind == "constant":
        return None
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    raise ValueError(f"run.lr_schedule must be constant or linear, not {kind!r}")
