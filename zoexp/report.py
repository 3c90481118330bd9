"""`zoexp-report`: the papers' tables (and figures) from result rows, with the published numbers beside ours.

    zoexp-report focus_table3 --profile cpu        # or: python -m zoexp.report focus_table3 --profile cpu
    zoexp-report all --profile smoke               # every table that has rows
    make report PROFILE=cpu                        # all tables and figures of a profile

A table's layout and published numbers are data: ``zoexp/paper_tables/<table>.yaml`` (rows, columns,
what each cell selects and shows, the paper's values, the source table and caption). Its rows come from
``results/experiments/<table>/<profile>.jsonl`` (where the table's sweep writes them). The report reads
rows only; it never runs or recomputes anything, and a cell without a usable row shows "—".

Per cell: the rows of the cell (method, task, model role, variant) are grouped by configuration
(everything but the seed); the configuration with the best mean *dev* metric is chosen (never test);
the cell shows the mean ± std over that configuration's seeds of the column's quantity (test metric,
memory, time, ...). Configurations with a failed or diverged seed are not candidates; a cell with only
failed rows shows the failure (e.g. OOM). Rows that cannot be compared are refused with a message
(different task versions, a task version other than the current spec's, different protocols in one cell,
rows of one method made by different versions of its code -- ``code_version``, zoexp.provenance;
``--newest-code`` keeps each method's newest version instead).

Under each table a Claims block checks what the paper's text says about it (``sweep.claims`` of
``conf/experiment/<table>.yaml``, language in ``zoexp.claims``) on the paper's numbers and on ours:
✓, ✗ or "not measurable here" with the reason; a claim on a mean column that is short of columns is also
checked, as an indication, on the columns measured so far (``so_far_grid``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoexp.cells import (  # noqa: F401 (PAPER_DIR, load_layout, table_names: report.X for callers)
    PAPER_DIR,
    SHARED_BELOW,
    TEXT_QUANTITIES,
    TIME_QUANTITIES,
    ReportError,
    Selection,
    cpu_share,
    get_path,
    load_layout,
    matches,
    memory_bytes,
    metric_of,
    quantity,
    run_key,
    select_best,
    table_names,
    timing_conditions,
)
from zoexp.claims import (
    FAIL,
    NOT_MEASURABLE,
    PASS,
    ClaimError,
    ClaimResult,
    Grid,
    check_claims,
    render_markdown,
)
from zoexp.provenance import canonical_code_version
from zoexp.results import LOSS_ROSE, loss_rise, read_rows
from zoexp.sweep import available, job_id, missing_data

log = logging.getLogger(__name__)

PROFILES = ("paper", "cpu", "smoke")
DASH = "—"
# Settings that must agree within a cell (else its rows were made under different protocols).
PROTOCOL_FIELDS = ("model", "task_version", "task_protocol", "dtype", "run.steps", "run.max_length",
                   "run.eval_every", "run.lr_schedule")


# --------------------------------------------------------------------------- loading and checks


def rows_path(name: str, profile: str, results_dir: str | Path = "results") -> Path:
    return Path(results_dir) / "experiments" / name / f"{profile}.jsonl"


def load_rows(name: str, profile: str, path: str | Path | None = None, results_dir: str | Path = "results") -> list[dict]:
    """The rows of table ``name`` made under ``profile``; a job run twice counts once (its latest row)."""
    path = Path(path) if path else rows_path(name, profile, results_dir)
    rows = [r for r in read_rows(path) if r.get("experiment") == name and r.get("profile") == profile
            and r.get("status") != "predicted"]  # run.dry_run=memory rows: `zoexp-report memory` (zoexp.memory_tables)
    latest: dict[str, dict] = {}
    unkeyed = []
    for row in rows:
        job = (row.get("cell") or {}).get("job")
        if job is None:
            unkeyed.append(row)
        else:
            latest[job_id(job)] = row  # file order = finishing order: later wins
    return unkeyed + list(latest.values())


def check_rows(rows: list[dict], name: str, current_versions: dict[str, Any] | None = None) -> None:
    """Refuse rows that cannot share a table (raises ReportError naming the rows and the fix)."""
    problems = []
    by_task: dict[str, dict[Any, int]] = {}
    for row in rows:
        by_task.setdefault(row.get("task"), {}).setdefault(row.get("task_version"), 0)
        by_task[row.get("task")][row.get("task_version")] += 1
    for task, versions in sorted(by_task.items(), key=lambda kv: str(kv[0])):
        if len(versions) > 1:
            listing = ", ".join(f"version {v} ({n} rows)" for v, n in versions.items())
            problems.append(f"task {task}: rows were made with different task versions: {listing}")
        if current_versions and task in current_versions:
            stale = {v: n for v, n in versions.items() if v != current_versions[task]}
            if stale:
                listing = ", ".join(f"version {v} ({n} rows)" for v, n in stale.items())
                problems.append(f"task {task}: tasks/{task}.yaml is version {current_versions[task]}, "
                                f"but rows were made with {listing}")
    cells: dict[tuple, dict[str, set]] = {}
    for row in rows:
        cell = (row.get("method"), row.get("task"), get_path(row, "role"), get_path(row, "variant"))
        seen = cells.setdefault(cell, {})
        for fld in PROTOCOL_FIELDS:
            seen.setdefault(fld, set()).add(json.dumps(get_path(row, fld), sort_keys=True, default=str))
    for cell, fields in cells.items():
        for fld, values in fields.items():
            if len(values) > 1:
                problems.append(f"cell method={cell[0]} task={cell[1]} role={cell[2]} variant={cell[3]}: "
                                f"rows disagree on {fld}: {' vs '.join(sorted(values))}")
    if problems:
        raise ReportError(
            f"refusing to build {name}: its rows come from mismatched configurations.\n  - "
            + "\n  - ".join(problems)
            + "\nRe-run the affected cells (the sweep re-runs a job whose overrides changed) or move the "
              "old rows out of the results file.")


def check_code_versions(rows: list[dict], name: str, newest: bool = False) -> list[dict]:
    """Rows of one method must come from one version of its code (``code_version``, zoexp.provenance).

    Mixed versions raise ReportError naming each method and its versions; with ``newest`` the rows of
    each method's newest version (by its latest ``started_at``) are kept instead, and the others dropped
    with a warning. Rows that predate the field count as version "unrecorded". Versions listed as
    equivalent in ``zoexp/code_versions.yaml`` (the same bits) count as one (``canonical_code_version``)."""
    by_method: dict[Any, dict[Any, list[dict]]] = {}
    for row in rows:
        version = canonical_code_version(row.get("method"), row.get("code_version"))
        by_method.setdefault(row.get("method"), {}).setdefault(version, []).append(row)
    mixed = {m: versions for m, versions in by_method.items() if len(versions) > 1}
    if not mixed:
        return rows

    def latest(group: list[dict]) -> str:
        return max(str(r.get("started_at") or "") for r in group)

    def order(versions: dict) -> list:  # newest first; unrecorded last
        return sorted(versions, key=lambda v: (v is not None, latest(versions[v])), reverse=True)

    if not newest:
        lines = [f"method {m}: " + ", ".join(f"{v or 'unrecorded'} ({len(versions[v])} rows, latest "
                                             f"{latest(versions[v]) or '?'})" for v in order(versions))
                 for m, versions in sorted(mixed.items(), key=lambda kv: str(kv[0]))]
        raise ReportError(
            f"refusing to build {name}: rows of one method were made by different versions of its code.\n  - "
            + "\n  - ".join(lines)
            + f"\nRe-run those methods' cells with the current code (zoexp -m experiment={name} "
              f"profile={rows[0].get('profile')} method={','.join(sorted(str(m) for m in mixed))} "
              "hydra.sweeper.skip_done=false; a re-run job's newest row replaces its older one), or pass "
              "--newest-code to keep only the rows of each method's newest code version.")
    dropped = set()
    for m, versions in mixed.items():
        keep = order(versions)[0]
        for v in versions:
            if v != keep:
                dropped.update(id(r) for r in versions[v])
                log.warning("%s: method %s: dropping %d rows of code version %s (newest: %s)", name, m,
                            len(versions[v]), v or "unrecorded", keep)
    return [r for r in rows if id(r) not in dropped]


def current_task_versions(tasks: set[str]) -> dict[str, Any]:
    from zoexp.tasks import load_spec

    out = {}
    for task in tasks:
        try:
            out[task] = load_spec(task).get("version", 0)
        except Exception:  # a task this install does not have: nothing to compare with
            continue
    return out


# --------------------------------------------------------------------------- table building


@dataclass
class Cell:
    row: str
    column: str
    quantity: str
    mean: float | None = None
    std: float | None = None
    n: int = 0
    text: str | None = None  # a non-numeric value (batch size, device, "OOM", ...)
    missing: str | None = None  # why there is no value ("no run", "not in the cpu profile", ...)
    expected: bool = False  # the missing value is by design (paper-only row, not in this profile, ...)
    reason: str | None = None  # why the cell cannot be run in this project at all (layout `unavailable`)
    paper: Any = None  # the published value: a number, [mean, std], or the paper's text ("OOM", "> 48G")
    selection: Selection | None = None

    @property
    def paper_value(self) -> float | None:
        value = self.paper[0] if isinstance(self.paper, list) and self.paper else self.paper
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.paper_value is None:
            return None
        return self.mean - self.paper_value

    @property
    def filled(self) -> bool:
        return self.mean is not None or self.text is not None


_PANEL_KEYS = ("select", "quantity", "fmt", "row_header")


def panels_of(layout: dict) -> list[dict]:
    """A layout's panels (sub-tables); a layout without ``panels`` is one panel. Panels inherit the
    table's ``select``, ``quantity``, ``fmt`` and ``row_header``."""
    if not layout.get("panels"):
        return [layout]
    out = []
    for panel in layout["panels"]:
        merged = {k: layout[k] for k in _PANEL_KEYS if k in layout}
        merged.update(panel)
        merged["select"] = {**(layout.get("select") or {}), **(panel.get("select") or {})}
        out.append(merged)
    return out


