"""The report: best configuration by dev (never test), mean ± std over seeds, "—" for cells without a run,
the paper's values beside ours, refusal of mismatched rows; and the consistency of the shipped tables
(every published number belongs to a cell, every runnable cell is declared by its sweep)."""

from __future__ import annotations

import json

import pytest
import yaml

import zoexp.cells as cells
import zoexp.report as report
from zoexp.report import ReportError, build, load_layout, load_rows, panels_of, table_names
from zoexp.sweep import cell_keys, experiment_names, load_sweep

TOY = {
    "title": "Toy table", "source": "Toy paper, Table 1", "select": {"role": "big"}, "quantity": "test",
    "fmt": "f1", "row_header": ["Type", "Method"],
    "columns": [{"key": "a", "label": "Task A", "select": {"task": "sst2"}},
                {"key": "b", "label": "Task B", "select": {"task": "taskb"}},
                {"key": "avg", "label": "Average", "aggregate": "mean"},
                {"key": "mem", "label": "Memory A", "quantity": "memory", "fmt": "gb2", "select": {"task": "sst2"}},
                {"key": "rel", "label": "Memory vs MeZO", "fmt": "rel", "relative": {"of": "mem", "to": "mezo"}}],
    "rows": [{"key": "mezo", "group": "ZO", "label": "MeZO", "select": {"method": "mezo"}},
             {"key": "hizoo", "group": "ZO", "label": "HiZOO", "select": {"method": "hizoo"}},
             {"key": "zs", "group": "Ref", "label": "Zero-shot", "select": {"method": "zero-shot"}, "extra": True},
             {"key": "theory", "group": "Theory", "label": "", "paper_only": True}],
    "paper": {"mezo": {"a": 91.7, "b": 64.3, "avg": 78.0, "mem": 4.4, "rel": "baseline"},
              "hizoo": {"a": [91.7, 0.5], "b": "OOM", "mem": 7.5, "rel": 72.25},
              "theory": {"a": "d", "mem": "2d"}},
    "notes": ["A toy note."],
}


def row(method="mezo", task="sst2", seed=0, lr=1e-3, dev=0.5, test=0.5, status="ok", version=1, steps=10,
        mem=2**30, **extra) -> dict:
    r = {"status": status, "method": method, "model": "tiny-opt", "task": task, "task_version": version,
         "seed": seed, "dtype": "fp32", "hparams": {"lr": lr}, "run": {"steps": steps, "batch_size": 4, "seed": seed},
         "experiment": "toy", "profile": "smoke",
         "cell": {"model_role": "big", "variant": None, "job": f"{method}-{task}-{seed}-{lr}"},
         "task_protocol": {"metric": "acc", "num_train": 16, "num_dev": 8, "num_test": 8, "k_shot": None},
         "test/acc": test, "dev/acc": dev, "mem/train_rss_peak_bytes": mem, "steps": steps,
         "curve": [{"step": s, "loss": 1.0 / s, "train_time_s": 0.1 * s} for s in (1, 2)]}
    if status != "ok":
        r.pop("test/acc")
        r["message"] = extra.pop("message", "boom")
    r.update(extra)
    return r


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "paper_tables"
    folder.mkdir()
    (folder / "toy.yaml").write_text(yaml.safe_dump(TOY, allow_unicode=True))
    monkeypatch.setattr(cells, "PAPER_DIR", folder)  # where the layouts are read (zoexp.cells)
    return folder


def cell(table, r, c, p=0):
    return table.cells[(p, r, c)]


def test_the_configuration_with_the_best_dev_metric_wins_even_if_its_test_is_worse(toy):
    rows = [row(lr=1e-3, seed=s, dev=0.8, test=t) for s, t in ((0, 0.5), (1, 0.7))]
    rows += [row(lr=1e-4, seed=s, dev=0.7, test=0.95) for s in (0, 1)]
    t = build("toy", "smoke", rows)
    a = cell(t, "mezo", "a")
    assert a.mean == pytest.approx(60.0) and a.std == pytest.approx(14.1421, abs=1e-3) and a.n == 2
    assert a.selection.n_configs == 2 and a.selection.config.startswith("lr=0.001")
    assert a.diff == pytest.approx(60.0 - 91.7)


