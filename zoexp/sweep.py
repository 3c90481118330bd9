"""Reproduction sweeps: a paper table's cells x a profile's hyperparameter grid -> Hydra jobs.

An experiment config (``conf/experiment/<table>.yaml``, package ``_global_``) holds a ``sweep`` section:

    sweep:
      table: focus_table3            # zoexp/paper_tables/focus_table3.yaml: layout + published numbers
      cells:                         # union of products (methods x tasks x models x variants)
        - {methods: [mezo, focus], tasks: [sst2, rte], models: [opt-1.3b]}
      profiles:
        cpu:
          models: {opt-1.3b: smollm2-135m}   # paper model (role) -> conf/model option; null = not run
          seeds: [0]
          common: {run.steps: 60}            # every job
          methods: {mezo: {method.lr: [1e-5, 7e-5]}}   # per method; a list is a grid axis
          roles: {llama-2-7b: {run.batch_size: 1}}     # per model role, every method
          tasks: {squad: {run.max_new_tokens: 16}}    # per task, every method
          variants: {k16: {task.k_shot: 16}}         # per cell variant (null: not run in this profile)
          method_tasks: {mezo@squad: {method.lr: [1e-6]}, hzo@k512: {method.lr: 2e-7}}  # method@task|variant

Settings merge in that order (later wins); list values are grid axes, swept as a product, times the
seeds (a setting whose value is itself a list is a one-point axis: ``method.target_modules: [[query, value]]``). ``expand`` turns the spec into jobs (Hydra override lists); the Hydra sweeper plugin
``hydra_plugins/zoexp_sweeper`` launches them through the configured launcher, so
``zoexp -m experiment=focus_table3 profile=cpu`` runs a table, locally or on a cluster.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoexp.paths import conf_dir, tasks_dir

PROFILES = ("paper", "cpu", "smoke")
_SECTIONS = ("common", "methods", "roles", "tasks", "variants", "method_tasks")


class SweepError(ValueError):
    pass


@dataclass
class Job:
    method: str
    task: str
    role: str
    model: str
    variant: str | None
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)  # key -> value (one grid point, fixed values)

    def overrides(self) -> dict[str, str]:
        """Hydra overrides (key -> "key=value"); the sweeper adds ``cell.job`` (a hash of the final list)."""
        out = {
            "method": f"method={self.method}",
            "task": f"task={self.task}",
            "model": f"model={self.model}",
        }
        for key, value in self.settings.items():
            out[_bare(key)] = f"{key}={format_value(value)}"
        out["run.seed"] = f"run.seed={self.seed}"
        out["cell.model_role"] = f"cell.model_role={format_value(self.role)}"
        out["cell.variant"] = f"cell.variant={format_value(self.variant)}"
        return out

    def key(self) -> str:
        return job_key(self.overrides().values())


# settings that change how a run is shown or where its files go, never its result: not part of a job's identity,
# so `make reproduce-... PROFILE=cpu` skips a job done earlier with run.progress=false (or another logger)
PRESENTATION = ("cell.job", "run.progress", "logger", "hydra.", "results_dir")


def job_key(overrides: Iterable[str]) -> str:
    """Identity of a job (its override list, order-free, without ``PRESENTATION`` settings): what a re-run
    skips when it is done."""
    text = json.dumps(sorted(_bare(o) for o in overrides if not _bare(o).startswith(PRESENTATION)))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _bare(key: str) -> str:
    return key.lstrip("+~")


_SIMPLE = re.compile(r"^[A-Za-z0-9_.\-/@:]+$")


def format_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _SIMPLE.match(text) and text.lower() not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def load_sweep(name: str) -> dict:
    """The ``sweep`` section of ``conf/experiment/<name>.yaml`` (read as data, not composed)."""
    path = conf_dir() / "experiment" / f"{name}.yaml"
    if not path.is_file():
        raise SweepError(f"no experiment {name!r}; available: {', '.join(experiment_names())}")
    cfg = OmegaConf.load(path)
    if "sweep" not in cfg:
        raise SweepError(f"{path} has no `sweep` section")
    return OmegaConf.to_container(cfg.sweep, resolve=False)


def as_dict(spec: Any) -> dict:
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=False)
    return dict(spec)


def profile_spec(spec: dict, profile: str) -> dict:
    profiles = spec.get("profiles") or {}
    if profile not in profiles:
        raise SweepError(f"profile {profile!r} is not defined for this table; choose one of {', '.join(profiles)}")
    prof = profiles[profile] or {}
    unknown = set(prof) - {"models", "seeds", *_SECTIONS}
    if unknown:
        raise SweepError(f"profile {profile}: unknown keys {sorted(unknown)}")
    return prof


def available(kind: str, name: str) -> bool:
    """Whether a method / task / model config exists in this install."""
    if kind == "task":
        return (tasks_dir() / f"{name}.yaml").is_file()
    return (conf_dir() / kind / f"{name}.yaml").is_file()


def has_local_data(task: str, data_dir) -> bool:
    """Whether ``data_dir`` holds the task's folder (True when there is no data_dir: the hub is used)."""
    if not data_dir:
        return True
    local = ((OmegaConf.load(tasks_dir() / f"{task}.yaml").get("source") or {}).get("local")) or task
    return (Path(str(data_dir)) / local).is_dir()