@dataclass
class Table:
    name: str
    profile: str
    layout: dict
    cells: dict[tuple[int, str, str], Cell]  # (panel, row key, column key)
    rows_file: str
    n_rows: int
    memory_source: str = ""
    models: dict = field(default_factory=dict)  # model role -> the profile's model
    claims: list[ClaimResult] = field(default_factory=list)  # the paper's claims, checked (zoexp.claims)
    compute_s: dict[str, float] = field(default_factory=dict)  # task -> the rows' summed time/total_s
    rerun_s: float = 0.0  # of that, ok rows whose run a later ok row made again (cells count the later one)
    shared: dict[str, int] = field(default_factory=dict)  # table -> rows that are its runs (same computation)

    def owed(self) -> list[Cell]:
        """Cells a complete run of the profile here fills (with a value or not yet)."""
        return [c for c in self.cells.values() if c.reason is None and (c.filled or not c.expected)]

    def missing(self) -> list[Cell]:
        """Cells without a value that a complete run of the profile must fill."""
        return [c for c in self.owed() if not c.filled]


def _failure_text(rows: list[dict]) -> str:
    messages = " ".join(str(r.get("message", "")) for r in rows).lower()
    if "out of memory" in messages or "outofmemory" in messages:
        return "OOM"
    return "/".join(sorted({str(r.get("status", "?")) for r in rows}))


