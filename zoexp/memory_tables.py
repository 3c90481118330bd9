"""The papers' memory tables, predicted (``zoexp.memory``) and set beside the published numbers.

Each table's cells come from its sweep (``conf/experiment/<table>.yaml``, profile ``paper``): the
same methods, models, precisions, batch sizes and offload settings the GPU runs would use, so a change
there (e.g. the offload configuration of HZO Tables 4/7) changes the prediction. What the papers leave
open is set here, in ``OPEN``: the sequence length (tokens per example after padding), and for HZO
Table 4 the model the sweep cannot run (OPT-175B, no public weights; its architecture is in
``conf/model/opt-175b.yaml``). Predictions target a CUDA device (512-byte allocator blocks).

    python -m zoexp.memory_tables predict [TABLE ...]   # rows -> results/memory/predicted.jsonl
    python -m zoexp.memory_tables render  [TABLE ...]   # markdown: paper | predicted | Δ %

``zoexp-report`` renders the same tables from the rows (``render_tables``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

TABLES = ("hzo_table4", "focus_table1", "focus_table5", "hzo_table7")
ROWS_FILE = Path("results/memory/predicted.jsonl")

# What the paper's setting leaves open, and our choice (docs/memory.md).
OPEN: dict[str, dict[str, Any]] = {
    # SST-2 prompts (MeZO template) are 10-70 tokens; a batch is padded to its longest example
    "focus_table1": {"overrides": ["run.max_length=64"]},
    "focus_table5": {"overrides": ["run.max_length=64"], "panels": [0], "roles": ["llama-3-8b"]},  # left: memory
    "hzo_table4": {"overrides": ["run.max_length=64"],
                   "extra_roles": {"opt-175b": "opt-66b"}},  # OPT-175B: cells of OPT-66B, model opt-175b
    # RTE premise+hypothesis ~ 60-250 tokens; MultiRC paragraphs 300-700 (cut to 512 as in the cpu profile)
    "hzo_table7": {"overrides": [], "tasks": {"rte": ["run.max_length=256"], "multirc": ["run.max_length=512"]}},
}
DROP = ("method.lr", "method.eps", "method.fo_lr", "run.steps", "run.eval_every", "task.", "run.keep_best",
        "run.lr_schedule")


def _paper_table(name: str) -> dict:
    from zoexp.cells import load_layout

    return load_layout(name)


def cells(name: str) -> list[dict]:
    """One prediction job per (method, task, model role, variant) of the table's paper profile."""
    from zoexp.sweep import expand, format_value, load_sweep

    spec = load_sweep(name)
    extra = OPEN[name].get("extra_roles", {})
    for role, like in extra.items():  # a role the sweep does not run: same settings as ``like``
        prof = spec["profiles"]["paper"]
        prof["models"][role] = role
        for cell in spec["cells"]:
            if like in (cell.get("models") or []):
                cell["models"] = [*cell["models"], role]
        if like in (prof.get("roles") or {}):
            prof["roles"][role] = prof["roles"][like]
    plan = expand(spec, "paper", check_available=False)
    out, seen = [], set()
    for job in plan.jobs:
        ident = (job.method, job.task, job.role, job.variant)
        if ident in seen or job.role not in OPEN[name].get("roles", [job.role]):
            continue
        seen.add(ident)
        overrides = [f"method={job.method}", f"task={job.task}", f"model={job.model}"]
        for key, value in job.settings.items():
            if not any(key.lstrip("+").startswith(d) for d in DROP):
                if isinstance(value, list | tuple):
                    value = value[0]
                overrides.append(f"{key}={format_value(value)}")
        overrides += [*OPEN[name].get("overrides", []), *OPEN[name].get("tasks", {}).get(job.task, []),
                      "run.device=cuda", f"cell.model_role={job.role}", f"cell.variant={format_value(job.variant)}"]
        out.append({"table": name, "method": job.method, "task": job.task, "role": job.role,
                    "variant": job.variant, "overrides": overrides})
    return out


