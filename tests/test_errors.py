"""Faults and bad input (docs/errors.md): one line and exit code 2 for every bad value, no silently wrong
metric, no lost result, a clean exit for every distributed run. Each test runs the repro of its case."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch
from test_checkpointing import _setup
from test_cli import TINY, zoexp
from test_resume import env

from zoexp.results import read_rows
from zoexp.resume import latest_valid
from zoexp.tasks import DataError, Task, load_spec

ROWS = Path("results") / "runs.jsonl"


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("zoexp:")]


def assert_one_line(out: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, exactly one `zoexp: error:` line naming ``expected``, and no traceback."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    (line,) = error_lines(out)
    assert line.startswith("zoexp: error: ")
    for text in expected:
        assert text in line, line
    return line


# --------------------------------------------------------------------------- bad values (issue 18.4, 18.5, 17.2)

BAD_VALUES = [
    ("method.lr=abc", "must be a number"),
    ("run.batch_size=0", "must be >= 1"),
    ("run.steps=-5", "must be >= 0"),
    ("task.num_test=0", "must be >= 1"),
    ("run.dtype=fp8", "fp32, fp16, bf16"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append(("run.device=cuda", "use run.device=cpu"))


def test_bad_values_are_refused_in_one_line_before_any_work(tmp_path, fixture_data_dir):
    for value, advice in BAD_VALUES:
        out = zoexp([*TINY, value], tmp_path, fixture_data_dir, check=False)
        assert_one_line(out, value, advice)
    assert not (tmp_path / "results").exists()  # checked when composed: no run directory, no row


def test_results_file_that_cannot_be_appended_is_refused_before_training(tmp_path, fixture_data_dir):
    target = tmp_path / "rows-dir.jsonl"
    target.mkdir()  # a directory where the results file should be
    out = zoexp([*TINY, f"run.results_file={target}"], tmp_path, fixture_data_dir, check=False)
    assert_one_line(out, f"run.results_file={target}", "cannot append")
    assert not (tmp_path / "results" / "runs").exists()


def test_active_blocks_above_the_model_is_refused_not_clamped(tmp_path, fixture_data_dir):
    out = zoexp([*TINY, "method=focus", "method.active_blocks=100", "run.steps=2"], tmp_path, fixture_data_dir,
                check=False)
    assert_one_line(out, "method.active_blocks=100", "only 4 transformer blocks")
    assert read_rows(tmp_path / ROWS) == []  # the run never started: no row


def test_multirun_goes_on_past_a_bad_job_and_exits_with_its_code(tmp_path, fixture_data_dir):
    out = zoexp(["-m", *TINY, "run.steps=2", "run.eval_every=0", "method.lr=1e-3", "run.batch_size=0,4"],
                tmp_path, fixture_data_dir, check=False)
    assert out.returncode == 2
    assert any("run.batch_size=0" in line for line in error_lines(out))
    (row,) = read_rows(tmp_path / ROWS)  # the good job ran; the bad one wrote no row
    assert row["status"] == "ok" and row["run"]["batch_size"] == 4


# --------------------------------------------------------------------------- data files (issue 18.4, 18.5)


def _sst2(root: Path, train: bytes, validation: bytes) -> Path:
    folder = root / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(train)
    (folder / "validation.jsonl").write_bytes(validation)
    return root


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"idx": i, "sentence": f"movie {i} ", "label": i % 2}).encode() + b"\n"
                    for i in range(start, start + n))


GOOD = _lines(8)
DATA_CASES = {
    "missing-label": (GOOD[:0] + _lines(2) + b'{"idx": 2, "sentence": "no label here "}\n' + _lines(3, 3), GOOD,
                      r"train\.jsonl:3: task sst2: example 2 has no label \(`label` is missing"),
    "truncated-line": (_lines(4) + b'{"idx": 4, "sentence": "cut of', GOOD, r"train\.jsonl:5: truncated"),
    "not-json": (_lines(2) + b"idx,sentence,label\n" + _lines(2, 2), GOOD, r"train\.jsonl:3: not valid JSON"),
    "not-utf8": (_lines(1) + b'{"idx": 1, "sentence": "caf\xe9 ", "label": 1}\n', GOOD,
                 r"train\.jsonl:2: byte \d+ of the line is not UTF-8"),
    "empty-train": (b"", GOOD, r"train\.jsonl has no usable rows"),
    "empty-validation": (GOOD, b"", r"validation\.jsonl has no usable rows"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_names_the_file_and_line(tmp_path, case):
    train, validation, message = DATA_CASES[case]
    root = _sst2(tmp_path, train, validation)
    with pytest.raises(DataError, match=message):
        Task(load_spec("sst2")).sample(0, data_dir=root, num_train=100, num_dev=2, num_test=100)


def test_bad_data_through_the_cli_is_one_line_and_no_row(tmp_path):
    train, validation, _ = DATA_CASES["missing-label"]
    root = _sst2(tmp_path / "data", train, validation)
    out = zoexp(TINY, tmp_path, root, check=False)  # 8 rows: every one is sampled
    assert_one_line(out, f"{root / 'sst2' / 'train.jsonl'}:3")
    assert read_rows(tmp_path / ROWS) == []


def test_capped_test_set_is_recorded_in_the_notes(tmp_path):
    root = _sst2(tmp_path, _lines(20), _lines(8))
    data = Task(load_spec("sst2")).sample(0, data_dir=root, num_train=4, num_dev=2, num_test=100000)
    assert len(data.test) == 8
    assert any("validation has 8 rows < num_test=100000" in note for note in data.notes)


# --------------------------------------------------------------------------- run directories and results (18.1, 18.2, 17.4)


def test_parallel_launches_never_share_a_run_directory(tmp_path, fixture_data_dir):
    from zoexp.validate import claim_dir, run_dir

    # the same second, the same name: every claim gets its own directory
    root = str(tmp_path / "runs")
    claimed = {claim_dir(run_dir(root, None, "2026-01-01/10-00-00_mezo")) for _ in range(3)}
    assert len(claimed) == 3 and all(Path(p).is_dir() for p in claimed)
    assert run_dir(root, "named", "ignored") == f"{root}/named"

    # the repro: three runs started together, one results file
    args = [*TINY, "run.steps=4", "run.eval_every=1", "method.lr=1e-3"]
    procs = [subprocess.Popen([sys.executable, "-m", "zoexp", *args, f"run.seed={s}"], cwd=tmp_path,
                              env={**os.environ, "ZOEXP_DATA_DIR": str(fixture_data_dir)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in (3, 4, 5)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    rows = {r["seed"]: r for r in read_rows(tmp_path / ROWS)}
    assert sorted(rows) == [3, 4, 5] and all(r["status"] == "ok" for r in rows.values())
    assert len({r["run_dir"] for r in rows.values()}) == 3
    # seed 4 alone gives the same test metric as seed 4 among the others
    alone = zoexp([*args, "run.seed=4", "results_dir=alone"], tmp_path, fixture_data_dir)
    assert alone.returncode == 0
    (row,) = read_rows(tmp_path / "alone" / "runs.jsonl")
    for key in ("test/acc", "dev/acc", "best_step"):
        assert row[key] == rows[4][key], key


def test_result_json_is_written_before_the_row(tmp_path, fixture_data_dir, monkeypatch):
    from conftest import compose

    from zoexp import runner

    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))

    def full_disk(path, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "append_row", full_disk)
    cfg = compose([*TINY, "run.steps=2", "run.eval_every=0", "method.lr=1e-3",
                   f"results_dir={tmp_path / 'results'}"])
    with pytest.raises(OSError):
        runner.run(cfg, run_dir=tmp_path / "run")
    kept = json.loads((tmp_path / "run" / "result.json").read_text())
    assert kept["status"] == "ok" and kept["test/n"] == 24  # the metric survives beside the run


def test_a_loss_that_rises_without_a_nan_is_said_and_recorded(tmp_path, fixture_data_dir, monkeypatch, caplog):
    """A run diverging slowly never hits the NaN check: it ends ok, but the log says so and the row keeps
    the rise (the report names such cells)."""
    from conftest import compose

    from zoexp import runner
    from zoexp.methods import MeZO

    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    step = MeZO.step

    def rising(self, closure):  # the loss it reports grows with every step: 1x, 2x, ..., 6x
        self.calls = getattr(self, "calls", 0) + 1
        return float(step(self, closure)) * self.calls

    monkeypatch.setattr(MeZO, "step", rising)
    cfg = compose([*TINY, "run.steps=6", "run.log_every=2", "run.eval_every=0", "method.lr=1e-3",
                   f"results_dir={tmp_path / 'results'}"])
    row = runner.run(cfg, run_dir=tmp_path / "run")
    assert row["status"] == "ok" and row["train/loss_rise"] > 2
    assert "the training loss rose" in caplog.text and "diverging" in caplog.text
    monkeypatch.setattr(MeZO, "step", step)
    caplog.clear()
    steady = runner.run(cfg, run_dir=tmp_path / "steady")
    assert steady["train/loss_rise"] < 2 and "loss rose" not in caplog.text


def test_run_name_reuse_with_another_config_is_refused(tmp_path, fixture_data_dir):
    base = [*TINY, "run.steps=2", "run.eval_every=0", "run.name=x"]
    zoexp([*base, "method.lr=1e-3"], tmp_path, fixture_data_dir)
    run_dir = tmp_path / "results" / "runs" / "x"
    before = {p: p.read_bytes() for p in (run_dir / "result.json", run_dir / ".hydra" / "config.yaml")}
    out = zoexp([*base, "method.lr=1e-4"], tmp_path, fixture_data_dir, check=False)
    assert_one_line(out, "results/runs/x", "another configuration", "method.lr: 0.001 -> 0.0001")
    assert {p: p.read_bytes() for p in before} == before  # the earlier run's result and config untouched
    # the same configuration again: the finished run's row, nothing rerun (a preempted one would resume)
    again = zoexp([*base, "method.lr=1e-3"], tmp_path, fixture_data_dir)
    assert "already finished" in again.stdout + again.stderr
    assert len(read_rows(tmp_path / ROWS)) == 1


# --------------------------------------------------------------------------- checkpoints (18.6)


def _forge_header(path: Path) -> None:
    """Replace the header length of every safetensors file of checkpoint ``path`` by an absurd one and
    re-forge the manifest's sizes and CRC-32s to match."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = bytearray((path / name).read_bytes())
        data[:8] = struct.pack("<Q", 2**40)
        (path / name).write_bytes(bytes(data))
        info.update(bytes=len(data), crc32=zlib.crc32(bytes(data)))
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_forged_checkpoint_header_is_skipped_for_the_previous(tmp_path):
    _setup(tmp_path)
    _forge_header(tmp_path / "checkpoints" / "step-00000006")
    path, skipped = latest_valid(tmp_path)
    assert path.name == "step-00000004"
    assert len(skipped) == 1 and "not plausible" in skipped[0]