def _profile_models(name: str, profile: str) -> dict:
    """Which model stands for which paper model in ``profile`` (from the sweep config), to say why a cell
    was not run; the numbers themselves come from rows only."""
    try:
        from zoexp.sweep import load_sweep, profile_spec

        return dict(profile_spec(load_sweep(name), profile).get("models") or {})
    except Exception:
        return {}


def build(name: str, profile: str, rows: list[dict], rows_file: str = "", check: bool = True) -> Table:
    """Fill every cell of table ``name`` from ``rows`` (already restricted to the table and profile)."""
    layout = load_layout(name)
    if check:
        check_code_versions(rows, name)
        check_rows(rows, name, current_task_versions({r.get("task") for r in rows}))
    models = _profile_models(name, profile)
    cells: dict[tuple[int, str, str], Cell] = {}
    sources: set[str] = set()
    for p, panel in enumerate(panels_of(layout)):
        paper = panel.get("paper") or {}
        for lrow in panel["rows"]:
            for col in panel["columns"]:
                q = col.get("quantity") or lrow.get("quantity") or panel.get("quantity", "test")
                cell = Cell(lrow["key"], col["key"], q, paper=(paper.get(lrow["key"]) or {}).get(col["key"]))
                cells[(p, lrow["key"], col["key"])] = cell
                if lrow.get("paper_only") or col.get("paper_only"):
                    cell.missing, cell.expected = "paper only", True
                elif col.get("aggregate") or col.get("relative"):
                    pass  # filled below from the other cells of the row
                elif lrow.get("unavailable") or col.get("unavailable") or col["key"] in (lrow.get("not_applicable") or {}):
                    cell.missing = "unavailable"
                    cell.reason = (lrow.get("unavailable") or col.get("unavailable")
                                   or lrow["not_applicable"][col["key"]])
                else:
                    select = {**(panel.get("select") or {}), **(lrow.get("select") or {}), **(col.get("select") or {})}
                    _fill(cell, select, rows, models, profile, sources)
        _fill_derived(panel, p, cells)
    table = Table(name, profile, layout, cells, rows_file, len(rows), "/".join(sorted(sources)), models)
    runs: dict[tuple, float] = {}
    for r in rows:
        if r.get("same_run"):  # another table's run (zoexp.sweep.shared_row): its time is counted there
            source = str(r["same_run"].get("experiment"))
            table.shared[source] = table.shared.get(source, 0) + 1
            continue
        table.compute_s[str(r.get("task"))] = table.compute_s.get(str(r.get("task")), 0.0) + (r.get("time/total_s") or 0.0)
        if r.get("status") == "ok":
            key = run_key(r)
            table.rerun_s += runs.get(key, 0.0)
            runs[key] = r.get("time/total_s") or 0.0
    try:
        table.claims = check_claims(table_claims(name), claims_grid(table), so_far_grid(table))
    except ClaimError as exc:  # a malformed claim in conf/experiment/<name>.yaml: say where
        raise ReportError(f"conf/experiment/{name}.yaml, sweep.claims: {exc}") from exc
    return table


def table_claims(name: str) -> list[dict]:
    """The paper's claims about table ``name``: ``sweep.claims`` of ``conf/experiment/<name>.yaml``."""
    from zoexp.sweep import SweepError, load_sweep

    try:
        return list(load_sweep(name).get("claims") or [])
    except SweepError:  # a table without a sweep config (e.g. a test's layout): no claims
        return []


def claims_grid(table: Table) -> Grid:
    """The table's cells as the claim checks see them (zoexp.claims): the paper's numbers and ours."""
    panels = panels_of(table.layout)

    def data(items: list[dict], columns: bool) -> list[str]:
        return [i["key"] for i in items if not (i.get("paper_only") or i.get("unavailable") or i.get("extra")
                                                 or (columns and (i.get("aggregate") or i.get("relative"))))]

    def ours(row: str, col: str, p: int) -> tuple[float | None, str]:
        cell = table.cells[(p, row, col)]
        if cell.mean is not None:
            return cell.mean, ""
        return None, (f"ours is {cell.text}" if cell.text else cell.reason or cell.missing or "no value")

    def paper(row: str, col: str, p: int) -> tuple[float | None, str]:
        cell = table.cells[(p, row, col)]
        if cell.paper_value is not None:
            return cell.paper_value, ""
        return None, f"the paper prints {cell.paper!r}" if cell.paper is not None else "no number in the paper"

    return Grid([data(pn["rows"], False) for pn in panels], [data(pn["columns"], True) for pn in panels],
                [{r["key"] for r in pn["rows"]} for pn in panels], [{c["key"] for c in pn["columns"]} for pn in panels],
                ours, paper)