def test_a_configuration_with_a_failed_seed_is_not_a_candidate(toy):
    rows = [row(lr=1e-3, seed=0, dev=0.9, test=0.9), row(lr=1e-3, seed=1, status="diverged")]
    rows += [row(lr=1e-4, seed=s, dev=0.6, test=0.6) for s in (0, 1)]
    a = cell(build("toy", "smoke", rows), "mezo", "a")
    assert a.mean == pytest.approx(60.0) and len(a.selection.failed) == 1


def test_cells_without_rows_are_dashes_and_failures_are_shown(toy):
    rows = [row(method="hizoo", task="sst2", status="failed", message="CUDA out of memory. Tried to allocate")]
    t = build("toy", "smoke", rows)
    assert cell(t, "hizoo", "a").text == "OOM"
    b = cell(t, "mezo", "b")
    assert b.mean is None and b.text is None and b.missing == "no run"
    assert {(c.row, c.column) for c in t.missing()} >= {("mezo", "a"), ("mezo", "b")}
    md = report.to_markdown(t)
    assert "— no run: ZO MeZO/Task A" in md and "| OOM |" in md


def test_average_relative_memory_and_paper_values_are_rendered(toy):
    rows = [row(method="mezo", task="sst2", dev=0.8, test=0.9, mem=2 * 2**30),
            row(method="mezo", task="taskb", dev=0.8, test=0.7),
            row(method="hizoo", task="sst2", dev=0.8, test=0.8, mem=3 * 2**30),
            row(method="zero-shot", task="sst2", dev=None, test=0.55, steps=0)]
    t = build("toy", "smoke", rows)
    assert cell(t, "mezo", "avg").mean == pytest.approx(80.0)
    assert cell(t, "hizoo", "avg").mean is None  # no Task B run: no average either
    assert cell(t, "mezo", "mem").mean == pytest.approx(2.0)
    assert cell(t, "hizoo", "rel").mean == pytest.approx(50.0)
    assert cell(t, "mezo", "rel").mean == pytest.approx(0.0)
    header, lines = report.grid(t, 0)
    assert header == ["Type", "Method", "", "Task A", "Task B", "Average", "Memory A", "Memory vs MeZO"]
    by_label = {tuple(line[:3]): line for line in lines}
    assert by_label[("ZO", "MeZO", "paper")][3:] == ["91.7", "64.3", "78.0", "4.40 GB", "baseline"]
    assert lines[1][3:] == ["90.0", "70.0", "80.0", "2.00 GB", "+0.00%"]
    assert lines[2][3:6] == ["−1.7", "+5.7", "+2.0"]
    assert by_label[("", "HiZOO", "paper")][3:5] == ["91.7 ± 0.5", "OOM"]
    assert ["Ref", "Zero-shot", "ours (not in paper)", "55.0"] == by_label[("Ref", "Zero-shot", "ours (not in paper)")][:4]
    assert by_label[("Theory", "", "paper")][3] == "d"
    md = report.to_markdown(t)
    assert "Toy paper, Table 1" in md and "A toy note." in md and "host RSS" in md


def test_mismatched_task_versions_are_refused(toy):
    rows = [row(seed=0, version=1), row(seed=1, version=2)]
    with pytest.raises(ReportError, match="different task versions: version 1 .1 rows., version 2 .1 rows."):
        build("toy", "smoke", rows)


def test_rows_older_than_the_current_task_spec_are_refused(toy):
    with pytest.raises(ReportError, match=r"tasks/sst2.yaml is version 1, but rows were made with version 0"):
        build("toy", "smoke", [row(version=0)])