def test_all_checkpoints_corrupt_starts_over_and_the_row_says_so(tmp_path, fixture_data_dir, monkeypatch):
    from test_resume import run_inprocess

    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    args = [*TINY, "run.steps=4", "run.eval_every=2", "run.checkpoint_every=2", "run.keep_checkpoints=true",
            "method.lr=1e-3", f"results_dir={tmp_path / 'results'}"]
    first = run_inprocess(args, tmp_path / "run")
    (tmp_path / "run" / "result.json").unlink()  # as if it had been preempted after its last checkpoint
    for path in (tmp_path / "run" / "checkpoints").iterdir():
        _forge_header(path)
    again = run_inprocess(args, tmp_path / "run")
    assert again["status"] == "ok" and again["resume/started_over"] is True
    assert len(again["resume/skipped_checkpoints"]) == 2 and "resumed_from_step" not in again
    assert again["test/acc"] == first["test/acc"]  # started over: the same trajectory


# --------------------------------------------------------------------------- distributed teardown (18.3)


def test_torchrun_exits_0_run_after_run(tmp_path, fixture_data_dir):
    """Three two-process runs in a row (the issue's check is 20: docs/errors.md gives the count measured)."""
    for i in range(3):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "zoexp", *TINY, "run.steps=2", "run.eval_every=0", "method.lr=1e-3",
                              f"run.seed={i}"], cwd=tmp_path, env=env(fixture_data_dir), capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "terminate called" not in out.stdout + out.stderr
    assert len(read_rows(tmp_path / ROWS)) == 3