def so_far_grid(table: Table) -> tuple[str, Grid] | None:
    """The claims grid with each mean column taken over only the columns measured so far, for the claims
    that need a mean over every column (zoexp.claims.SoFar): a column counts where every data row has our
    number and the paper's. None where no mean column is short of columns, or fewer than two are measured."""
    base = claims_grid(table)
    means: dict[tuple[int, str, str], tuple[float, float]] = {}  # (panel, row, mean column) -> (ours, paper)
    labels = []
    for p, panel in enumerate(panels_of(table.layout)):
        for col in panel["columns"]:
            if col.get("aggregate") != "mean":
                continue
            parts = mean_parts(panel, col)
            measured = [c for c in parts if all(table.cells[(p, r, c["key"])].mean is not None
                                                and table.cells[(p, r, c["key"])].paper_value is not None
                                                for r in base.rows[p])]
            if len(measured) == len(parts) or len(measured) < 2:
                continue
            labels.append(f"{', '.join(c.get('label', c['key']) for c in measured)} ({len(measured)} of {len(parts)} "
                          f"columns in {col.get('label', col['key'])})")
            for r in base.rows[p]:
                cells_ = [table.cells[(p, r, c["key"])] for c in measured]
                means[(p, r, col["key"])] = (statistics.fmean(x.mean for x in cells_),
                                             statistics.fmean(x.paper_value for x in cells_))
    if not means:
        return None

    def lookup(side: int, fallback):
        def read(row: str, col: str, p: int) -> tuple[float | None, str]:
            if (p, row, col) in means:
                return means[(p, row, col)][side], ""
            return fallback(row, col, p)
        return read

    return "; ".join(labels), Grid(base.rows, base.columns, base.all_rows, base.all_columns,
                                   lookup(0, base.ours), lookup(1, base.paper))


def _fill(cell: Cell, select: dict, rows: list[dict], models: dict, profile: str, sources: set[str]) -> None:
    role = select.get("role")
    if role is not None and models and role in models and models[role] is None:
        cell.missing, cell.expected = f"not in the {profile} profile", True
        return
    chosen = select_best([r for r in rows if matches(r, select)])
    cell.selection = chosen
    if not chosen.rows:
        if chosen.failed:
            cell.text = _failure_text(chosen.failed)
        elif chosen.n_configs > 1:
            cell.missing = f"no dev metric to choose among {chosen.n_configs} configurations"
        elif select.get("task") and available("task", select["task"]) and (
                reason := missing_data(select["task"], os.environ.get("ZOEXP_DATA_DIR"))):
            cell.missing, cell.expected = reason, True  # the sweep skips it too: a complete run here cannot fill it
        else:
            cell.missing = "no run"
        return
    values = [quantity(r, cell.quantity) for r in chosen.rows]
    cell.n = len(values)
    if cell.quantity in TEXT_QUANTITIES:
        cell.text = ", ".join(sorted({str(v) for v in values}))
        return
    if cell.quantity == "memory":
        sources.update(src for src in (memory_bytes(r)[1] for r in chosen.rows) if src)
    values = [v for v in values if v is not None]
    if not values:
        cell.missing = f"the rows do not record {cell.quantity}"
        return
    cell.mean = statistics.fmean(values)
    cell.std = statistics.stdev(values) if len(values) > 1 else None
    cell.n = len(values)


def mean_parts(panel: dict, col: dict) -> list[dict]:
    """The columns a mean column (``aggregate: mean``) averages: the panel's data columns of its quantity."""
    def q(c: dict) -> str:
        return c.get("quantity") or panel.get("quantity", "test")

    return [c for c in panel["columns"]
            if not (c.get("aggregate") or c.get("relative") or c.get("paper_only")) and q(c) == q(col)]


def _fill_derived(panel: dict, p: int, cells: dict[tuple[int, str, str], Cell]) -> None:
    for lrow in panel["rows"]:
        if lrow.get("paper_only"):
            continue
        for col in panel["columns"]:
            cell = cells[(p, lrow["key"], col["key"])]
            if col.get("aggregate") == "mean":  # over the row's columns of the same quantity
                parts = [cells[(p, lrow["key"], c["key"])] for c in mean_parts(panel, col)]
                if parts and all(x.mean is not None for x in parts):
                    cell.mean = statistics.fmean(x.mean for x in parts)
                    cell.n = min(x.n for x in parts)
                else:
                    cell.missing, cell.expected = "needs every column", True
            elif col.get("relative"):
                spec = col["relative"]  # {of: <column key>, to: <row key>}: (ours / baseline row - 1) in %
                ours = cells[(p, lrow["key"], spec["of"])]
                base = cells.get((p, spec["to"], spec["of"]))
                if ours.mean is not None and base is not None and base.mean:
                    cell.mean = 100.0 * (ours.mean / base.mean - 1.0)
                    cell.n = ours.n
                else:
                    cell.missing, cell.expected = "needs both values", True


# --------------------------------------------------------------------------- formatting


def fmt_number(value: Any, kind: str = "f1") -> str:
    if value is None:
        return DASH
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [mean, std] as the paper prints it
        return f"{fmt_number(value[0], kind)} ± {fmt_number(value[1], kind)}" if len(value) > 1 else fmt_number(value[0], kind)
    if kind == "min_s":
        total = int(round(value))
        return f"{total // 60}min {total % 60:02d}s"
    if kind == "hours":  # hours as the paper prints them; short runs in minutes or seconds
        if abs(value) >= 1:
            return f"{value:.1f}h"
        return f"{value * 60:.1f}min" if abs(value) * 60 >= 1 else f"{value * 3600:.1f}s"
    if kind == "text":
        return str(value)
    if kind == "rel":
        return f"{value:+.2f}%"
    if kind == "int":
        return f"{value:.0f}"
    if kind.startswith("gb"):
        return f"{value:.{int(kind[2:] or 1)}f} GB"
    if kind.startswith("f") and kind[1:].isdigit():
        return f"{value:.{int(kind[1:])}f}"
    return str(value)


def _plain(kind: str) -> str:
    """The number format of a column without its unit (for std and differences)."""
    if kind.startswith("gb"):
        return "f" + (kind[2:] or "1")
    return kind if (kind.startswith("f") and kind[1:].isdigit()) or kind == "int" else "f1"


def fmt_ours(cell: Cell, kind: str) -> str:
    if cell.mean is None:
        return cell.text if cell.text is not None else DASH
    text = fmt_number(cell.mean, kind)
    if cell.std is not None:
        if kind == "min_s":
            text += f" ± {cell.std:.0f}s"
        elif kind == "hours":
            text += f" ± {fmt_number(cell.std, 'hours')}"
        else:
            text += f" ± {fmt_number(cell.std, _plain(kind))}"
    return text


