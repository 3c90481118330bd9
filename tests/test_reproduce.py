"""The smoke profile of every paper table, end to end: `zoexp -m experiment=<table> profile=smoke` (the
Hydra sweeper plugin, tiny models, a few steps), then the report -- every cell filled, every output file
written, the paper's values beside ours. Tables whose methods or tasks do not exist in this checkout
are skipped with the missing names."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import smoke_data

from zoexp.claims import FAIL, PASS
from zoexp.report import load_layout, panels_of, report, table_claims
from zoexp.results import read_rows
from zoexp.sweep import available, cell_keys, expand, experiment_names, load_sweep

TABLES = experiment_names()


def _missing_configs(spec: dict) -> list[str]:
    prof = spec["profiles"]["smoke"]
    missing = set()
    for method, task, role, _ in cell_keys(spec):
        for kind, name in (("method", method), ("task", task), ("model", prof["models"][role])):
            if not available(kind, name):
                missing.add(f"{kind} {name}")
    return sorted(missing)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke-data")


@pytest.mark.parametrize("table", TABLES)
def test_smoke_profile_fills_every_cell(table, smoke_root, tmp_path):
    spec = load_sweep(table)
    missing = _missing_configs(spec)
    if missing:
        pytest.skip(f"{table}: not in this checkout yet: {', '.join(missing)}")
    plan = expand(spec, "smoke")
    no_data = smoke_data.build(smoke_root, {j.task for j in plan.jobs})
    if no_data:
        pytest.skip(f"{table}: {'; '.join(no_data.values())}")

    env = {**os.environ, "ZOEXP_DATA_DIR": str(smoke_root), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "zoexp", "-m", f"experiment={table}", "profile=smoke",
                          "hydra.sweeper.validate=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_rows(tmp_path / "results" / "experiments" / table / "smoke.jsonl")
    failed = [f"{r['method']}/{r['task']}: {r['status']} {r.get('message', '')}" for r in rows if r["status"] != "ok"]
    assert not failed, "\n".join(failed)
    assert len(rows) == len(plan.jobs)
    assert all(r["experiment"] == table and r["profile"] == "smoke" and r["cell"]["job"] for r in rows)

    built, written = report(table, "smoke", results_dir=tmp_path / "results")
    assert not built.missing(), [(c.row, c.column, c.missing) for c in built.missing()]
    folder = tmp_path / "results" / "tables" / "smoke"
    for ext in (".md", ".csv", ".tex", ".cells.csv"):
        assert (folder / f"{table}{ext}").stat().st_size > 0
    for fig in load_layout(table).get("figures") or []:
        for ext in (".png", ".pdf"):
            assert (tmp_path / "results" / "figures" / "smoke" / f"{fig['name']}{ext}").stat().st_size > 0

    # the paper's columns and values are in the rendered table, beside ours
    lines = list(csv.reader(open(folder / f"{table}.csv", encoding="utf-8")))
    sources = [cell for line in lines for cell in line if cell in ("paper", "ours", "ours (not in paper)")]
    layout = load_layout(table)
    papers = sum(1 for p in panels_of(layout) for r in p["rows"] if not r.get("extra"))
    assert sources.count("paper") == papers
    md = (folder / f"{table}.md").read_text()
    assert layout["source"] in md
    # the paper's claims about the table, checked on its cells (zoexp.claims)
    assert len(built.claims) == len(table_claims(table)) and "**Claims**" in md
    assert all(c.ours.verdict in (PASS, FAIL) for c in built.claims), [c for c in built.claims if c.ours.why]
    for p in panels_of(layout):
        for col in p["columns"]:
            assert col["label"] in md
