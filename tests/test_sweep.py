"""Reproduction sweeps: a table's cells x a profile's grid -> Hydra jobs, and the Hydra sweeper plugin that
launches them (`zoexp -m experiment=<table> profile=<p>`): filters, overrides, dry run, resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from zoexp.paths import conf_dir
from zoexp.results import read_rows
from zoexp.sweep import (
    PROFILES,
    SweepError,
    computation_key,
    done_jobs,
    expand,
    experiment_names,
    format_value,
    job_id,
    job_key,
    job_override,
    load_sweep,
)

SPEC = {
    "table": "toy",
    "cells": [{"methods": ["mezo", "focus"], "tasks": ["sst2", "rte"], "models": ["big"]},
              {"methods": ["mezo"], "tasks": ["sst2"], "models": ["huge"], "variants": ["v1"]}],
    "profiles": {
        "p": {
            "models": {"big": "tiny-opt", "huge": None},
            "seeds": [0, 1],
            "common": {"run.steps": 5, "method.lr": 1.0},
            "methods": {"mezo": {"method.lr": [1e-3, 1e-4]}, "focus": {"method.interval": [5, 10], "run.steps": 7}},
            "tasks": {"rte": {"run.steps": 9}},
            "variants": {"v1": {"run.dtype": "fp16"}},
            "method_tasks": {"focus@rte": {"run.steps": 11}},
        }
    },
}


def settings(plan, method, task):
    return [j.settings for j in plan.jobs if j.method == method and j.task == task]


def test_cells_times_grid_times_seeds_with_later_sections_winning():
    plan = expand(SPEC, "p", check_available=False)
    assert len(plan.jobs) == 4 * 2 * 2  # (mezo, focus) x (sst2, rte) x 2-point grids x 2 seeds
    assert {s["method.lr"] for s in settings(plan, "mezo", "sst2")} == {1e-3, 1e-4}
    assert {s["run.steps"] for s in settings(plan, "mezo", "rte")} == {9}  # task beats common
    assert {s["run.steps"] for s in settings(plan, "focus", "sst2")} == {7}  # method beats common
    assert {s["run.steps"] for s in settings(plan, "focus", "rte")} == {11}  # method@task beats task
    assert plan.skipped == {"model huge is not run in the p profile": 1}
    assert {j.seed for j in plan.jobs} == {0, 1}


def test_a_variant_used_by_a_cell_must_be_defined_and_roles_must_be_mapped():
    spec = {**SPEC, "profiles": {"p": {**SPEC["profiles"]["p"], "models": {"big": "tiny-opt", "huge": "tiny-opt"},
                                       "variants": {}}}}
    with pytest.raises(SweepError, match="variant 'v1'"):
        expand(spec, "p", check_available=False)
    spec = {**SPEC, "profiles": {"p": {**SPEC["profiles"]["p"], "models": {"big": "tiny-opt"}}}}
    with pytest.raises(SweepError, match="model role 'huge'"):
        expand(spec, "p", check_available=False)
    with pytest.raises(SweepError, match="profile 'gpu'"):
        expand(SPEC, "gpu", check_available=False)


def test_cells_whose_configs_do_not_exist_are_skipped_and_counted():
    spec = {**SPEC, "cells": [{"methods": ["mezo", "no-such-method"], "tasks": ["sst2", "no-such-task"],
                               "models": ["big"]}]}
    plan = expand(spec, "p", check_available=True)
    assert {(j.method, j.task) for j in plan.jobs} == {("mezo", "sst2")}
    assert plan.skipped == {"no config here for task no-such-task": 1,
                            "no config here for method no-such-method": 1,
                            "no config here for method no-such-method, task no-such-task": 1}


def test_override_values_and_job_keys():
    assert format_value(1e-6) == "1e-06" and format_value(None) == "null" and format_value(True) == "true"
    assert format_value("r2-nu50") == "r2-nu50" and format_value("a b") == "'a b'" and format_value([1, 2]) == "[1,2]"
    assert job_key(["a=1", "b=2"]) == job_key(["b=2", "+a=1", "cell.job=x"]) != job_key(["a=1", "b=3"])
    # how a run is shown, or where its rows go, is not what it computes: a re-run still skips it
    assert job_key(["a=1"]) == job_key(["a=1", "run.progress=false", "logger=tensorboard", "results_dir=/tmp/r",
                                        "hydra.sweeper.dry_run=true"])
    assert job_key(["a=1"]) != job_key(["a=1", "run.log_every=2"])


@pytest.mark.parametrize("name", experiment_names())
def test_every_shipped_sweep_expands_in_every_profile(name):
    spec = load_sweep(name)
    assert set(spec["profiles"]) == set(PROFILES)
    for profile in PROFILES:
        plan = expand(spec, profile, check_available=False)
        for job in plan.jobs:
            assert all(isinstance(v, str) for v in job.overrides().values())
    assert expand(spec, "smoke", check_available=False).jobs, "the smoke profile must run every table"


# --------------------------------------------------------------------------- the Hydra sweeper plugin


def zoexp(args, cwd, data_dir):
    env = {**os.environ, "ZOEXP_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "zoexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout + out.stderr


def test_dry_run_lists_the_paper_grid_with_filters_and_overrides(tmp_path, fixture_data_dir):
    out = zoexp(["-m", "experiment=focus_table3", "profile=paper", "method=mezo", "task=sst2",
                 "hydra.sweeper.dry_run=true"], tmp_path, fixture_data_dir)
    jobs = [line for line in out.splitlines() if line.startswith("#")]
    assert len(jobs) == 8 * 3  # 8 learning rates (FOCUS Table 6) x seeds 0-2; batch 8 fixed (Sec. 5.1)
    assert all("method=mezo" in j and "task=sst2" in j and "model=opt-1.3b" in j and "run.steps=20000" in j
               for j in jobs)
    out = zoexp(["-m", "experiment=focus_table3", "profile=paper", "method=mezo", "task=sst2", "run.steps=5",
                 "run.seed=7,8", "hydra.sweeper.dry_run=true"], tmp_path, fixture_data_dir)
    jobs = [line for line in out.splitlines() if line.startswith("#")]
    assert len(jobs) == 8 * 2 and all("run.steps=5" in j and "run.steps=20000" not in j for j in jobs)
    assert {j.split("run.seed=")[1].split()[0] for j in jobs} == {"7", "8"}


def test_cell_variant_on_the_command_line_selects_variants_instead_of_relabelling_them(tmp_path, fixture_data_dir):
    out = zoexp(["-m", "experiment=hzo_table10", "profile=smoke", "task=sst2", "cell.variant=r2-nu1,r8-nu100",
                 "hydra.sweeper.dry_run=true"], tmp_path, fixture_data_dir)
    jobs = [line for line in out.splitlines() if line.startswith("#")]
    assert jobs and len(jobs) % 2 == 0  # the two variants, once per seed
    assert {j.split("cell.variant=")[1].split()[0] for j in jobs} == {"r2-nu1", "r8-nu100"}
    assert all(("method.rank=2" in j and "method.interval=1 " in j) if "cell.variant=r2-nu1" in j
               else ("method.rank=8" in j and "method.interval=100" in j) for j in jobs)


def test_a_table_sweep_writes_tagged_rows_and_a_rerun_resumes(tmp_path, fixture_data_dir):
    args = ["-m", "experiment=focus_table3", "profile=smoke", "method=mezo,zero-shot", "task=sst2"]
    zoexp(args, tmp_path, fixture_data_dir)
    rows = read_rows(tmp_path / "results" / "experiments" / "focus_table3" / "smoke.jsonl")
    assert sorted(r["method"] for r in rows) == ["mezo", "mezo", "zero-shot"]  # mezo: 2 learning rates
    assert all(r["status"] == "ok" and r["experiment"] == "focus_table3" and r["profile"] == "smoke" for r in rows)
    assert all(r["cell"]["model_role"] == "opt-1.3b" and r["model"] == "tiny-opt" for r in rows)
    assert all(r["task_protocol"]["num_dev"] == 8 for r in rows)
    assert all(isinstance(r["cell"]["job"], str) and len(r["cell"]["job"]) == 16 for r in rows)
    out = zoexp(args, tmp_path, fixture_data_dir)
    assert "3 job(s) already have an ok row" in out and "to launch: 0 job(s)" in out
    assert len(read_rows(tmp_path / "results" / "experiments" / "focus_table3" / "smoke.jsonl")) == 3


def test_a_row_whose_job_key_hydra_read_as_a_number_still_counts_as_done(tmp_path):
    # before the sweeper quoted cell.job, Hydra turned all-digit keys into ints and "<digits>e<digits>"
    # into floats; those rows finished ok and a re-run must skip them, not run them again
    path = tmp_path / "rows.jsonl"
    rows = [{"status": "ok", "cell": {"job": 1805837676310908}},
            {"status": "ok", "cell": {"job": float("70571716289e0124")}},
            {"status": "ok", "cell": {"job": "9d82d430c18c0aa1"}},
            {"status": "failed", "cell": {"job": "0123456789abcdef"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = done_jobs(path)
    assert {job_id(k) in done for k in ("1805837676310908", "70571716289e0124", "9d82d430c18c0aa1")} == {True}
    assert job_id("0123456789abcdef") not in done and job_id("1805837676310909") not in done
    assert job_override("70571716289e0124") == "cell.job='70571716289e0124'"


def test_the_computation_key_leaves_out_only_which_table_and_cell_a_job_belongs_to():
    base = ["experiment=hzo_table2", "profile=cpu", "method=mezo", "task=sst2", "run.seed=0",
            "cell.model_role=opt-13b", "cell.variant=null"]
    other_table = ["experiment=hzo_table3", "profile=cpu", "method=mezo", "task=sst2", "run.seed=0",
                   "cell.model_role=opt-30b", "cell.variant=r2", "cell.job='abc'"]
    assert computation_key(base) == computation_key(other_table) and job_key(base) != job_key(other_table)
    assert computation_key(base) != computation_key([*base[:-3], "run.seed=1", *base[-2:]])


@pytest.mark.parametrize("name", experiment_names())
def test_an_experiment_file_sets_nothing_a_run_computes_outside_its_sweep(name):
    # what lets computation_key drop `experiment=`: two tables' jobs with equal overrides compute the same
    cfg = yaml.safe_load((conf_dir() / "experiment" / f"{name}.yaml").read_text())
    assert set(cfg) <= {"defaults", "experiment_name", "profile", "run", "hydra", "sweep"}
    assert set(cfg.get("run") or {}) <= {"results_file"} and set(cfg.get("hydra") or {}) <= {"sweep"}
    assert set((cfg.get("hydra") or {}).get("sweep") or {}) <= {"dir"}


def test_a_job_another_table_ran_is_copied_from_its_row_not_run_again(tmp_path, fixture_data_dir):
    # one model stands for OPT-13B, 30B and 66B in the smoke (and cpu) profile: HZO Table 3's cells are Table 2's
    zoexp(["-m", "experiment=hzo_table2", "profile=smoke", "method=zero-shot", "task=sst2"], tmp_path, fixture_data_dir)
    args = ["-m", "experiment=hzo_table3", "profile=smoke", "method=zero-shot", "task=sst2"]
    out = zoexp([*args, "hydra.sweeper.dry_run=true"], tmp_path, fixture_data_dir)
    assert "2 job(s) compute what finished jobs of hzo_table2 computed: their rows would be copied" in out
    assert "to launch: 0 job(s)" in out
    assert not (tmp_path / "results" / "experiments" / "hzo_table3").exists()  # a dry run writes nothing
    out = zoexp([*args, "hydra.sweeper.dry_run=true", "hydra.sweeper.share_runs=false"], tmp_path, fixture_data_dir)
    assert "to launch: 2 job(s)" in out and "compute what finished jobs" not in out
    out = zoexp(args, tmp_path, fixture_data_dir)
    assert "their rows are copied" in out and "Launching" not in out
    (source,) = read_rows(tmp_path / "results" / "experiments" / "hzo_table2" / "smoke.jsonl")
    copies = read_rows(tmp_path / "results" / "experiments" / "hzo_table3" / "smoke.jsonl")
    assert sorted(c["cell"]["model_role"] for c in copies) == ["opt-30b", "opt-66b"]
    for copy in copies:
        assert copy["experiment"] == "hzo_table3" and copy["cell"]["job"] != source["cell"]["job"]
        assert copy["same_run"] == {"experiment": "hzo_table2", "job": source["cell"]["job"],
                                    "run_dir": source["run_dir"]}
        assert copy["test/acc"] == source["test/acc"] and copy["run"] == source["run"]
    out = zoexp(args, tmp_path, fixture_data_dir)  # now they are this table's own done jobs
    assert "2 job(s) already have an ok row" in out and "compute what finished jobs" not in out
    from zoexp.report import build, compute_text, load_rows

    table = build("hzo_table3", "smoke", load_rows("hzo_table3", "smoke", results_dir=tmp_path / "results"))
    for row in ("30b-zero-shot", "66b-zero-shot"):
        assert table.cells[(0, row, "sst2")].mean == pytest.approx(100 * source["test/acc"])
    assert table.shared == {"hzo_table2": 2} and not table.compute_s
    assert "2 of its rows are copies of runs of hzo_table2 (2)" in compute_text(table)


def test_a_row_of_older_method_code_is_not_copied_its_job_runs_again(tmp_path, fixture_data_dir):
    zoexp(["-m", "experiment=hzo_table2", "profile=smoke", "method=mezo", "task=sst2"], tmp_path, fixture_data_dir)
    source = tmp_path / "results" / "experiments" / "hzo_table2" / "smoke.jsonl"
    rows = read_rows(source)
    args = ["-m", "experiment=hzo_table3", "profile=smoke", "method=mezo", "task=sst2", "hydra.sweeper.dry_run=true"]
    out = zoexp(args, tmp_path, fixture_data_dir)
    n = 2 * len(rows)  # OPT-30B and OPT-66B, each job of Table 2's grid
    assert f"{n} job(s) compute what finished jobs of hzo_table2 computed" in out and "to launch: 0 job(s)" in out
    source.write_text("".join(json.dumps({**r, "code_version": "0123456789ab"}) + "\n" for r in rows))
    out = zoexp(args, tmp_path, fixture_data_dir)
    assert "compute what finished jobs" not in out and f"to launch: {n} job(s)" in out


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_composes_with_the_table_sweeper(name):
    from hydra import compose, initialize_config_dir

    from zoexp.configs import register_tasks
    from zoexp.paths import conf_dir

    register_tasks()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", "profile=smoke"], return_hydra_config=True)
    assert cfg.experiment_name == name and cfg.profile == "smoke"
    assert cfg.hydra.sweeper._target_.endswith("TableSweeper")
    assert cfg.run.results_file == f"results/experiments/{name}/smoke.jsonl"


def test_an_experiment_without_multirun_says_how_to_run_it(tmp_path, fixture_data_dir):
    env = {**os.environ, "ZOEXP_DATA_DIR": str(fixture_data_dir)}
    out = subprocess.run([sys.executable, "-m", "zoexp", "experiment=focus_table3", "profile=smoke"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "zoexp -m experiment=focus_table3 profile=smoke" in out.stderr
    assert not (tmp_path / "results" / "experiments").exists()


def test_tasks_without_local_data_are_skipped(tmp_path):
    (tmp_path / "sst2").mkdir()
    spec = {**SPEC, "cells": [{"methods": ["mezo"], "tasks": ["sst2", "sst2-mlm", "sst5-mlm"], "models": ["big"]}]}
    plan = expand(spec, "p", data_dir=tmp_path)
    assert {j.task for j in plan.jobs} == {"sst2", "sst2-mlm"}  # sst2-mlm reads the sst2 folder
    assert plan.skipped == {f"no data for task sst5-mlm in {tmp_path}": 1}


def test_a_list_valued_setting_is_a_one_point_axis():
    spec = {**SPEC, "cells": [{"methods": ["lora"], "tasks": ["sst2"], "models": ["big"]}],
            "profiles": {"p": {"models": {"big": "tiny-opt"}, "seeds": [0],
                               "methods": {"lora": {"method.target_modules": [["query", "value"]]}}}}}
    (job,) = expand(spec, "p", check_available=False).jobs
    assert job.overrides()["method.target_modules"] == "method.target_modules=[query,value]"