def fmt_diff(cell: Cell, kind: str) -> str:
    diff = cell.diff
    if diff is None:
        return ""
    sign = "+" if diff >= 0 else "−"
    if kind == "min_s":
        return sign + fmt_number(abs(diff), "min_s")
    if kind == "hours":
        return sign + fmt_number(abs(diff), "hours")
    if kind == "rel":
        return f"{sign}{abs(diff):.2f} pp"
    return sign + fmt_number(abs(diff), _plain(kind))


def grid(table: Table, p: int) -> tuple[list[str], list[list[str]]]:
    """Panel ``p`` in the paper's layout: for each of the paper's rows a `paper` line, an `ours` line and
    a `Δ` line (ours − paper). Returns (header, lines)."""
    panel = panels_of(table.layout)[p]
    head = list(panel.get("row_header") or ["Method"])
    header = head + [""] + [c["label"] for c in panel["columns"]]
    lines = []
    last_group = None
    for lrow in panel["rows"]:
        labels = _row_labels(lrow, len(head))
        if len(head) > 1:
            group = labels[0]
            if group == last_group:
                labels[0] = ""
            last_group = group
        paper_line = labels + ["paper"]
        ours_line = [""] * len(head) + ["ours"]
        diff_line = [""] * len(head) + ["Δ"]
        for col in panel["columns"]:
            cell = table.cells[(p, lrow["key"], col["key"])]
            q = col.get("quantity") or lrow.get("quantity") or panel.get("quantity", "test")
            kind = "text" if q in TEXT_QUANTITIES else (col.get("fmt") or panel.get("fmt") or "f1")
            paper_line.append(fmt_number(cell.paper, kind))
            ours_line.append(fmt_ours(cell, kind) if not col.get("paper_only") else "")
            diff_line.append(fmt_diff(cell, kind))
        if lrow.get("paper_only"):
            lines.append(paper_line)
        elif lrow.get("extra"):
            lines.append(labels + ["ours (not in paper)"] + ours_line[len(head) + 1:])
        else:
            lines.append(paper_line)
            lines.append(ours_line)
            if any(diff_line[len(head) + 1:]):
                lines.append(diff_line)
    return header, lines


def _row_labels(lrow: dict, width: int) -> list[str]:
    if width == 1:
        return [str(lrow["label"])]
    labels = [str(lrow.get("group", "")), str(lrow["label"])]
    return (labels + [""] * width)[:width]


def _models_text(table: Table) -> str:
    return ", ".join(f"{role} → {model if model else 'not run'}" for role, model in table.models.items())


def _label(items: list[dict], key: str) -> str:
    for item in items:
        if item["key"] == key:
            return " ".join(str(x) for x in (item.get("group"), item.get("label")) if x) or key
    return key


def notes(table: Table) -> list[str]:
    out = ["ours = mean ± std over seeds (std when there are ≥ 2 seeds) for the configuration with the best "
           "mean dev metric among the cell's runs (selection never looks at test); Δ = ours − paper; "
           "— = no value (never a made-up number)."]
    if table.memory_source:
        out.append(f"memory = peak {table.memory_source} memory of the training phase (of evaluation for methods "
                   "that do not train), GB = 2^30 bytes.")
    if "host RSS" in table.memory_source:
        out.append("host RSS counts the whole process (Python, libraries, data) and never shrinks: training steps "
                   "that follow a dev evaluation include what the allocator kept from it; compare methods run "
                   "alike, not with the papers' GPU numbers.")
    out += [str(n) for n in table.layout.get("notes") or []]
    missing: dict[str, list[str]] = {}
    panels = panels_of(table.layout)
    for (p, r, c), cell in table.cells.items():
        if cell.filled or cell.missing in (None, "paper only", "needs every column", "needs both values"):
            continue
        where = f"{_label(panels[p]['rows'], r)}/{_label(panels[p]['columns'], c)}"
        missing.setdefault(cell.reason or cell.missing, []).append(where)
    for reason, where in missing.items():
        shown = ", ".join(where[:10]) + (f", … ({len(where)} cells)" if len(where) > 10 else "")
        out.append(f"— {reason}: {shown}")
    for extra in (same_weights_note(table), loss_rose_note(table), timing_note(table)):
        if extra:
            out.append(extra)
    return out


def _tested_step(row: dict) -> int | None:
    """The step whose weights a trained run was tested at: the best dev step with ``run.keep_best``, else
    the last."""
    best = row.get("best_step")
    return best if best is not None and get_path(row, "run.keep_best") != "none" else row.get("steps")


def _tested_state(row: dict) -> tuple | None:
    """What identifies the weights a trained run was tested at: the logged training losses and dev
    metrics up to the tested step, and the test value. None for runs that log no training curve
    (zero-shot, ICL) or fewer than two points."""
    tested = _tested_step(row)
    if tested is None:
        return None
    losses = tuple((e.get("step"), e.get("loss")) for e in row.get("curve") or []
                   if isinstance(e.get("step"), int) and e["step"] <= tested)
    if len(losses) < 2:
        return None
    metric = metric_of(row)
    dev = tuple((e.get("step"), e.get(metric)) for e in row.get("dev_curve") or []
                if isinstance(e.get("step"), int) and e["step"] <= tested)
    return (row.get("task"), row.get("model"), row.get("seed"), tested, losses, dev, quantity(row, "test"))