def missing_data(task: str, data_dir) -> str | None:
    """Why a cell of ``task`` cannot run here for want of data (the sweep skips it, the report does not owe
    it), or None."""
    return None if has_local_data(task, data_dir) else f"no data for task {task} in {data_dir}"


def _listify(values) -> list:
    if values is None:
        return [None]
    return list(values) if isinstance(values, list | tuple) else [values]


def cell_keys(spec: dict) -> Iterable[tuple[str, str, str, str | None]]:
    """(method, task, model role, variant) of every cell the sweep declares, in order, without repeats."""
    seen = set()
    for cell in spec.get("cells") or []:
        for combo in itertools.product(_listify(cell.get("methods")), _listify(cell.get("tasks")),
                                       _listify(cell.get("models")), _listify(cell.get("variants"))):
            if combo not in seen:
                seen.add(combo)
                yield combo


def settings_for(prof: dict, method: str, task: str, variant: str | None, role: str | None = None) -> dict:
    merged: dict[str, Any] = {}
    for section, name in (("common", None), ("methods", method), ("roles", role), ("tasks", task),
                          ("variants", variant), ("method_tasks", f"{method}@{task}"),
                          ("method_tasks", f"{method}@{variant}")):
        block = prof.get(section) or {}
        if section != "common":
            if name is None or (section == "method_tasks" and name.endswith("@None")):
                continue
            if section == "variants" and name not in block:
                raise SweepError(f"variant {name!r} is used by a cell but not defined in the profile's `variants`")
            block = block.get(name) or {}
        for key, value in block.items():
            # a later section replaces a key however it was prefixed (+key / ++key / key)
            for old in [k for k in merged if _bare(k) == _bare(key)]:
                del merged[old]
            merged[key] = value
    return merged


@dataclass
class SweepJobs:
    """A table's sweep expanded under one profile: the jobs to run and the cells skipped, by reason."""

    jobs: list[Job]
    skipped: dict[str, int]  # reason -> number of cells


def expand(spec: Any, profile: str, check_available: bool = True, data_dir=None) -> SweepJobs:
    """Every job of ``spec`` (a ``sweep`` section) under ``profile``; cells whose method/task/model config
    does not exist here, whose task has no folder in ``data_dir`` (when given), or whose model role the
    profile does not run, are skipped (and counted)."""
    spec = as_dict(spec)
    prof = profile_spec(spec, profile)
    models = prof.get("models") or {}
    seeds = [int(s) for s in _listify(prof.get("seeds", [0]))]
    jobs: list[Job] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for method, task, role, variant in cell_keys(spec):
        if role not in models:
            raise SweepError(f"model role {role!r} has no entry in profile {profile!r} `models` (null = not run)")
        model = models[role]
        if model is None:
            skip(f"model {role} is not run in the {profile} profile")
            continue
        if variant is not None and variant in (prof.get("variants") or {}) and prof["variants"][variant] is None:
            skip(f"variant {variant} is not run in the {profile} profile")
            continue
        if check_available:
            missing = [f"{kind} {name}" for kind, name in
                       (("method", method), ("task", task), ("model", model)) if not available(kind, name)]
            if missing:
                skip("no config here for " + ", ".join(missing))
                continue
            reason = missing_data(task, data_dir)
            if reason:
                skip(reason)
                continue
        settings = settings_for(prof, method, task, variant, role)
        axes = {k: v for k, v in settings.items() if isinstance(v, list | tuple)}
        fixed = {k: v for k, v in settings.items() if k not in axes}
        for point in itertools.product(*axes.values()):
            for seed in seeds:
                job = Job(method, task, role, model, variant, seed, {**fixed, **dict(zip(axes, point))})
                key = job.key()
                if key not in seen:
                    seen.add(key)
                    jobs.append(job)
    return SweepJobs(jobs, skipped)