def test_a_cell_whose_rows_ran_different_protocols_is_refused(toy):
    rows = [row(seed=0, steps=10), row(seed=1, steps=20, lr=1e-4)]
    with pytest.raises(ReportError, match="rows disagree on run.steps"):
        build("toy", "smoke", rows)


def test_the_cli_refuses_with_a_message_and_writes_nothing(toy, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row(seed=0, version=1), row(seed=1, version=2))))
    assert report.main(["toy", "--profile", "smoke", "--rows", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "refusing to build toy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tables").exists()


def test_the_cli_writes_markdown_csv_latex_and_cells(toy, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row(seed=0), row(seed=1, test=0.7))))
    assert report.main(["toy", "--profile", "smoke", "--rows", str(path), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "tables" / "smoke"
    assert "| ours | 60.0 ± 14.1 |" in (folder / "toy.md").read_text()
    assert r"60.0 $\pm$ 14.1" in (folder / "toy.tex").read_text()
    assert "ours,60.0 ± 14.1" in (folder / "toy.csv").read_text()
    cells = (folder / "toy.cells.csv").read_text()
    assert "mezo,a,test,60.0," in cells


def test_rows_are_filtered_by_table_and_profile_and_a_rerun_job_counts_once(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [row(seed=0, test=0.1), row(seed=0, test=0.2), dict(row(seed=1), profile="cpu"),
            dict(row(seed=2), experiment="other")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows("toy", "smoke", path)
    assert [r["test/acc"] for r in loaded] == [0.2]  # same job twice: the later row


# --------------------------------------------------------------------------- the shipped tables


def test_every_sweep_has_its_paper_table_and_back():
    assert set(experiment_names()) == set(table_names())
    for name in experiment_names():
        assert load_sweep(name)["table"] == name


@pytest.mark.parametrize("name", table_names())
def test_published_numbers_belong_to_cells_and_name_their_source(name):
    layout = load_layout(name)
    assert layout["source"] and layout["title"]
    for panel in panels_of(layout):
        rows = {r["key"] for r in panel["rows"]}
        cols = {c["key"] for c in panel["columns"]}
        for r, values in (panel.get("paper") or {}).items():
            assert r in rows, f"{name}: paper row {r} is not a row of the layout"
            assert set(values) <= cols, f"{name}: paper columns {set(values) - cols} are not columns"


def _declared(spec: dict, select: dict) -> bool:
    keys = {"method": 0, "task": 1, "role": 2, "variant": 3}

    def ok(cell, key, wanted):
        options = wanted if isinstance(wanted, list) else [wanted]
        return cell[keys[key]] in options

    return any(all(ok(c, k, v) for k, v in select.items() if k in keys) for c in cell_keys(spec))


@pytest.mark.parametrize("name", table_names())
def test_every_runnable_cell_is_declared_by_the_sweep(name):
    layout, spec = load_layout(name), load_sweep(name)
    for panel in panels_of(layout):
        for r in panel["rows"]:
            for c in panel["columns"]:
                if r.get("paper_only") or c.get("paper_only") or c.get("aggregate") or c.get("relative") \
                        or r.get("unavailable") or c.get("unavailable"):
                    continue
                select = {**panel.get("select", {}), **r.get("select", {}), **c.get("select", {})}
                assert _declared(spec, select), f"{name}: cell {r['key']}/{c['key']} ({select}) is not in the sweep"
        for fig in layout.get("figures") or []:
            for p in fig.get("panels") or [{}]:
                for s in p.get("series") or fig.get("series") or []:
                    select = {**layout.get("select", {}), **fig.get("select", {}), **p.get("select", {}),
                              **s.get("select", {})}
                    assert _declared(spec, select), f"{name}: figure {fig['name']} series {s['label']} has no cells"


def test_figures_are_drawn_from_the_chosen_runs(toy, tmp_path):
    pytest.importorskip("matplotlib")
    layout = dict(TOY, figures=[
        {"name": "toy_curves", "title": "curves", "kind": "curves", "x": ["step", "time"],
         "panels": [{"label": "A", "select": {"task": "sst2"}}, {"label": "B", "select": {"task": "taskb"}}],
         "series": [{"label": "MeZO", "select": {"method": "mezo"}}, {"label": "HiZOO", "select": {"method": "hizoo"}}]},
        {"name": "toy_bars", "title": "bars", "kind": "bars", "quantity": "memory",
         "series": [{"label": "MeZO", "select": {"method": "mezo"}}, {"label": "HiZOO", "select": {"method": "hizoo"}}]},
    ])
    (toy / "toy.yaml").write_text(yaml.safe_dump(layout, allow_unicode=True))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row(seed=0), row(seed=1), row(method="hizoo"))))
    _, written = report.report("toy", "smoke", rows=path, out_dir=tmp_path / "out")
    names = sorted(p.name for p in written if p.parent.parent.name == "figures")
    assert names == ["toy_bars.pdf", "toy_bars.png", "toy_curves.pdf", "toy_curves.png"]
    assert all(p.stat().st_size > 1000 for p in written if p.parent.parent.name == "figures")


def test_wall_clocks_measured_under_different_conditions_are_flagged(toy):
    layout = {**TOY, "columns": [{"key": "a", "label": "Task A", "select": {"task": "sst2"}},
                                 {"key": "t", "label": "Time", "quantity": "time", "fmt": "f1", "select": {"task": "sst2"}}]}
    (toy / "toy.yaml").write_text(yaml.safe_dump(layout, allow_unicode=True))
    cpu = "cpu: Some CPU x2"

    def timed(method, threads, cpu_s, device=cpu):
        return row(method, threads=threads, device=device, **{"time/train_s": 100.0, "cpu/train_s": cpu_s})

    alike = build("toy", "smoke", [timed("mezo", 2, 195.0), timed("hizoo", 2, 190.0)])
    assert report.timing_note(alike) is None  # same threads, device, and the cores to itself

    mixed = build("toy", "smoke", [timed("mezo", 2, 195.0), timed("hizoo", 1, 60.0)])
    note = report.timing_note(mixed)
    assert "2 threads (CPU share 0.97-0.97): ZO MeZO/Time" in note
    assert "1 thread, machine shared (CPU share 0.60-0.60): ZO HiZOO/Time" in note
    assert note in report.notes(mixed)

    shared = build("toy", "smoke", [timed("mezo", 1, 55.0), timed("hizoo", 1, 58.0)])
    assert "machine shared" in report.timing_note(shared)  # alike, but both shared: still said

    machines = build("toy", "smoke", [timed("mezo", 2, 195.0), timed("hizoo", 2, 195.0, device="cpu: Other x2")])
    note = report.timing_note(machines)
    assert "cpu: Some CPU x2, 2 threads" in note and "cpu: Other x2, 2 threads" in note

    old = build("toy", "smoke", [row("mezo", **{"time/train_s": 9.0}), timed("hizoo", 2, 195.0)])
    assert "threads not recorded: ZO MeZO/Time" in report.timing_note(old)

    # rows copied from two other tables' sweeps (zoexp.sweep.shared_row) were timed in two sessions
    copies = build("toy", "smoke", [row("mezo", **{"time/train_s": 9.0, "same_run": {"experiment": "t2"}}),
                                    row("hizoo", **{"time/train_s": 9.0, "same_run": {"experiment": "t3"}})])
    note = report.timing_note(copies)
    assert "threads not recorded, timed in t2's sweep: ZO MeZO/Time" in note
    assert "threads not recorded, timed in t3's sweep: ZO HiZOO/Time" in note


def test_the_header_says_what_the_tables_runs_cost_per_task(toy):
    rows = [row("mezo", "sst2", **{"time/total_s": 1800.0}), row("hizoo", "sst2", **{"time/total_s": 1200.0}),
            row("mezo", "taskb", **{"time/total_s": 600.0})]
    text = report.to_markdown(build("toy", "smoke", rows))
    assert "whose runs took 1 h 00 min in all (sst2 50 min, taskb 10 min)" in text
    assert "runs took" not in report.to_markdown(build("toy", "smoke", [row()]))  # no timers: nothing said


def test_cells_whose_runs_agree_up_to_the_tested_step_are_named(toy):
    """An ablation's variants that only part after the tested step (an interval longer than the run, a best
    dev step before they differ) print the same number: the report says so instead of letting it pass as
    a comparison."""
    def run(method, losses, test, best=2):
        return row(method, test=test, best_step=best, steps=4, run={"steps": 4, "batch_size": 4, "seed": 0, "keep_best": "memory"},
                   curve=[{"step": s, "loss": x} for s, x in zip((1, 2, 3, 4), losses)],
                   dev_curve=[{"step": 2, "acc": 0.6}, {"step": 4, "acc": 0.5}])

    same = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7), run("hizoo", [0.9, 0.8, 0.5, 0.4], 0.7)])
    note = report.same_weights_note(same)
    assert "ZO MeZO, ZO HiZOO on Task A (tested at step 2)" in note
    assert note in report.notes(same) and note.endswith("to test each run's final weights as well.")
    # runs that also tested their final weights (run.test_final) show them: what the variants did differently
    finals = [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7), run("hizoo", [0.9, 0.8, 0.5, 0.4], 0.7)]
    finals[0]["test_final/acc"], finals[1]["test_final/acc"] = 0.55, 0.8
    note = report.same_weights_note(build("toy", "smoke", finals))
    assert "ZO MeZO, ZO HiZOO on Task A (tested at step 2; final weights: 55.0, 80.0)." in note
    assert "Re-run" not in note

    parted = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7), run("hizoo", [0.9, 0.7, 0.5, 0.4], 0.7)])
    assert report.same_weights_note(parted) is None  # they differ before the tested step
    at_end = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7, best=4),
                                    run("hizoo", [0.9, 0.8, 0.5, 0.4], 0.7, best=4)])
    assert report.same_weights_note(at_end) is None  # tested at the end: the equal numbers are a coincidence
    same_end = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7, best=4),
                                      run("hizoo", [0.9, 0.8, 0.7, 0.6], 0.7, best=4)])
    note = report.same_weights_note(same_end)  # one computation to the end: nothing to re-run for
    assert "(tested at step 4)." in note and "Re-run" not in note
    other_test = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6], 0.7), run("hizoo", [0.9, 0.8, 0.5, 0.4], 0.6)])
    assert report.same_weights_note(other_test) is None