def same_weights_note(table: Table) -> str | None:
    """Name the test cells of one column whose runs are the same computation up to the tested step.

    Two cells that select different runs (an ablation's variants, two methods) but whose runs logged the
    same training losses and dev metrics up to the step whose weights were tested, and print the same test
    number, do not compare what the cells' labels say: the runs only part after that step (an interval
    longer than the run, or a best dev step before the variants first differ). None when no such cells."""
    panels = panels_of(table.layout)
    groups: dict[tuple, list[tuple[str, tuple]]] = {}  # (panel, column, states) -> (row label, runs)
    for (p, r, c), cell in table.cells.items():
        sel = cell.selection
        if cell.quantity != "test" or cell.mean is None or sel is None or not sel.rows:
            continue
        states = [_tested_state(row) for row in sel.rows]
        if any(s is None for s in states):
            continue
        runs = tuple(sorted(str(row.get("run_dir") or get_path(row, "cell.job")) for row in sel.rows))
        key = (p, c, tuple(sorted(states, key=repr)))
        groups.setdefault(key, []).append((_label(panels[p]["rows"], r), runs, sel.rows))
    parts, untested = [], False
    for (p, c, states), members in groups.items():
        if len({runs for _, runs, _ in members}) < 2:  # the same runs shown twice on purpose
            continue
        part = (f"{', '.join(label for label, _, _ in members)} on {_label(panels[p]['columns'], c)} "
                f"(tested at step {states[0][3]}")  # the tested step is part of the state
        finals = [[quantity(row, "test_final") for row in rows] for _, _, rows in members]
        if all(v is not None for values in finals for v in values):  # run.test_final: the last step's weights
            part += "; final weights: " + ", ".join(f"{statistics.fmean(values):.1f}" for values in finals)
        elif any(states[0][3] < (row.get("steps") or 0) for _, _, rows in members for row in rows):
            untested = True  # tested before the last step: the final weights may tell the cells apart
        parts.append(part + ")")
    if not parts:
        return None
    return ("same tested weights: these cells' runs logged identical training losses and dev metrics up to "
            "the step whose weights were tested and print the same test number, so they do not compare "
            "their labels (the runs part only after that step, e.g. an interval longer than the run or a best "
            "dev step before the variants differ): " + "; ".join(parts) + "."
            + (" Re-run with `run.test_final=true` to test each run's final weights as well." if untested else ""))


def loss_rose_note(table: Table) -> str | None:
    """Name the cells whose selected runs ended with a training loss above ``LOSS_ROSE`` times their first
    logged loss: they were diverging without a NaN (which would have made them ``diverged``), so their
    numbers say that the configuration is unstable here. None when no cell's runs rose."""
    panels = panels_of(table.layout)
    parts = []
    for (p, r, c), cell in table.cells.items():
        sel = cell.selection
        if cell.quantity != "test" or sel is None or not sel.rows:
            continue
        rises = [(row, loss_rise(row.get("curve"))) for row in sel.rows]
        rose = [(row, x) for row, x in rises if x is not None and x > LOSS_ROSE]
        if rose:
            which = " and ".join(f"seed {row.get('seed')} {x:.1f}× tested at step {_tested_step(row)}" for row, x in rose)
            parts.append(f"{_label(panels[p]['rows'], r)} on {_label(panels[p]['columns'], c)} "
                         f"({len(rose)} of {len(rises)} runs: {which})")
    if not parts:
        return None
    return (f"rising loss: these cells' runs ended with a training loss above {LOSS_ROSE:g}× their first logged "
            "loss (diverging without a NaN, which would have made them `diverged`): "
            + "; ".join(parts) + ".")


def timing_note(table: Table) -> str | None:
    """Say when the table's wall-clock (or throughput) cells were measured under different conditions
    (device, threads, a shared machine): a time compared across them measures the machine, not the
    method. None when every such cell's rows were measured alike and no CPU run was shared."""
    panels = panels_of(table.layout)
    timed = [((p, r, c), cell.selection.rows) for (p, r, c), cell in table.cells.items()
             if cell.quantity in TIME_QUANTITIES and cell.selection and cell.selection.rows]
    several_devices = len({str(row.get("device")) for _, rows in timed for row in rows}) > 1

    def label(row: dict) -> str:  # a copied row (zoexp.sweep.shared_row) was timed in another table's sweep
        source = (row.get("same_run") or {}).get("experiment")
        return ((f"{row.get('device')}, " if several_devices else "") + timing_conditions(row)
                + (f", timed in {source}'s sweep" if source else ""))

    groups: dict[str, list[str]] = {}
    shares: dict[str, list[float]] = {}
    for (p, r, c), rows in timed:
        key = " / ".join(sorted({label(row) for row in rows}))
        groups.setdefault(key, []).append(f"{_label(panels[p]['rows'], r)}/{_label(panels[p]['columns'], c)}")
        shares.setdefault(key, []).extend(s for s in (cpu_share(row) for row in rows) if s is not None)
    if len(groups) <= 1 and not any("shared" in key for key in groups):
        return None
    parts = []
    for key, where in groups.items():
        share = shares.get(key)
        measured = f" (CPU share {min(share):.2f}-{max(share):.2f})" if share else ""
        shown = ", ".join(where[:8]) + (f", … ({len(where)} cells)" if len(where) > 8 else "")
        parts.append(f"{key}{measured}: {shown}")
    return ("wall-clock and throughput cells were measured under different conditions; compare them only "
            "within one group (CPU share = process CPU seconds / (wall-clock × threads) while training; "
            f"below {SHARED_BELOW}, the machine was shared): " + "; ".join(parts) + ".")


