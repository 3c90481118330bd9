"""Hydra sweeper for zoexp's reproduction sweeps: ``zoexp -m experiment=focus_table3 profile=cpu``.

Hydra's basic sweeper runs one cartesian product; a paper table is a union of products (each method
has its own grid, some tasks their own learning rates). This sweeper reads the composed config's
``sweep`` section (see ``zoexp.sweep``), expands it for ``profile`` and hands the jobs to the configured
launcher (basic: in this process, one after the other; joblib / submitit: in parallel or on a cluster).

Command-line overrides apply to every job: ``method=``, ``task=`` and ``model=`` (one value or a
comma list) keep only the matching cells; any other ``key=value`` replaces the table's value and a
``key=a,b`` multiplies the jobs. Jobs that already have an ``ok`` row in the results file are skipped
(``hydra.sweeper.skip_done=false`` re-runs them), so an interrupted table resumes where it stopped.
A job that computes what a finished job of another table's sweep computed (``zoexp.sweep.computation_key``:
in the cpu profile one model stands for several paper models) is not run again: that row is copied into
this table's results file with ``same_run`` naming the run (``hydra.sweeper.share_runs=false`` runs it).
``hydra.sweeper.dry_run=true`` lists the jobs and runs nothing; ``hydra.sweeper.strict=true`` fails
when a cell's method/task/model config is missing (default: skip those cells and say so).
"""

# No `from __future__ import annotations`: Hydra imports plugin modules without registering them in
# sys.modules, and dataclasses cannot resolve string annotations then.
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Command-line keys that select among the table's jobs instead of overriding them (key -> Job attribute).
# `cell.variant` is one: as an override it would relabel every job's row with the given variant.
FILTER_KEYS = {"method": "method", "task": "task", "model": "model", "cell.variant": "variant"}


@dataclass
class TableSweeperConf:
    _target_: str = "hydra_plugins.zoexp_sweeper.zoexp_sweeper.TableSweeper"
    max_batch_size: Any = None  # jobs per launcher call (None: all at once)
    dry_run: bool = False  # list the jobs, run nothing
    skip_done: bool = True  # skip jobs that already have an ok row in run.results_file
    strict: bool = False  # fail (instead of skipping) when a cell's method/task/model config is missing
    validate: bool = True  # compose every job's config before launching any (fail fast on a bad override)
    share_runs: bool = True  # copy the row of another table's finished job that computes the same thing


ConfigStore.instance().store(group="hydra/sweeper", name="zoexp_table", node=TableSweeperConf, provider="zoexp")


class TableSweeper(Sweeper):
    def __init__(self, max_batch_size=None, dry_run: bool = False, skip_done: bool = True, strict: bool = False,
                 validate: bool = True, share_runs: bool = True):
        super().__init__()
        self.max_batch_size = max_batch_size
        self.dry_run, self.skip_done, self.strict = bool(dry_run), bool(skip_done), bool(strict)
        self.validate, self.share_runs = bool(validate), bool(share_runs)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def job_overrides(self, arguments: list[str]):
        """The override list of every job to launch, the rows of other tables' runs to copy instead of
        running (``zoexp.sweep.shared_row``), and a printable plan."""
        from zoexp.sweep import (
            SweepError,
            _bare,
            computation_key,
            describe,
            done_jobs,
            expand,
            finished_elsewhere,
            job_id,
            job_key,
            job_override,
            shared_row,
        )

        cfg = self.config
        if cfg.get("sweep") is None:
            raise HydraException("the zoexp_table sweeper needs an experiment config with a `sweep` section "
                                 "(zoexp -m experiment=<table> profile=<paper|cpu|smoke>)")
        name, profile = cfg.get("experiment_name"), cfg.get("profile")
        try:
            plan = expand(cfg.sweep, str(profile), data_dir=cfg.get("data_dir"))
        except SweepError as exc:
            raise HydraException(f"{name}: {exc}") from exc
        if self.strict and plan.skipped:
            raise HydraException(describe(plan, name, profile) + "\n(hydra.sweeper.strict=true)")

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        filters: dict[str, set[str]] = {}
        fixed: list[str] = []
        swept: dict[str, list[str]] = {}
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else None
            if _bare(key) in FILTER_KEYS:
                filters[_bare(key)] = set(values or [override.get_value_element_as_str()])
            elif values is not None:
                swept[_bare(key)] = [f"{key}={v}" for v in values]
            else:
                fixed.append(override.input_line)
        user_keys = {_bare(o.split("=", 1)[0]) for o in fixed} | set(swept)

        def value(job, key):  # as the override parser gives it: unquoted, None as "null"
            attr = getattr(job, FILTER_KEYS[key])
            return "null" if attr is None else str(attr)

        def job_lists(plan, table):  # (job, overrides) of a plan, as a sweep of `table` with this command line
            fixed_here = [o.split("=", 1)[0] + f"={table}" if _bare(o.split("=", 1)[0]) == "experiment" else o
                          for o in fixed]
            for job in plan.jobs:
                own = [v for k, v in job.overrides().items() if k not in user_keys]
                for combo in itertools.product(*swept.values()):
                    yield job, [*fixed_here, *own, *combo]

        jobs = [j for j in plan.jobs if all(value(j, k) in v for k, v in filters.items())]
        done = done_jobs(cfg.run.results_file) if self.skip_done else set()
        elsewhere = {}
        if self.skip_done and self.share_runs:
            elsewhere = finished_elsewhere(name, str(profile), str(cfg.results_dir),
                                           lambda p, table: (o for _, o in job_lists(p, table)))
        out, shared, n_done, seen = [], [], 0, set()
        for job, overrides in job_lists(type(plan)(jobs, plan.skipped), name):
            key = job_key(overrides)
            if key in seen:  # a command-line value replaced what told two jobs apart
                continue
            seen.add(key)
            if job_id(key) in done:
                n_done += 1
                continue
            source = elsewhere.get(computation_key(overrides))
            if source is not None:
                cell = {"model_role": job.role, "variant": job.variant, "job": key}
                shared.append(shared_row(source[1], source[0], name, cell))
                continue
            out.append([*overrides, job_override(key)])
        text = describe(plan, name, profile)
        if filters:
            text += f"\n  command-line filter {filters}: {len(jobs)} of {len(plan.jobs)} jobs kept"
        if n_done:
            text += f"\n  {n_done} job(s) already have an ok row in {cfg.run.results_file} (skipped)"
        if shared:
            tables = sorted({r["same_run"]["experiment"] for r in shared})
            text += (f"\n  {len(shared)} job(s) compute what finished jobs of {', '.join(tables)} computed: "
                     + ("their rows would be copied" if self.dry_run else "their rows are copied")
                     + " instead of running them again (hydra.sweeper.share_runs=false runs them)")
        text += f"\n  to launch: {len(out)} job(s); rows -> {cfg.run.results_file}"
        return out, shared, text

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        from zoexp.results import append_row

        jobs, shared, text = self.job_overrides(arguments)
        log.info(text)
        if self.dry_run:
            for i, overrides in enumerate(jobs):
                print(f"#{i}: {' '.join(overrides)}")
            return []
        for row in shared:
            append_row(str(self.config.run.results_file), row)
        if not jobs:
            return []
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        size = int(self.max_batch_size or len(jobs))
        returns, start = [], 0
        while start < len(jobs):
            batch = jobs[start:start + size]
            if self.validate:
                self.validate_batch_is_legal(batch)
            returns.append(self.launcher.launch(batch, initial_job_idx=start))
            start += len(batch)
        return returns
