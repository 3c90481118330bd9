"""Cluster sweeps through Hydra launcher plugins: submitit (its local executor runs the SLURM code path:
pickled jobs in separate processes) and joblib (parallel local workers)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_resume import TINY, env

from zoexp.results import read_rows

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `cluster` extra (make setup)")


def sweep(tmp_path, data_dir, launcher: list[str], values: str) -> subprocess.CompletedProcess:
    # method.eps=-1 makes MeZO's constructor refuse it: that job never starts (a user error: no row, one
    # line in its log), the others run
    return subprocess.run([sys.executable, "-m", "zoexp", "-m", *TINY, *launcher, "run.steps=2", "run.eval_every=0",
                           "method.lr=1e-3", f"method.eps={values}", "run.name=sweep"],
                          cwd=tmp_path, env=env(data_dir), capture_output=True, text=True, timeout=900)


def test_submitit_local_sweep_writes_every_row_and_records_the_failure(tmp_path, fixture_data_dir):
    out = sweep(tmp_path, fixture_data_dir, ["hydra/launcher=submitit-local", "hydra.launcher.timeout_min=15"],
                "-1,1e-3")
    # the jobs' exit codes stay in their processes (docs/errors.md): the sweep itself ends with 0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_rows(tmp_path / "results" / "runs.jsonl")
    assert sorted((r["hparams"]["eps"], r["status"]) for r in rows) == [(1e-3, "ok")]
    sweep_dir = tmp_path / "results" / "runs" / "sweep"
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.err"))
    assert "zoexp: error:" in logs and "eps" in logs  # the refused job's one line, in its submitit log
    # each job ran in its own submitit process and kept its own directory under the stable sweep dir
    assert {r["run_dir"] for r in rows} <= {str(p) for p in sweep_dir.iterdir() if p.name[0].isdigit()}


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_workers(tmp_path, fixture_data_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = sweep(tmp_path, fixture_data_dir, ["hydra/launcher=local-parallel"], "1e-3,-1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_rows(tmp_path / "results" / "runs.jsonl")
    assert sorted(r["status"] for r in rows) == ["ok"]