def selected_configs(table: Table) -> list[list[str]]:
    """One line per distinct choice: which configuration a cell's value comes from."""
    seen: dict[tuple, list[str]] = {}
    panels = panels_of(table.layout)
    for (p, r, _c), cell in table.cells.items():
        sel = cell.selection
        if sel is None or not sel.rows:
            continue
        row0 = sel.rows[0]
        key = (p, r, row0.get("task"), get_path(row0, "role"), get_path(row0, "variant"), sel.config)
        if key not in seen:
            seen[key] = [_label(panels[p]["rows"], r), str(row0.get("task")), str(row0.get("model")),
                         str(get_path(row0, "variant") or ""), sel.config,
                         fmt_number(sel.dev, "f1") if sel.dev is not None else DASH,
                         str(len(sel.rows)), str(sel.n_configs), str(len(sel.failed))]
    return list(seen.values())


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def compute_text(table: Table) -> str:
    """What the table's runs cost, by their own timers (time/total_s summed: Hydra's start-up and model
    conversion between jobs are not counted), per task where there are several."""
    total = sum(table.compute_s.values())
    n_shared = sum(table.shared.values())
    shared = (f"; {n_shared} of its rows {'is a copy' if n_shared == 1 else 'are copies'} of runs of "
              + ", ".join(f"{name} ({n})" for name, n in sorted(table.shared.items()))
              + " that compute the same thing (same model and configuration), their time counted there"
              if table.shared else "")
    if not total:
        return shared
    per_task = (" (" + ", ".join(f"{task} {duration(s)}" for task, s in table.compute_s.items()) + ")"
                if len(table.compute_s) > 1 else "")
    again = (f"; {duration(table.rerun_s)} of it is rows that a later row repeats (a cell counts each run once)"
             if table.rerun_s else "")
    return f", whose runs took {duration(total)} in all{per_task}{again}{shared}"


