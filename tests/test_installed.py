"""A non-editable install finds its configs and task specs from any directory (STYLE 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    dist = tmp_path_factory.mktemp("dist")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = dist.glob("zoexp-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def _run(target: Path, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    # PYTHONPATH puts the installed copy first; the source checkout is not on the path.
    environ = {**os.environ, "PYTHONPATH": str(target), **env}
    return subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def test_installed_package_uses_its_own_configs(installed, tmp_path):
    out = _run(installed, [sys.executable, "-c", "import zoexp.paths as p; print(p.conf_dir()); print(p.tasks_dir())"],
               tmp_path)
    assert out.returncode == 0, out.stderr
    conf, tasks = out.stdout.split()
    assert conf == str(installed / "zoexp" / "conf") and tasks == str(installed / "zoexp" / "tasks")


def test_installed_console_script_runs_from_anywhere(installed, tmp_path, fixture_data_dir):
    script = installed / "bin" / "zoexp"
    assert script.is_file()
    out = _run(installed, [sys.executable, str(script), "--help"], tmp_path)
    assert out.returncode == 0 and "smollm2-135m" in out.stdout and "sst2" in out.stdout
    out = _run(installed, [sys.executable, str(script), "model=tiny-opt", "method=zero-shot", "task.num_test=8",
                           "run.progress=false"], tmp_path, ZOEXP_DATA_DIR=str(fixture_data_dir))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "results" / "runs.jsonl").is_file()


def test_installed_package_runs_a_table_sweep_and_the_report(installed, tmp_path, fixture_data_dir):
    script = installed / "bin" / "zoexp"
    out = _run(installed, [sys.executable, str(script), "-m", "experiment=focus_table3", "profile=paper",
                           "method=mezo", "task=sst2", "hydra.sweeper.dry_run=true"], tmp_path,
               ZOEXP_DATA_DIR=str(fixture_data_dir))
    assert out.returncode == 0, out.stderr
    # the Hydra sweeper plugin ships in the wheel: 8 learning rates x seeds 0-2, batch 8 fixed (FOCUS Sec. 5.1)
    assert "to launch: 24 job(s)" in out.stdout + out.stderr
    out = _run(installed, [sys.executable, "-m", "zoexp.report", "focus_table3", "--profile", "smoke"], tmp_path)
    assert out.returncode == 2 and "no rows of focus_table3" in out.stderr  # no rows: a message, not dashes
    out = _run(installed, [sys.executable, "-c", "from zoexp.report import load_layout; "
                           "print(load_layout('focus_table3')['title'])"], tmp_path)
    assert out.returncode == 0 and "FOCUS Table 3" in out.stdout  # the paper's numbers ship too
