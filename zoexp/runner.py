"""The experiment loop: setup -> train (dev eval every N steps, keep the best by dev) -> test -> one row.

``run(cfg)`` is the whole experiment; the command-line entry point only calls it. ``run`` decides where
the run starts (a fresh directory, a checkpoint to continue, a finished run to return) and records the
row whatever happens; ``Experiment`` is the recipe itself -- ``setup()``, ``train()``, ``test()`` -- with
its settings (``Settings``) read once and the loop's state in one ``TrainState``. The parts it is built
from live in ``zoexp.training``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from zoexp import distributed, resume, validate
from zoexp.closure import Counters, make_closure, seed_everything
from zoexp.evaluation import evaluate
from zoexp.icl import with_demonstrations
from zoexp.loggers import MetricsLogger, learning_rate, memory_peaks
from zoexp.measure import Meter, device_name
from zoexp.methods import META_KEYS, build_method
from zoexp.models import count_params, load_model, model_devices, resolve_device, resolve_dtype
from zoexp.provenance import method_code_version
from zoexp.results import LOSS_ROSE, append_row, git_commit, loss_rise, versions
from zoexp.resume import Checkpointer, Preempted, PreemptionGuard
from zoexp.scoring import Encoder
from zoexp.tasks import Example, Task
from zoexp.training import (
    BatchSampler,
    BestWeights,
    Diverged,
    accumulation_steps,
    check_lr_schedule,
    lr_scheduler,
    progress_display,
    training_loss,
)

log = logging.getLogger(__name__)


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
    # data parallel when launched by torchrun (zoexp.distributed); continue a checkpoint of
    # the run directory if there is one, or return the row of a run that already finished there
    # (zoexp.resume) -- only for a directory given explicitly (the CLI's, or run.dir), never the cwd
    dist = distributed.setup(cfg, resolve_device(cfg.run.device))
    finished = False
    try:
        run_dir = dist.shared_run_dir(run_dir)
        start = resume.resume_point(cfg, run_dir, dist) if given else resume.ResumePoint(run_dir)
        if start.finished is not None:
            log.info("%s already finished (status %s); nothing to do", start.run_dir, start.finished["status"])
            row = start.finished
        else:
            row = _run_and_record(cfg, start, dist, keep_result=bool(given))
        finished = True
        return row
    finally:
        resume.unlock_run_dir(run_dir)
        dist.close(barrier=finished)  # the process group ends with the run (no barrier after a failure)


def _run_and_record(cfg: DictConfig, start: resume.ResumePoint, dist, keep_result: bool = True) -> dict:
    run_dir = start.run_dir
    row = base_row(cfg, run_dir)
    row["status"] = "starting"  # until set up: a bad value, missing data or model is a user error, no row
    if start.skipped:  # corrupt checkpoints passed over; none left: the run started over
        row.update({"resume/skipped_checkpoints": list(start.skipped),
                    "resume/started_over": start.checkpoint is None})
    row["config_fingerprint"] = resume.fingerprint(resume.run_identity(cfg))  # what resume compares
    device = dist.device
    meter = Meter(device)
    row["device"] = device_name(device)
    row["threads"] = torch.get_num_threads()  # intra-op threads: wall-clock means little without it
    guard = PreemptionGuard()
    dist.local_stop = lambda: guard.requested
    t_start = time.perf_counter()
    try:
        with guard:
            Experiment(cfg, run_dir, meter, row, dist, start, guard).run()
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
        shutil.rmtree(run_dir / resume.CHECKPOINTS, ignore_errors=True)  # no longer needed
    if guard.requested:  # a signal the test evaluation deferred: its row is written; stop (a sweep too)
        guard.chain()
        raise Preempted(guard.signum, None, None, where=guard.deferred_phase,
                        saved=f"the run finished first and its row is written (status {row['status']})")
    return row


def _finish(cfg: DictConfig, row: dict, meter: Meter, t_start: float, dist, collective: bool = True,
            result_dir: Path | None = None) -> None:
    row.update(meter.values)
    row["time/total_s"] = time.perf_counter() - t_start
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if collective:  # wall-clock and memory: the maximum over ranks
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


@dataclass(frozen=True)
class Settings:
    """The ``run.*`` values the loop reads, read from the config once (``zoexp.validate`` has checked them)."""

    seed: int
    steps: int              # 0 for a method that does not train
    batch_size: int
    eval_batch_size: int
    eval_every: int         # 0 in the config: once, after the last step
    log_every: int
    lr_schedule: str
    keep_best: str
    save_best: bool
    test_final: bool        # also test the weights after the last step (test_final/<metric>)
    save_predictions: bool
    progress: bool          # the live display (main process only)
    eval_at_start: bool
    eval_share_prompts: bool
    eval_prefix_cache: bool
    offload: bool
    offload_ring: int
    max_length: int | None  # None: the model's max_position_embeddings
    max_new_tokens: int | None  # None: the task's

    @classmethod
    def from_config(cls, cfg: DictConfig, trains: bool, is_main: bool = True) -> Settings:
        run = cfg.run
        steps = int(run.steps) if trains else 0
        max_new = run.get("max_new_tokens")
        settings = cls(
            seed=int(run.seed), steps=steps, batch_size=int(run.batch_size),
            eval_batch_size=int(run.eval_batch_size),
            eval_every=int(run.eval_every) or steps, log_every=max(1, int(run.log_every)),
            lr_schedule=str(run.lr_schedule), keep_best=str(run.keep_best),
            save_best=bool(run.get("save_best", False)), test_final=bool(run.get("test_final", False)),
            save_predictions=bool(run.get("save_predictions", False)),
            progress=bool(run.get("progress", True)) and is_main, eval_at_start=bool(run.get("eval_at_start", False)),
            eval_share_prompts=bool(run.get("eval_share_prompts", True)),
            eval_prefix_cache=bool(run.get("eval_prefix_cache", True)),
            offload=bool(run.get("offload", False)), offload_ring=int(run.get("offload_ring", 3)),
            max_length=int(run.max_length) if run.get("max_length") else None,
            max_new_tokens=int(max_new) if max_new is not None else None,
        )
        check_lr_schedule(settings.lr_schedule)
        return settings


@dataclass
class TrainState:
    """What the training loop carries from one step to the next; a checkpoint saves it whole."""

    step: int = 0
    t_train: float = 0.0                               # seconds inside optimizer.step
    window: list[float] = field(default_factory=list)  # losses since the last logged point
    max_state: int = 0                                 # the optimizer's largest state, in bytes
    best_value: float = -math.inf                      # best dev metric so far, and where
    best_step: int | None = None
    best_metrics: dict | None = None
    last_dev_step: int | None = None                   # step of the last dev evaluation
    counters: Counters = field(default_factory=Counters)

    def state_dict(self) -> dict:
        return {"step": self.step, "t_train": self.t_train, "window": list(self.window),
                "max_state": self.max_state, "counters": dict(vars(self.counters)),
                "best": {"value": self.best_value, "step": self.best_step, "metrics": self.best_metrics},
                "last_dev_step": self.last_dev_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.t_train = int(state["step"]), float(state["t_train"])
        self.window, self.max_state = list(state["window"]), int(state["max_state"])
        for key, value in state["counters"].items():  # the closure holds this Counters object: fill it in place
            setattr(self.counters, key, value)
        best = state["best"]
        self.best_value, self.best_step, self.best_metrics = best["value"], best["step"], best["metrics"]
        self.last_dev_step = state.get("last_dev_step", state.get("evaluated_at"))  # older checkpoints


# the row of a method that does not train (zero-shot, ICL)
UNTRAINED = {"steps": 0, "trainable_params": 0, "forward_passes_per_step": 0, "optimizer_state_bytes": 0,
             "optimizer_grad_bytes_max": 0}


class Experiment:
    """One run as a recipe: ``setup()`` (data, model, method), ``train()``, ``test()``.

    The result row (``row``) is filled in as the run goes, so that a run which fails part-way still
    writes what it had. Data parallelism (``dist``, zoexp.distributed) enters in a few named places: the
    closure of a batch (``closure_for``), whether to stop (``should_stop``), and the checkpoints
    (``save_checkpoint`` / ``load_checkpoint``, zoexp.resume).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, meter: Meter, row: dict, dist, start: resume.ResumePoint,
                 guard: PreemptionGuard):
        self.cfg, self.run_dir, self.meter, self.row = cfg, run_dir, meter, row
        self.dist, self.start, self.guard = dist, start, guard
        self.device = dist.device
        self.state = TrainState()
        self.final_result: dict | None = None  # the final weights' test result, where they are not the tested ones

    def run(self) -> None:
        self.setup()
        if self.optimizer is not None:
            self.train()
        else:
            self.row.update(UNTRAINED)
        self.test()

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.settings = s = Settings.from_config(cfg, trains=bool(cfg.method.get("_target_")), is_main=dist.is_main)
        seed_everything(s.seed)
        # settings that cannot work together, and a logger whose package is missing, stop the run here
        self.accumulation = accumulation_steps(cfg, dist.world_size if dist.enabled else 1)
        self.metrics = MetricsLogger(self.run_dir, cfg.get("logger"), OmegaConf.to_container(cfg, resolve=True),
                                     enabled=dist.is_main and bool(cfg.method.get("_target_")),
                                     console=not s.progress, total_steps=int(cfg.run.steps))
        self._setup_data()
        self._setup_model()
        self._setup_method()
        self.bar = progress_display(s.progress)  # one live display for the whole run: training and eval bars

    def _setup_data(self) -> None:
        self.task = task = Task.from_config(self.cfg.task)
        data_dir = self.cfg.get("data_dir")
        with self.meter.phase("data"):
            self.data = data = task.sample(self.settings.seed, data_dir=data_dir)
        self.row.update({"data/train": len(data.train), "data/dev": len(data.dev), "data/test": len(data.test),
                         "data/notes": data.notes, "data/splits": data.splits,
                         "data/source": str(data_dir) if data_dir else "hub"})
        _record_provenance(self.row, task, data_dir)
        self.loss_kind = training_loss(self.cfg, task)
        # in-context learning (method=icl): the first k train examples as demonstrations before every
        # evaluated example (zoexp/icl.py); evaluation only, training never sees them
        self.demos = data.train[: int(self.cfg.method.get("demonstrations") or 0)]
        if self.demos:
            self.row["icl/demonstrations_requested"] = int(self.cfg.method.demonstrations)
        self.max_new = self.settings.max_new_tokens if self.settings.max_new_tokens is not None \
            else task.max_new_tokens

    def _setup_model(self) -> None:
        from zoexp.memory import check_fits

        cfg, s, row = self.cfg, self.settings, self.row
        check_fits(cfg, self.device, row)  # on CUDA: stop now if the predicted peak exceeds the free memory
        with self.meter.phase("load"):  # offloaded runs load on the host; enable_offload moves the rest
            self.model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.run.dtype),
                                               device=torch.device("cpu") if s.offload else self.device)
        row["model_params"] = count_params(self.model)
        devices = model_devices(self.model)  # several with model.device_map
        if len(devices) > 1:
            row["model_devices"] = [str(d) for d in devices]
            self.meter.devices = devices
        self.dist.check_replicas(self.model)
        max_length = s.max_length or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.encoder = Encoder(tokenizer, max_length=max_length)
        self.pad_id = tokenizer.pad_token_id

    def _setup_method(self) -> None:
        cfg, s, row = self.cfg, self.settings, self.row
        self.optimizer = optimizer = build_method(cfg.method, self.model, seed=s.seed)
        validate.check_active_blocks(cfg.method, optimizer)  # never silently fewer blocks than the row says
        if s.offload:
            from zoexp.offload import enable_offload

            offloader = enable_offload(self.model, optimizer, self.device, ring=s.offload_ring)
            row.update(offloader.device_bytes())
        if optimizer is None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        row.update({"trainable_params": sum(p.numel() for p in params),
                    "forward_passes_per_step": optimizer.forward_passes_per_step})
        # the +- losses of a ZO step are summed over `accumulation` micro-batches (LossClosure)
        world = self.dist.world_size if self.dist.enabled else 1
        per_rank = min(s.batch_size, len(self.data.train)) // world
        row.update({"train/accumulation_steps": self.accumulation,
                    "train/micro_batch_size": -(-per_rank // self.accumulation)})
        self.keeper = BestWeights(self.model, s.keep_best, self.run_dir, name=self.dist.best_file(), params=params)
        self.scheduler = lr_scheduler(optimizer, s.lr_schedule, s.steps)
        self.sampler = BatchSampler(len(self.data.train), s.batch_size, s.seed)
        self.state.max_state = optimizer.state_bytes()
        self.dist.sync_gradients(optimizer)  # first-order parts all-reduce their gradients across processes
        self.checkpointer = Checkpointer(self.run_dir, cfg, self.dist)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        s, st, optimizer = self.settings, self.state, self.optimizer
        self.row["status"] = "running"  # set up: from here on a failure is a `failed` run with its row
        with self.bar, self.guard.armed(), self.metrics.closed_on_error():
            if self.start.checkpoint is not None:  # continue where the checkpoint left off
                self.load_checkpoint(self.start.checkpoint)
            elif s.eval_at_start and self.data.dev:
                self.dev_eval()
            first_step = st.step
            self.metrics.start(resume_step=st.step)
            self.model.train(optimizer.train_mode)
            job = self.bar.add_task(f"{self.cfg.method.name} train", total=s.steps, completed=st.step, info="")
            while st.step < s.steps:
                # segments end at dev evaluations and checkpoints, which run outside the train phase
                segment_end = min(s.steps, (st.step // s.eval_every + 1) * s.eval_every,
                                  self.checkpointer.next_due(st.step, s.steps))
                with self.meter.phase("train"):
                    while st.step < segment_end and not self.should_stop():
                        loss = self.train_step([self.data.train[i] for i in self.sampler.next()])
                        self.bar.update(job, advance=1, info=f"loss {loss:.4f}  {st.t_train / st.step:.2f} s/step")
                if self.should_stop():  # preemption: save now; a due dev eval runs after resuming
                    raise Preempted(self.guard.signum, st.step, self.save_checkpoint())
                self.maybe_evaluate()
                self.maybe_checkpoint()
        self.model.eval()
        optimizer.flush()
        self.row.update(self.train_fields(first_step))
        if s.test_final and self.keeper.saved and st.best_step != st.step:  # else the tested weights are these
            self.final_result = self.test_evaluation("the final weights' test evaluation", "test_final")
        self.keeper.restore()

    def train_step(self, batch: list[Example]) -> float:
        """One optimizer step on ``batch``; logs the mean loss every ``log_every`` steps."""
        st = self.state
        closure = self.closure_for(batch)
        t0 = time.perf_counter()
        loss = float(self.optimizer.step(closure))
        st.t_train += time.perf_counter() - t0
        st.step += 1
        if not math.isfinite(loss):
            raise Diverged(st.step, loss)
        if self.scheduler is not None:
            self.scheduler.step()
        st.max_state = max(st.max_state, self.optimizer.state_bytes())
        st.window.append(loss)
        if st.step % self.settings.log_every == 0 or st.step == self.settings.steps:
            self.log_train()
        return loss

    def closure_for(self, batch: list[Example]):
        """The loss closure of this process's part of the global ``batch`` (weighted across processes)."""
        shard = self.dist.shard(batch)
        closure = make_closure(self.model, self.encoder, shard, self.pad_id, self.state.counters,
                               self.loss_kind, self.accumulation)
        closure = self.dist.wrap_closure(closure, distributed.loss_weight(self.encoder, shard, self.loss_kind),
                                         distributed.loss_weight(self.encoder, batch, self.loss_kind))
        closure.accumulation_steps = self.accumulation  # HZO's FO step reads it through the wrapper
        return closure

    def should_stop(self) -> bool:
        """A preemption signal reached this process (or, data-parallel, any process)."""
        return self.dist.stop_requested()

    def log_train(self) -> None:
        st, counters = self.state, self.state.counters
        point = {"step": st.step, "loss": sum(st.window) / len(st.window), "train_time_s": st.t_train,
                 **self.optimizer.metrics()}
        counters.curve.append(point)
        st.window.clear()
        rss, gpu = memory_peaks(self.device)
        self.metrics.log_train(st.step, {"loss": point["loss"], "lr": learning_rate(self.optimizer),
                                         "proj_grad": point.get("proj_grad"),
                                         "forward_passes": counters.forward_passes, "tokens": counters.tokens,
                                         "train_time_s": st.t_train, "rss_peak_bytes": rss,
                                         "gpu_allocated_peak_bytes": gpu})

    def dev_due(self, step: int) -> bool:
        s = self.settings
        return bool(self.data.dev) and (step % s.eval_every == 0 or step == s.steps) \
            and self.state.last_dev_step != step

    def maybe_evaluate(self) -> None:
        if self.dev_due(self.state.step):
            self.model.eval()
            self.dev_eval()
            self.model.train(self.optimizer.train_mode)

    def maybe_checkpoint(self) -> None:
        if self.checkpointer.due(self.state.step, self.settings.steps):
            self.save_checkpoint()

    def dev_eval(self) -> None:
        """Evaluate on the dev set now; the best weights by dev metric are kept (``run.keep_best``)."""
        st, metric = self.state, self.task.metric
        self.optimizer.flush()  # deferred (offloaded) updates land before the weights are evaluated
        result = self.evaluate(self.data.dev, "dev")
        st.counters.dev_curve.append({"step": st.step, metric: result[metric], "train_time_s": st.t_train})
        self.metrics.log_eval(st.step, "dev", result)
        log.info("step %d dev %s = %.4f", st.step, metric, result[metric])
        if result[metric] > st.best_value:
            st.best_value, st.best_step, st.best_metrics = result[metric], st.step, result
            self.keeper.save()
        st.last_dev_step = st.step

    def save_checkpoint(self) -> Path:
        """Everything the loop needs to continue the identical trajectory (zoexp.resume)."""
        trainer = {**self.state.state_dict(), "sampler": self.sampler.state_dict(),
                   "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        with self.meter.phase("checkpoint"):
            return self.checkpointer.save(self.state.step, self.model, self.optimizer, trainer, self.keeper)

    def load_checkpoint(self, path: Path) -> None:
        """The loop's state from checkpoint ``path``; a dev evaluation the stopped run owed runs now."""
        trainer = self.checkpointer.restore(path, self.model, self.optimizer, self.keeper)
        self.sampler.load_state_dict(trainer["sampler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(trainer["scheduler"])
        self.state.load_state_dict(trainer)
        step = self.state.step
        self.row.update(resumed_from_step=step, resumed_from=str(path))
        log.info("resumed from %s (step %d)", path, step)
        if step and self.dev_due(step):
            self.dev_eval()

    def train_fields(self, first_step: int) -> dict:
        """The row's training results (after the last step)."""
        st, optimizer, metric = self.state, self.optimizer, self.task.metric
        tokens = int(self.dist.sum(st.counters.tokens))  # all processes' shards
        fields = {
            "steps": self.settings.steps,
            "train/loss_kind": self.loss_kind,
            "train/final_loss": st.counters.curve[-1]["loss"] if st.counters.curve else None,
            "train/time_per_step_s": st.t_train / max(self.settings.steps, 1),
            "optimizer_state_bytes": optimizer.state_bytes(),
            "optimizer_state_bytes_max": st.max_state,
            "optimizer_grad_bytes_max": getattr(optimizer, "grad_bytes_max", 0),
            **(optimizer.row_fields() if hasattr(optimizer, "row_fields") else {}),
            "forward_passes": st.counters.forward_passes,
            "tokens": tokens,
            "tokens_per_s": tokens / st.t_train if st.t_train else None,
            "curve": st.counters.curve,
            "dev_curve": st.counters.dev_curve,
            f"dev/{metric}": st.best_value if st.best_step is not None else None,
            "best_step": st.best_step,
            **self.dist.row_fields(st.step - first_step),
        }
        rise = loss_rise(st.counters.curve)
        fields["train/loss_rise"] = rise  # last logged loss / first: above LOSS_ROSE the run was diverging
        if rise is not None and rise > LOSS_ROSE:
            first, last = st.counters.curve[0], st.counters.curve[-1]
            log.warning("the training loss rose %.1fx, from %.4g at step %s to %.4g at step %s: the run is diverging "
                        "(a smaller learning rate or eps usually helps)",
                        rise, first["loss"], first["step"], last["loss"], last["step"])
        if self.checkpointer.saves:
            fields.update({"checkpoints_written": self.checkpointer.saves,
                           "checkpoint_bytes": self.checkpointer.saved_bytes})
        return fields

    # ------------------------------------------------------------------------------------------ test
    def test_evaluation(self, phase: str, split: str) -> dict:
        """Evaluate the test set on the model's weights now, ``split`` naming it in the logs and metrics."""
        self.encoder.reset_truncated()  # count the test set's truncated prompts only
        # a first signal lets the test evaluation finish: its row is the result (the runner stops after it)
        with self.bar, self.guard.armed(phase, "finishing it and writing the row"), self.metrics.closed_on_error():
            result = self.evaluate(self.data.test, split)
        self.metrics.log_eval(self.settings.steps, split, result)
        return result

    def test(self) -> None:
        row, metric, encoder = self.row, self.task.metric, self.encoder
        row["status"] = "running"
        result = self.test_evaluation("the test evaluation", "test")
        if self.settings.test_final and self.optimizer is not None:
            # the weights after the last step: tested apart where the best-by-dev step was earlier (train())
            final = self.final_result or result
            row.update({f"test_final/{metric}": final.get(metric), "test_final/step": self.settings.steps})
        self.metrics.close({f"test/{metric}": result.get(metric), f"dev/{metric}": row.get(f"dev/{metric}")})
        for key, value in result.items():
            row[f"test/{key}" if key != "n" else "test/n"] = value
        row["eval/truncated_examples"] = encoder.truncated
        if encoder.truncated:
            log.warning("%d test prompts were longer than %d tokens and lost text from the left of their passage",
                        encoder.truncated, encoder.max_length)
        row["eval/max_length"] = encoder.max_length
        if self.optimizer is not None:
            self.keeper.cleanup(keep=self.settings.save_best)
        log.info("test %s = %.4f", metric, result[metric])
        if self.final_result is not None:
            log.info("test %s of the final weights (step %d; the tested ones are from step %s) = %.4f", metric,
                     self.settings.steps, row.get("best_step"), self.final_result[metric])

    def evaluate(self, examples: list[Example], split: str) -> dict:
        """Score ``examples`` (each process its shard); on the test split also the predictions and timing."""
        s, row = self.settings, self.row
        if self.demos:
            examples, stats = with_demonstrations(self.encoder, examples, self.demos,
                                                  reserve=self.max_new if self.task.type == "generation" else 0)
            row.update({k if split == "test" else f"{k}_{split}": v for k, v in stats.items()})
        keep = s.save_predictions and split == "test"

        def score(shard) -> dict:
            job = self.bar.add_task(f"{split} eval", total=len(shard), info="")
            records = [] if keep else None
            try:
                with self.meter.phase("eval"):
                    result = evaluate(self.model, self.encoder, self.task, shard, batch_size=s.eval_batch_size,
                                      progress=lambda n: self.bar.advance(job, n), max_new_tokens=self.max_new,
                                      share_prompts=s.eval_share_prompts, prefix_cache=s.eval_prefix_cache,
                                      predictions=records)
                return {**result, "predictions": records} if keep else result
            finally:
                self.bar.remove_task(job)

        t0 = time.perf_counter()
        result = self.dist.evaluate(score, examples)
        if keep:
            records = result.pop("predictions", None) or []
            if self.dist.is_main:
                row["predictions_file"] = str(write_predictions(self.run_dir, records, examples))
        if split == "test":
            seconds = time.perf_counter() - t0
            row.update({"eval/test_s": seconds, "eval/test_examples_per_s": len(examples) / max(seconds, 1e-9)})
        return result


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