def to_markdown(table: Table) -> str:
    layout = table.layout
    out = [f"# {layout['title']}", "", f"Source: {layout['source']}  "]
    if layout.get("setting"):
        out.append(f"Paper setting: {layout['setting']}  ")
    models = _models_text(table)
    out += [f"Ours: profile `{table.profile}`" + (f" ({models})" if models else "")
            + f"; {table.n_rows} rows from `{table.rows_file}`{compute_text(table)}; "
            f"rendered {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    for p, panel in enumerate(panels_of(layout)):
        if panel.get("title") and len(layout.get("panels") or []) > 0:
            out += [f"**{panel['title']}**", ""]
        header, lines = grid(table, p)
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(x.replace("|", "\\|") for x in line) + " |" for line in lines]
        out.append("")
    out += render_markdown(table.claims)
    out += [f"- {n}" for n in notes(table)]
    configs = selected_configs(table)
    if configs:
        out += ["", "Selected configurations (best mean dev metric per cell):", "",
                "| row | task | model | variant | configuration | dev | seeds | configs tried | failed rows |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(c) + " |" for c in configs]
    return "\n".join(out) + "\n"


def to_csv(table: Table, path: Path) -> None:
    """The markdown table as CSV (the paper's layout; one block per panel)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for p, panel in enumerate(panels_of(table.layout)):
            header, lines = grid(table, p)
            if p:
                writer.writerow([])
            if panel.get("title") and table.layout.get("panels"):
                writer.writerow([panel["title"]])
            writer.writerow(header)
            writer.writerows(lines)


def to_cells_csv(table: Table, path: Path) -> None:
    """Raw numbers, one line per cell: the machine-readable twin of the table."""
    names = ["table", "profile", "panel", "row", "column", "quantity", "ours_mean", "ours_std", "ours_n", "ours_text",
             "missing", "paper", "diff", "configuration", "dev_mean", "configs_tried", "failed_rows"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for (p, r, c), cell in table.cells.items():
            sel = cell.selection
            writer.writerow({
                "table": table.name, "profile": table.profile, "panel": p, "row": r, "column": c,
                "quantity": cell.quantity, "ours_mean": cell.mean, "ours_std": cell.std, "ours_n": cell.n,
                "ours_text": cell.text, "missing": cell.reason or cell.missing,
                "paper": json.dumps(cell.paper) if isinstance(cell.paper, list) else cell.paper, "diff": cell.diff,
                "configuration": sel.config if sel and sel.rows else None, "dev_mean": sel.dev if sel else None,
                "configs_tried": sel.n_configs if sel else None, "failed_rows": len(sel.failed) if sel else None,
            })


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---",
        "−": "$-$", "≤": r"$\leq$", "→": r"$\rightarrow$", "×": r"$\times$", "ν": r"$\nu$", "·": r"$\cdot$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    layout = table.layout
    models = _models_text(table)
    out = [f"% {layout['title']} -- generated by zoexp-report ({table.profile} profile)",
           r"\begin{table}[t]", r"\centering", r"\small"]
    for p, panel in enumerate(panels_of(layout)):
        header, lines = grid(table, p)
        n_cols = len(panel["columns"])
        if panel.get("title") and layout.get("panels"):
            out.append(r"\textbf{" + tex_escape(panel["title"]) + r"}\\[2pt]")
        out += [r"\begin{tabular}{" + "l" * (len(header) - n_cols) + "r" * n_cols + "}", r"\toprule",
                " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(tex_escape(x) for x in line) + r" \\" for line in lines]
        out += [r"\bottomrule", r"\end{tabular}", r"\par\medskip"]
    caption = f"{layout['title']}. Paper: {layout['source']} Ours: profile {table.profile}"
    caption += f" ({models})." if models else "."
    out += [r"\caption{" + tex_escape(caption) + "}", r"\label{tab:" + f"{table.name}-{table.profile}" + "}",
            r"\end{table}"]
    return "\n".join(out) + "\n"


def write(table: Table, out_dir: str | Path = "results") -> list[Path]:
    folder = Path(out_dir) / "tables" / table.profile
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{table.name}{ext}" for ext in (".md", ".csv", ".tex", ".cells.csv")]
    paths[0].write_text(to_markdown(table), encoding="utf-8")
    to_csv(table, paths[1])
    paths[2].write_text(to_latex(table), encoding="utf-8")
    to_cells_csv(table, paths[3])
    return paths


def index_markdown(tables: list[Table], target_s: float = 90 * 60) -> str:
    """One line per rendered table of a profile: its cells run, what its runs cost, its claims' verdicts.
    ``zoexp-report all`` writes it as ``results/tables/<profile>/README.md``, so that the state of a
    reproduction is read from the rows, not counted by hand."""
    profile = tables[0].profile if tables else ""
    out = [f"# Tables of the `{profile}` profile", "",
           f"Written by `zoexp-report all --profile {profile}` on {time.strftime('%Y-%m-%d %H:%M')}, from the rows "
           "alone. *cells*: cells with a value, of those a complete run of the profile fills (cells without "
           "offline data or not in this profile are not counted). *runs' time*: the rows' own timers summed "
           "(`time/total_s`), re-runs included, copied rows not (their time counts in the table that ran them); "
           f"the issue's target is ≤ {duration(target_s)} a table on 2 cores. "
           "*claims*: the paper's claims about the table, checked on our cells (✓ holds, ✗ does not, n.m. not "
           "measurable here).", "",
           "| table | rows | cells | runs' time | ≤ target | claims ✓ / ✗ / n.m. |", "|---|---|---|---|---|---|"]
    for t in tables:
        owed = t.owed()
        total = sum(t.compute_s.values())
        verdicts = [c.ours.verdict for c in t.claims]
        claims = " / ".join(str(verdicts.count(v)) for v in (PASS, FAIL, NOT_MEASURABLE)) if verdicts else "—"
        within = "—" if not total else ("✓" if total <= target_s else "✗")
        rows = f"{t.n_rows}" + (f" ({sum(t.shared.values())} copied: same runs as in {', '.join(sorted(t.shared))})"
                                if t.shared else "")
        out.append(f"| [{t.layout['title'].split(':')[0]}]({t.name}.md) | {rows} | "
                   f"{sum(c.filled for c in owed)} of {len(owed)} | {duration(total) if total else '—'} | "
                   f"{within} | {claims} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- entry point


def report(name: str, profile: str = "cpu", results_dir: str | Path = "results", rows: str | Path | None = None,
           out_dir: str | Path | None = None, figures: bool = True,
           newest_code: bool = False) -> tuple[Table, list[Path]]:
    load_layout(name)  # an unknown table is named as such, before any rows are looked for
    path = Path(rows) if rows else rows_path(name, profile, results_dir)
    found = load_rows(name, profile, path)
    if not found:  # an all-"—" table would look like a result
        raise ReportError(f"no rows of {name} (profile {profile}) in {path}"
                          + ("" if path.exists() else " (no such file)")
                          + f"; run the sweep first (zoexp -m experiment={name} profile={profile}) or point "
                          "--results-dir / --rows at its rows")
    table_rows = check_code_versions(found, name, newest=newest_code)
    table = build(name, profile, table_rows, rows_file=str(path))
    written = write(table, out_dir or results_dir)
    if figures and table.layout.get("figures"):
        try:
            from zoexp.figures import draw_figures

            written += draw_figures(table, table_rows, out_dir or results_dir)
        except ImportError as exc:  # matplotlib is the optional `report` extra
            log.warning("figures of %s not drawn (%s); pip install 'zoexp[report]'", name, exc)
    return table, written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["runs"]:  # an ad-hoc table of any rows (zoexp.runs_table)
        from zoexp.runs_table import main as runs_main

        return runs_main(argv[1:])
    parser = argparse.ArgumentParser(prog="zoexp-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="tables: " + ", ".join(table_names())
                                     + "\n\nzoexp-report runs [PATH ...] [--group-by method,task] [--metric test/acc]: "
                                     "mean ± std over seeds of any rows (zoexp-report runs --help)")
    parser.add_argument("tables", nargs="+",
                        help="table names (see below), or `all`, or `memory` (predicted memory tables)")
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--results-dir", default="results", help="where the sweeps wrote rows (default: results)")
    parser.add_argument("--rows", default=None, help="read rows from this JSON-lines file instead")
    parser.add_argument("--out", default=None, help="output root (tables/ and figures/ under it; default: results-dir)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--newest-code", action="store_true",
                        help="where a method's rows come from different versions of its code, keep only the newest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.tables == ["memory"]:  # predicted memory tables (zoexp.memory_tables, docs/memory.md)
        from zoexp.memory_tables import ROWS_FILE, render_tables
        from zoexp.memory_tables import load_rows as predicted_rows

        print(render_tables(predicted_rows(Path(args.rows) if args.rows else ROWS_FILE)))
        return 0
    names = table_names() if args.tables == ["all"] else args.tables
    status, rendered = 0, []
    for name in names:
        path = Path(args.rows) if args.rows else rows_path(name, args.profile, args.results_dir)
        if args.tables == ["all"] and not path.exists():
            continue
        try:
            table, written = report(name, args.profile, args.results_dir, args.rows, args.out, not args.no_figures,
                                    newest_code=args.newest_code)
        except ReportError as exc:
            print(f"zoexp-report: {exc}", file=sys.stderr)
            status = 2
            continue
        print(to_markdown(table))
        print("wrote " + ", ".join(str(p) for p in written))
        rendered.append(table)
    if args.tables == ["all"] and rendered and not status:
        path = Path(args.out or args.results_dir) / "tables" / args.profile / "README.md"
        path.write_text(index_markdown(rendered), encoding="utf-8")
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