def test_cells_whose_runs_ended_with_a_rising_loss_are_named(toy):
    """A run that diverges without a NaN ends `ok`; the report names its cell instead of letting its number
    pass as the configuration's."""
    def run(method, losses, seed=0):
        return row(method, seed=seed, best_step=2, run={"steps": 4, "batch_size": 4, "seed": seed, "keep_best": "memory"},
                   curve=[{"step": s, "loss": x} for s, x in zip((1, 2, 3, 4), losses)])

    steady = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6]), run("hizoo", [0.9, 1.2, 1.5, 1.7])])
    assert report.loss_rose_note(steady) is None  # 1.7 / 0.9 < 2: noisy, not diverging
    rising = build("toy", "smoke", [run("mezo", [0.9, 0.8, 0.7, 0.6]), run("hizoo", [0.8, 1.0, 4.0, 7.2])])
    note = report.loss_rose_note(rising)
    assert "ZO HiZOO on Task A (1 of 1 runs: seed 0 9.0× tested at step 2)" in note and "MeZO" not in note
    assert note in report.notes(rising)


def test_loss_rise_is_the_last_logged_loss_over_the_first():
    from zoexp.results import loss_rise

    assert loss_rise([{"step": 5, "loss": 0.5}, {"step": 10, "loss": float("nan")}, {"step": 15, "loss": 2.0}]) == 4.0
    assert loss_rise([{"step": 5, "loss": 0.5}]) is None  # one point: nothing to compare
    assert loss_rise(None) is None and loss_rise([{"step": 1, "loss": 0.0}, {"step": 2, "loss": 1.0}]) is None