def predict_table(name: str, rows_file: Path = ROWS_FILE) -> list[dict]:
    """Predict every cell of ``name`` (rows appended to ``rows_file``, one JSON object a line)."""
    from zoexp.memory import predict

    rows_file.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for cell in cells(name):
        t0 = time.perf_counter()
        try:
            row = {**cell, **predict(cell["overrides"]), "status": "predicted"}
        except Exception as exc:  # noqa: BLE001 - the table says why
            row = {**cell, "status": "failed", "message": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = time.perf_counter() - t0
        with open(rows_file, "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        print(f"{name} {cell['method']} {cell['role']} {cell['task']} {cell['variant']}: "
              f"{row.get('memory/predicted_peak_bytes', 0) / 2**30:.2f} GiB ({row['wall_s']:.0f} s) "
              f"{row.get('message', '')}", flush=True)
        out.append(row)
    return out


def load_rows(rows_file: Path = ROWS_FILE) -> list[dict]:
    if not Path(rows_file).is_file():
        return []
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines() if line.strip()]
    for r in rows:  # rows of `zoexp -m experiment=<table> profile=paper run.dry_run=memory`
        if "cell" in r and "table" not in r:
            cell = r.get("cell") or {}
            r.update(table=r.get("experiment"), role=cell.get("model_role") or r.get("model"),
                     variant=cell.get("variant"), overrides=[f"run.max_length={r.get('memory/seq_len')}"]
                     + (["run.offload=true"] if r.get("memory/offload") else []))
    rows = [r for r in rows if r.get("status") in ("predicted", "failed") and "role" in r]
    latest = {}
    for r in rows:  # the newest prediction of a cell wins
        latest[(r.get("table"), r["method"], r["task"], r["role"], r.get("variant"))] = r
    return list(latest.values())


# --------------------------------------------------------------------------- rendering