def test_distributed_nn_functional_is_imported_before_the_group(monkeypatch):
    import torch.distributed as dist

    from zoexp import distributed

    order = []
    monkeypatch.delitem(sys.modules, "torch.distributed.nn.functional", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: order.append(
        ("init", "torch.distributed.nn.functional" in sys.modules)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "DataParallel", lambda device, backend: types.SimpleNamespace())
    from omegaconf import OmegaConf

    distributed.setup(OmegaConf.create({"run": {"distributed": "auto"}}), torch.device("cpu"))
    assert order == [("init", True)]


# --------------------------------------------------------------------------- small CLI faults (17.5)


def test_report_without_rows_fails_with_a_message(tmp_path, capsys):
    from zoexp import report

    assert report.main(["focus_table3", "--results-dir", str(tmp_path / "nonexistent")]) == 2
    assert "no rows of focus_table3" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists()


def test_help_texts(tmp_path, fixture_data_dir):
    bench = subprocess.run([sys.executable, "-m", "zoexp.bench", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert bench.returncode == 0 and bench.stdout.startswith("zoexp-bench:") and "bench.methods" in bench.stdout
    main = zoexp(["--help"], tmp_path, fixture_data_dir).stdout
    groups = main.split("== Config groups ==")[1].split("== Defaults ==")[0]
    choose, optional = groups.split("Optional, with -m")
    assert "method: " in choose and "experiment:" not in choose
    assert "experiment: focus_table1" in optional and "hydra/launcher: local-parallel" in optional
    assert "Exit codes" in main


def test_slurm_example_runs_with_submitit_local(tmp_path, fixture_data_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `cluster` extra")
    from zoexp.paths import conf_dir

    text = (conf_dir() / "hydra" / "launcher" / "slurm.yaml").read_text()
    command = text.split("#   zoexp -m ")[1].split("\n# (")[0].replace("\\\n#        ", " ").split()
    assert command[:2] == ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], command
    # the same sweep through submitit's local executor, on the smoke profile, two jobs only
    args = ["hydra/launcher=submitit-local", "hydra.launcher.timeout_min=15",
            *[a.replace("profile=paper", "profile=smoke") for a in command[2:]], "method=mezo", "task=sst2"]
    out = subprocess.run([sys.executable, "-m", "zoexp", "-m", *args], cwd=tmp_path, env=env(fixture_data_dir),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_rows(tmp_path / "results" / "experiments" / "focus_table3" / "smoke.jsonl")
    assert len(rows) == 2 and all(r["status"] == "ok" and r["method"] == "mezo" for r in rows)