def describe(plan: SweepJobs, name: str, profile: str) -> str:
    cells = {(j.method, j.task, j.role, j.variant) for j in plan.jobs}
    lines = [f"{name} ({profile} profile): {len(cells)} cells, {len(plan.jobs)} jobs"]
    missing: dict[str, int] = {}
    for reason, n in sorted(plan.skipped.items()):
        if reason.startswith("no config here for "):
            for item in reason[len("no config here for "):].split(", "):
                missing[item] = missing.get(item, 0) + n
        else:
            lines.append(f"  skipped {n} cell(s): {reason}")
    if missing:
        lines.append(f"  skipped {sum(n for r, n in plan.skipped.items() if r.startswith('no config'))} cell(s) "
                     "whose configs do not exist here: "
                     + ", ".join(f"{item} ({n})" for item, n in sorted(missing.items())))
    return "\n".join(lines)


def computation_key(overrides: Iterable[str]) -> str:
    """What a job computes: its ``job_key`` without the keys that only say which table and cell it belongs to
    (``experiment``, ``profile``, ``cell.*``; conf/experiment/*.yaml set nothing else, tests/test_sweep.py
    checks it). Jobs of two tables with one computation key make the same row: in the cpu profile one model
    stands for several paper models, so HZO Table 3's cells are HZO Table 2's runs."""
    return job_key(o for o in overrides if not _names_table(o))


def _names_table(override: str) -> bool:
    key = _bare(override.split("=", 1)[0])
    return key in ("experiment", "experiment_name", "profile") or key.startswith("cell.")


def finished_elsewhere(name: str, profile: str, results_dir: str | Path,
                       job_lists: Callable[[SweepJobs, str], Iterable[list[str]]]) -> dict[str, tuple[str, dict]]:
    """computation key -> (table, its ok row) for the finished jobs of the other tables' ``profile`` sweeps
    whose rows are under ``results_dir``. ``job_lists(plan, table)`` gives the override lists a sweep of
    ``table`` with this command line builds (their ``job_key`` is what its rows hold as ``cell.job``)."""
    from zoexp.results import read_rows

    out: dict[str, tuple[str, dict]] = {}
    for other in experiment_names():
        path = Path(results_dir) / "experiments" / other / f"{profile}.jsonl"
        if other == name or not path.is_file():
            continue
        try:
            plan = expand(load_sweep(other), profile, check_available=False)
        except SweepError:  # no such profile there
            continue
        rows = {job_id((r.get("cell") or {}).get("job")): r for r in read_rows(path)
                if r.get("status") == "ok" and r.get("experiment") == other and made_by_current_code(r)}
        for overrides in job_lists(plan, other):
            row = rows.get(job_id(job_key(overrides)))
            if row is not None:
                out.setdefault(computation_key(overrides), (other, row))
    return out


def made_by_current_code(row: dict) -> bool:
    """Whether the row's method code is this install's (``code_version``, equivalents included; zoexp.provenance).
    A row of older code is not copied into another table: its job runs again with the current code."""
    from zoexp.provenance import canonical_code_version, conf_code_versions

    version, method = row.get("code_version"), row.get("method")
    if version is None:  # zero-shot, ICL: no optimizer code
        return True
    current = conf_code_versions().get(str(method))
    return current is not None and canonical_code_version(method, version) == canonical_code_version(method, current)


def shared_row(row: dict, source: str, name: str, cell: dict) -> dict:
    """``row`` of table ``source`` as the row of a job of table ``name`` that computes the same thing
    (``cell``: that job's model role, variant and key). ``same_run`` names the run it is, so that the
    report counts its time once, where it ran."""
    return {**row, "experiment": name, "cell": cell,
            "same_run": row.get("same_run") or {"experiment": source, "job": (row.get("cell") or {}).get("job"),
                                                "run_dir": row.get("run_dir")}}


def job_id(value: Any) -> Any:
    """A row's ``cell.job`` as one comparable value. Sweeps before the key was quoted on the command line
    let Hydra read an all-digit key (``1805837676310908``) as an int and one like ``70571716289e0124`` as a
    float, so such rows hold a number: a key that reads as a number is compared as that number."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def job_override(key: str) -> str:
    """The ``cell.job`` override of a job, quoted so that Hydra keeps the key a string."""
    return f"cell.job='{key}'"


def done_jobs(results_file: str | Path) -> set[Any]:
    """``job_id`` of the rows that finished ok (a re-run skips those jobs: ``job_id(key) in done_jobs(..)``)."""
    from zoexp.results import read_rows

    jobs = {(r.get("cell") or {}).get("job") for r in read_rows(results_file) if r.get("status") == "ok"}
    return {job_id(j) for j in jobs if j is not None}