def test_a_run_made_again_under_other_bookkeeping_counts_once_its_later_row(toy):
    """A seed re-run with run.test_final=true (a new sweep job, the same configuration) is one run, not a
    second seed: the cell's n stays 1, no std of zero appears, and the later row (with test_final) is shown."""
    first = row(seed=0, test=0.6)
    again = row(seed=0, test=0.6, **{"test_final/acc": 0.4})
    again["cell"] = {**again["cell"], "job": "mezo-sst2-0-again"}
    again["run"] = {**again["run"], "test_final": True}
    a = cell(build("toy", "smoke", [first, again, row(seed=1, test=0.8)]), "mezo", "a")
    assert a.n == 2 and a.mean == pytest.approx(70.0) and [r.get("test_final/acc") for r in a.selection.rows] == [0.4, None]
    # rows of one configuration on different tasks (a figure over tasks selects them together) all stay
    both = cells.select_best([row(task="sst2"), row(task="taskb")])
    assert [r["task"] for r in both.rows] == ["sst2", "taskb"]
    # the table's wall-clock counts both rows, and says how much of it the later row repeats
    for r, seconds in ((first, 600.0), (again, 900.0)):
        r["time/total_s"] = seconds
    table = build("toy", "smoke", [first, again, {**row(seed=1, test=0.8), "time/total_s": 60.0}])
    assert table.rerun_s == 600.0
    assert "took 26 min in all" in report.compute_text(table) and "10 min of it is rows that a later row repeats" \
        in report.compute_text(table)
    assert "repeats" not in report.compute_text(build("toy", "smoke", [first, row(seed=1, test=0.8)]))