def _matches(select: dict | None, row: dict) -> bool:
    for key, want in (select or {}).items():
        have = row.get(key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _number(value) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    return None


def _cell(paper, row: dict | None) -> tuple[str, float | None]:
    """'paper / predicted (Δ %)' and Δ % (None when the paper has no number or nothing was predicted)."""
    pv = _number(paper)
    shown = "—" if paper is None else (f"{pv:g}" if pv is not None else str(paper))
    if row is None or row.get("status") != "predicted":
        why = "n/a" if row is None else "failed"
        return f"{shown} / {why}", None
    gib = row["memory/predicted_peak_bytes"] / 2**30
    if pv is None:
        import re

        nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", str(paper))]
        text = str(paper)
        if text.startswith(">") and nums:  # "> 48G": out of memory on a card of that size
            verdict = "consistent: also > " if gib > nums[0] else "below "
            return f"{shown} / **{gib:.2f}** ({verdict}{nums[0]:g})", None
        if "≤" in text and len(nums) == 2:  # "3.6G ≤ m ≤ 4.6G": Δ to the nearest end of the range
            lo, hi = nums
            delta = 0.0 if lo <= gib <= hi else (gib / (lo if gib < lo else hi) - 1) * 100
            return f"{shown} / **{gib:.2f}** ({delta:+.0f}% to the range)", delta
        return f"{shown} / **{gib:.2f}**", None
    delta = (gib / pv - 1) * 100
    return f"{shown} / **{gib:.2f}** ({delta:+.0f}%)", delta


def _panels(table: dict, name: str) -> list[dict]:
    if table.get("panels"):
        keep = OPEN[name].get("panels")
        return [p for i, p in enumerate(table["panels"]) if keep is None or i in keep]
    return [table]


def render(name: str, rows: list[dict]) -> str:
    """Markdown of one table: each memory cell 'paper / predicted (Δ %)' in GB (GiB, as the papers'
    GPU tools print), with a per-table mean |Δ|."""
    table = _paper_table(name)
    rows = [r for r in rows if r.get("table") == name]
    lines = [f"### {table['title']} — predicted", ""]
    deltas = []
    for panel in _panels(table, name):
        select = {**(table.get("select") or {}), **(panel.get("select") or {})}
        cols = [c for c in panel["columns"]
                if (c.get("quantity") or panel.get("quantity") or table.get("quantity")) == "memory"]
        if panel is not table:
            lines += [f"**{panel['title']}**", ""]
        lines.append("| " + " | ".join([*(panel.get("row_header") or ["Row"]), *(c["label"] for c in cols)]) + " |")
        lines.append("|" + "---|" * (len(panel.get("row_header") or ["Row"]) + len(cols)))
        for prow in panel["rows"]:
            if prow.get("paper_only"):
                continue
            label = [prow.get("group") or "", prow.get("label") or ""][-len(panel.get("row_header") or ["Row"]):]
            cells_out = []
            for col in cols:
                want = {**select, **(prow.get("select") or {}), **(col.get("select") or {})}
                want = {("role" if k == "role" else k): v for k, v in want.items()}
                match = [r for r in rows if _matches(want, r)]
                paper = ((panel.get("paper") or table.get("paper") or {}).get(prow["key"]) or {}).get(col["key"])
                text, delta = _cell(paper, match[0] if match else None)
                if delta is not None:
                    deltas.append(delta)
                cells_out.append(text)
            lines.append("| " + " | ".join([*label, *cells_out]) + " |")
        lines.append("")
    if deltas:
        lines.append(f"Cells: paper GB / **predicted GiB** (Δ % = predicted / paper − 1); mean |Δ| "
                     f"{sum(abs(d) for d in deltas) / len(deltas):.0f}% over {len(deltas)} cells.")
    times = [r["memory/predict_s"] for r in rows if r.get("memory/predict_s")]
    if times:
        lines.append(f"Prediction time per cell: {min(times):.0f}–{max(times):.0f} s (median "
                     f"{sorted(times)[len(times) // 2]:.0f} s).")
    settings = sorted({" ".join(o for o in r["overrides"] if o.startswith(("run.max_length", "run.offload")))
                       for r in rows if r.get("overrides")})
    if settings:
        lines.append("Open settings chosen: " + "; ".join(s or "(defaults)" for s in settings) + ".")
    return "\n".join(lines) + "\n"


def breakdown(name: str, rows: list[dict]) -> str:
    """Per cell: the predicted peak split by category (GiB), and the prediction's time."""
    from zoexp.memory import CATEGORIES

    rows = [r for r in rows if r.get("table") == name and r.get("status") == "predicted"]
    if not rows:
        return ""
    head = ["method", "model", "variant/task", "dtype", "batch × len", "offload", "peak",
            *CATEGORIES, "host", "time (cpu) s"]
    lines = [f"Breakdown ({name}, GiB):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["method"], r.get("memory/model_params", 0), str(r.get("variant")))):
        def g(k: str, r: dict = r) -> float:
            return r.get(k, 0) / 2**30

        cpu = r.get("memory/predict_cpu_s")
        lines.append("| " + " | ".join([
            r["method"], r["role"], str(r.get("variant") or r["task"]), str(r.get("memory/dtype")),
            f"{r.get('memory/batch_size')} × {r.get('memory/seq_len')}",
            f"ring {r['memory/offload_ring']}" if r.get("memory/offload") else "—",
            f"{g('memory/predicted_peak_bytes'):.2f}", *(f"{g(f'memory/predicted/{c}_bytes'):.2f}" for c in CATEGORIES),
            f"{g('memory/host_bytes'):.1f}",
            f"{r.get('memory/predict_s', 0):.0f}" + (f" ({cpu:.0f})" if cpu else "")]) + " |")
    return "\n".join(lines) + "\n"


def timing(rows: list[dict]) -> str:
    """Prediction time per model: wall-clock and CPU seconds (min–max over the cells)."""
    per: dict[str, list] = {}
    for r in rows:
        if r.get("status") == "predicted" and r.get("memory/predict_s"):
            per.setdefault(r["role"], []).append((r["memory/predict_s"], r.get("memory/predict_cpu_s"),
                                                  r.get("memory/model_params", 0)))
    if not per:
        return ""
    lines = ["| model | parameters | cells | wall-clock s | CPU s |", "|---|---|---|---|---|"]
    for role, vals in sorted(per.items(), key=lambda kv: kv[1][0][2]):
        walls = [v[0] for v in vals]
        cpus = [v[1] for v in vals if v[1]]
        cpu = f"{min(cpus):.0f}–{max(cpus):.0f}" if cpus else "—"
        lines.append(f"| {role} | {vals[0][2] / 1e9:.2f} B | {len(vals)} | {min(walls):.0f}–{max(walls):.0f} | {cpu} |")
    return "\n".join(lines) + "\n"


def render_tables(rows: list[dict] | None = None, names=TABLES, details: bool = False) -> str:
    rows = load_rows() if rows is None else rows
    return "\n".join(render(n, rows) + ("\n" + breakdown(n, rows) if details else "")
                     for n in names if any(r.get("table") == n for r in rows))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("predict", "render", "cells"):
        print(__doc__)
        return 2
    names = argv[1:] or list(TABLES)
    if argv[0] == "cells":
        for n in names:
            for c in cells(n):
                print(n, " ".join(c["overrides"]))
    elif argv[0] == "predict":
        for n in names:
            predict_table(n)
    else:
        print(render_tables(names=names, details=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

