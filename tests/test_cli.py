"""End to end through the real entry point (`python -m zoexp`), on tiny-opt and a small SST-2 sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoexp.results import read_rows

TINY = ["model=tiny-opt", "task.num_train=32", "task.num_dev=16", "task.num_test=24",
        "run.batch_size=4", "run.eval_batch_size=16", "run.progress=false"]

# DESIGN "Measurement": every row carries these (GPU memory only when on a GPU).
ROW_FIELDS = [
    "status", "method", "model", "task", "task_version", "seed", "dtype", "hparams", "run", "device", "threads",
    "git_commit", "versions", "test/acc", "test/n", "dev/acc", "best_step", "steps", "time/load_s",
    "time/train_s", "time/eval_s", "time/total_s", "cpu/train_s", "cpu/eval_s", "forward_passes", "tokens", "tokens_per_s",
    "mem/load_rss_peak_bytes", "mem/train_rss_peak_bytes", "mem/eval_rss_peak_bytes",
    "optimizer_state_bytes", "optimizer_state_bytes_max", "forward_passes_per_step", "curve", "dev_curve",
    "data/train", "data/dev", "data/test", "run_dir", "started_at", "finished_at",
]


def zoexp(args: list[str], cwd: Path, data_dir: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZOEXP_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "zoexp", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"zoexp {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def test_mezo_run_writes_a_complete_row(tmp_path, fixture_data_dir):
    out = zoexp([*TINY, "run.steps=6", "run.eval_every=3", "method.lr=1e-3"], tmp_path, fixture_data_dir)
    rows = read_rows(tmp_path / "results" / "runs.jsonl")
    assert len(rows) == 1
    row = rows[0]
    missing = [k for k in ROW_FIELDS if row.get(k) is None]
    assert not missing, f"row lacks {missing}"
    assert row["status"] == "ok" and row["steps"] == 6 and row["forward_passes"] == 12
    assert row["forward_passes_per_step"] == 2 and 0 <= row["test/acc"] <= 1
    assert [d["step"] for d in row["dev_curve"]] == [3, 6]
    assert row["hparams"]["lr"] == 1e-3 and row["task_version"] == 1
    run_dir = Path(row["run_dir"])
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # resolved config kept beside the run
    assert not (run_dir / "best.safetensors").exists()  # temporary best weights cleaned up
    assert "test acc" in out.stdout and "peak host RSS" in out.stdout


def test_multirun_writes_one_row_per_run(tmp_path, fixture_data_dir):
    zoexp(["-m", *TINY, "run.steps=2", "run.eval_every=0", "method.lr=1e-3,1e-4", "run.seed=1,2"],
          tmp_path, fixture_data_dir)
    rows = read_rows(tmp_path / "results" / "runs.jsonl")
    assert sorted((r["hparams"]["lr"], r["seed"]) for r in rows) == [(1e-4, 1), (1e-4, 2), (1e-3, 1), (1e-3, 2)]
    assert all(r["status"] == "ok" for r in rows)


def test_zero_shot_is_evaluation_only(tmp_path, fixture_data_dir):
    zoexp([*TINY, "method=zero-shot"], tmp_path, fixture_data_dir)
    (row,) = read_rows(tmp_path / "results" / "runs.jsonl")
    assert row["status"] == "ok" and row["steps"] == 0 and row["test/n"] == 24
    assert "time/train_s" not in row and row["optimizer_state_bytes"] == 0


def test_divergence_stops_the_run_with_a_diverged_row(tmp_path, fixture_data_dir):
    out = zoexp([*TINY, "run.steps=10", "run.eval_every=0", "method.lr=1e30"], tmp_path, fixture_data_dir,
                check=False)
    assert out.returncode == 3  # zoexp.validate.EXIT_DIVERGED: a scheduler tells it from ok (0) and failed (1)
    (row,) = read_rows(tmp_path / "results" / "runs.jsonl")
    assert row["status"] == "diverged" and 1 <= row["diverged_step"] < 10
    assert "loss became" in row["message"]


def test_unknown_method_lists_the_choices(tmp_path, fixture_data_dir):
    out = zoexp(["method=nope"], tmp_path, fixture_data_dir, check=False)
    assert out.returncode != 0
    assert "mezo" in out.stderr and "zero-shot" in out.stderr


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = zoexp([*TINY, "method=zero-shot"], tmp_path, empty, check=False)
    assert out.returncode == 2
    assert str(empty / "sst2") in out.stderr and "ZOEXP_DATA_DIR" in out.stderr
    assert "Traceback" not in out.stderr
    assert read_rows(tmp_path / "results" / "runs.jsonl") == []  # a run that never started writes no row


def test_a_crash_leaves_earlier_rows_intact(tmp_path, fixture_data_dir):
    results = tmp_path / "results" / "runs.jsonl"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"status": "ok", "method": "earlier"}) + "\n" + '{"status": "ok", "meth')
    out = zoexp([*TINY, "run.dtype=fp99"], tmp_path, fixture_data_dir, check=False)
    assert out.returncode == 2 and "run.dtype=fp99" in out.stderr
    rows = read_rows(results)
    assert rows == [{"status": "ok", "method": "earlier"}]  # a config error appends no row


def test_help_and_cfg(tmp_path, fixture_data_dir):
    out = zoexp(["--help"], tmp_path, fixture_data_dir)
    assert "method: " in out.stdout and "mezo" in out.stdout and "Usage" in out.stdout
    out = zoexp(["--cfg", "job", "method=zero-shot"], tmp_path, fixture_data_dir)
    assert "name: zero-shot" in out.stdout


@pytest.mark.parametrize("module", ["zoexp"])
def test_python_dash_m(module, tmp_path, fixture_data_dir):
    out = subprocess.run([sys.executable, "-m", module, "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "smollm2-135m" in out.stdout


def test_the_summary_shows_the_final_weights_test_beside_the_best_by_dev(capsys):
    from zoexp.cli import print_summary

    row = {"method": "sgd", "model": "tiny-opt", "task": "sst2", "seed": 0, "status": "ok", "test_final/acc": 0.25,
           "test_final/step": 6, "test/acc": 0.75, "test/n": 32, "dev/acc": 0.5, "best_step": 2}
    print_summary(row)
    out = capsys.readouterr().out
    assert out.index("test acc ") < out.index("0.7500 (n=32)") < out.index("test acc, final weights")
    assert "0.2500 (step 6)" in out and "0.5000 (step 2)" in out
