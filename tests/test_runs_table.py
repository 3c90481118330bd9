"""Rows as a DataFrame (zoexp.results.to_frame) and `zoexp-report runs`: mean ± std over seeds of any rows."""

from __future__ import annotations

import csv
import statistics

import pytest

from zoexp.report import main as report_main
from zoexp.results import append_row, to_frame

ACC = {("mezo", 1e-6): [0.80, 0.82, 0.84], ("mezo", 1e-7): [0.70, 0.72, 0.74], ("focus", 1e-5): [0.86, 0.88, 0.90]}


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "runs.jsonl"
    for (method, lr), accs in ACC.items():
        for seed, acc in enumerate(accs):
            append_row(path, {"status": "ok", "method": method, "task": "sst2", "model": "smollm2-135m", "seed": seed,
                              "hparams": {"lr": lr, "eps": 1e-3}, "run": {"steps": 100, "seed": seed, "batch_size": 16},
                              "test/acc": acc, "dev/acc": acc - 0.01, "time/train_s": 10.0 + seed,
                              "curve": [{"step": 5, "loss": 1.0}]})
    append_row(path, {"status": "failed", "method": "mezo", "task": "sst2", "model": "smollm2-135m", "seed": 3,
                      "hparams": {"lr": 1e-6, "eps": 1e-3}, "run": {"steps": 100, "seed": 3, "batch_size": 16},
                      "message": "OutOfMemoryError"})
    return path


def test_to_frame_flattens_nested_fields(rows_file, tmp_path):
    df = to_frame(rows_file)
    assert len(df) == 10
    assert {"hparams.lr", "run.batch_size", "test/acc", "rows_file", "curve"} <= set(df.columns)
    assert isinstance(df["curve"].iloc[0], list)
    assert len(to_frame(rows_file, status="ok")) == 9
    assert len(to_frame(tmp_path)) == 10  # a results directory: its runs.jsonl (+ experiments/*/*.jsonl)
    assert to_frame(tmp_path / "nothing-here.jsonl").empty


def test_runs_groups_by_configuration_by_default(rows_file, tmp_path, capsys):
    out = tmp_path / "tables" / "sweep"
    assert report_main(["runs", str(rows_file), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[0] == "| method | task | model | hparams.lr | n | seeds | test/acc |"
    assert len(lines) == 2 + 3  # one line per (method, lr); the seed is never a key
    mezo = next(line for line in lines if "| mezo |" in line and "1e-06" in line)
    std = statistics.stdev([0.80, 0.82, 0.84])
    assert f"| 3 | 0,1,2 | 0.82 ± {std:.4g} |" in mezo
    assert "left out: 1 failed" in printed.err
    with open(out.with_suffix(".csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    focus = next(r for r in table if r["method"] == "focus")
    assert float(focus["test/acc mean"]) == pytest.approx(0.88)
    assert float(focus["test/acc std"]) == pytest.approx(0.02)
    assert out.with_suffix(".md").read_text().startswith("| method |")


def test_runs_group_by_and_several_metrics(rows_file, capsys):
    assert report_main(["runs", str(rows_file), "--group-by", "method", "--metric", "test/acc,time/train_s",
                        "--where", "task=sst2", "--format", "csv"]) == 0
    table = list(csv.DictReader(capsys.readouterr().out.strip().splitlines()))
    assert [r["method"] for r in table] == ["focus", "mezo"]
    mezo = table[1]
    assert mezo["n"] == "6" and float(mezo["test/acc mean"]) == pytest.approx(0.77)
    assert float(mezo["time/train_s mean"]) == pytest.approx(11.0)


def test_runs_says_what_is_wrong_in_one_line(rows_file, tmp_path, capsys):
    assert report_main(["runs", str(rows_file), "--metric", "test/f1"]) == 2
    assert "no column test/f1" in capsys.readouterr().err
    assert report_main(["runs", str(rows_file), "--group-by", "lr"]) == 2
    assert "hparams.lr" in capsys.readouterr().err
    assert report_main(["runs", str(tmp_path / "missing")]) == 2
    assert "no rows file" in capsys.readouterr().err


def test_table_rendering_is_untouched_by_the_runs_subcommand(capsys):
    assert report_main(["no_such_table", "--profile", "smoke", "--no-figures"]) == 2
    assert "no table 'no_such_table'" in capsys.readouterr().err


def test_a_copied_row_counts_once_where_its_run_is_among_the_rows(tmp_path, capsys):
    # HZO Table 3's cells are copies of HZO Table 2's runs (zoexp.sweep.shared_row): read together, one run
    # must not look like two seeds with std 0
    row = {"status": "ok", "method": "mezo", "task": "sst2", "model": "smollm2-135m", "seed": 0,
           "hparams": {"lr": 1e-6}, "run": {"steps": 100, "seed": 0}, "test/acc": 0.8}
    original = {**row, "experiment": "hzo_table2", "cell": {"model_role": "opt-13b", "job": "a1"}}
    copy = {**row, "experiment": "hzo_table3", "cell": {"model_role": "opt-30b", "job": "b2"},
            "same_run": {"experiment": "hzo_table2", "job": "a1", "run_dir": None}}
    append_row(tmp_path / "t2.jsonl", original)
    append_row(tmp_path / "t3.jsonl", copy)
    append_row(tmp_path / "t2.jsonl", {**original, "seed": 1, "run": {"steps": 100, "seed": 1}, "test/acc": 0.7,
                                       "cell": {"model_role": "opt-13b", "job": "a3"}})
    assert report_main(["runs", str(tmp_path / "t2.jsonl"), str(tmp_path / "t3.jsonl")]) == 0
    printed = capsys.readouterr()
    assert "| 2 | 0,1 | 0.75 ± 0.07071 |" in printed.out
    assert "1 copies of runs that are among the rows" in printed.err
    assert report_main(["runs", str(tmp_path / "t3.jsonl")]) == 0  # alone, the copy stands for its run
    assert "| 1 | 0 | 0.8 |" in capsys.readouterr().out