def test_a_cell_whose_task_has_no_offline_data_says_so_and_is_not_owed(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOEXP_DATA_DIR", str(tmp_path / "data"))  # no sst2/ there: the sweep skips such cells
    t = build("toy", "smoke", [row(task="taskb")])
    hizoo = cell(t, "hizoo", "a")
    assert hizoo.missing == f"no data for task sst2 in {tmp_path / 'data'}" and hizoo.expected
    assert hizoo not in t.missing() and cell(t, "hizoo", "b") in t.missing()  # taskb: no spec here, still owed
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    hizoo = cell(build("toy", "smoke", [row(task="taskb")]), "hizoo", "a")
    assert hizoo.missing == "no run" and not hizoo.expected


def test_rendering_all_tables_writes_an_index_with_cells_time_and_claims(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "table_names", lambda: ["toy"])
    monkeypatch.delenv("ZOEXP_DATA_DIR", raising=False)
    folder = tmp_path / "results" / "experiments" / "toy"
    folder.mkdir(parents=True)
    rows = [row(seed=0, **{"time/total_s": 3000.0}), row(seed=1, test=0.7, **{"time/total_s": 2700.0})]
    (folder / "smoke.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.main(["all", "--profile", "smoke", "--results-dir", str(tmp_path / "results"), "--no-figures"]) == 0
    index = (tmp_path / "results" / "tables" / "smoke" / "README.md").read_text()
    line = next(x for x in index.splitlines() if x.startswith("| [Toy table](toy.md)"))
    t = build("toy", "smoke", rows)
    owed = [c for c in t.cells.values() if c.reason is None and (c.filled or not c.expected)]
    assert line == f"| [Toy table](toy.md) | 2 | {sum(c.filled for c in owed)} of {len(owed)} | 1 h 35 min | ✗ | — |"
    assert 0 < sum(c.filled for c in owed) < len(owed)
    assert "written by `zoexp-report all --profile smoke`" in index.lower()
