"""`zoexp-report runs`: an ad-hoc table of any set of rows -- mean ± std over seeds, markdown and CSV.

    zoexp-report runs                                          # results/runs.jsonl (and experiments/*/*.jsonl)
    zoexp-report runs results/experiments/focus_table3/cpu.jsonl --group-by method,task --metric test/acc
    zoexp-report runs --metric test/acc,time/train_s --where task=sst2 --out results/tables/my_sweep

Rows are read with ``zoexp.results.to_frame`` (nested fields are dotted columns: ``hparams.lr``,
``run.batch_size``). Without ``--group-by`` the groups are the configurations: method, task, model and
every ``hparams.*`` / ``run.*`` setting that differs between the rows (never the seed), so a learning-rate
grid gives one line per rate. Only ``ok`` rows are averaged (``--status`` changes that); the table says how
many rows were left out and why. Nothing is recomputed: the report reads rows only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from zoexp.cells import RUN_BOOKKEEPING

DEFAULT_KEYS = ("method", "task", "model")


def default_metric(frame) -> str:
    for name in ("test/acc", "test/f1"):
        if name in frame.columns and frame[name].notna().any():
            return name
    raise ValueError("no test/acc or test/f1 column in these rows; name one with --metric")


def varying_config_columns(frame) -> list[str]:
    """hparams.* and run.* columns (configuration, not bookkeeping) with two or more different values."""
    out = []
    for col in frame.columns:
        head, _, tail = col.partition(".")
        if head == "hparams" or (head == "run" and tail not in RUN_BOOKKEEPING):
            # missing values do not count (zero-shot rows have no hparams.lr: that does not split mezo's)
            if frame[col].dropna().map(repr).nunique() > 1:
                out.append(col)
    return out


def _std(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def summarize(frame, group_by: list[str] | None = None, metrics: list[str] | None = None):
    """One line per group: the group's keys, n (rows), seeds, and per metric its mean and std (sample std,
    ddof 1; empty for a single seed). Returns (summary DataFrame, group columns, metric columns)."""
    import pandas as pd

    metrics = metrics or [default_metric(frame)]
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in these rows; e.g. "
                         + ", ".join(c for c in frame.columns if c.startswith(("test/", "dev/", "time/")))[:300])
    keys = list(group_by) if group_by else [k for k in DEFAULT_KEYS if k in frame.columns] + varying_config_columns(frame)
    unknown = [k for k in keys if k not in frame.columns]
    if unknown:
        raise ValueError(f"no column {', '.join(unknown)} to group by (nested fields are dotted: hparams.lr, "
                         "run.batch_size, cell.variant)")
    work = frame.copy()
    for k in keys:  # lists/dicts/None are not hashable group keys: group on their text
        work[k] = work[k].map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v))
                              else (repr(v) if isinstance(v, list | dict) else v))
    lines = []
    for values, part in work.groupby(keys, sort=True, dropna=False) if keys else [((), work)]:
        values = values if isinstance(values, tuple) else (values,)
        line = dict(zip(keys, values))
        line["n"] = len(part)
        if "seed" in part.columns:
            line["seeds"] = ",".join(str(int(s)) for s in sorted(part["seed"].dropna().unique()))
        for m in metrics:
            col = pd.to_numeric(part[m], errors="coerce")
            line[f"{m} mean"] = float(col.mean()) if col.notna().any() else None
            line[f"{m} std"] = _std(col.tolist())
        lines.append(line)
    return pd.DataFrame(lines), keys, metrics


def drop_copies(frame):
    """Without the rows copied from another table's run (``same_run``, zoexp.sweep.shared_row) whose original
    row is among ``frame``: the two would count one run as two seeds. Returns (frame, rows dropped)."""
    from zoexp.sweep import job_id

    if "same_run.experiment" not in frame.columns or "cell.job" not in frame.columns:
        return frame, 0
    originals = set(zip(frame["experiment"], frame["cell.job"].map(job_id)))
    copy = [isinstance(e, str) and (e, job_id(j)) in originals
            for e, j in zip(frame["same_run.experiment"], frame["same_run.job"])]
    return frame[[not c for c in copy]], sum(copy)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(summary, keys: list[str], metrics: list[str]) -> str:
    header = [*keys, "n", *(["seeds"] if "seeds" in summary.columns else []), *metrics]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, line in summary.iterrows():
        cells = [_fmt(line[k]) for k in keys] + [str(line["n"])]
        if "seeds" in summary.columns:
            cells.append(line["seeds"])
        for m in metrics:
            mean, std = line[f"{m} mean"], line[f"{m} std"]
            cells.append(_fmt(mean) + (f" ± {_fmt(std)}" if std is not None and not math.isnan(std) else ""))
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from zoexp.results import rows_files, to_frame

    parser = argparse.ArgumentParser(prog="zoexp-report runs", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("paths", nargs="*", default=["results"],
                        help="rows files or results directories (default: results)")
    parser.add_argument("--group-by", default=None, help="comma-separated columns (default: the configurations)")
    parser.add_argument("--metric", default=None,
                        help="comma-separated columns to average (default: test/acc, else test/f1)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep rows whose column has this value (repeatable)")
    parser.add_argument("--status", default="ok", help="keep rows with this status; `all` keeps every row")
    parser.add_argument("--out", default=None, metavar="STEM", help="also write STEM.md and STEM.csv")
    parser.add_argument("--format", default="md", choices=("md", "csv"), help="what to print (default: md)")
    args = parser.parse_args(argv)

    import pandas as pd

    files = [f for p in args.paths for f in rows_files(p)]
    if not files:
        print(f"zoexp-report runs: no rows file at {', '.join(args.paths)} (a results directory holds runs.jsonl)",
              file=sys.stderr)
        return 2
    frame = pd.concat([to_frame(f) for f in files], ignore_index=True)
    total = len(frame)
    for cond in args.where:
        column, sep, wanted = cond.partition("=")
        if not sep or column not in frame.columns:
            print(f"zoexp-report runs: --where {cond!r}: need COLUMN=VALUE with a column of the rows", file=sys.stderr)
            return 2
        frame = frame[frame[column].map(lambda v: str(v)) == wanted]
    left_out = ""
    if args.status != "all" and "status" in frame.columns:
        others = frame[frame["status"] != args.status]["status"].value_counts()
        frame = frame[frame["status"] == args.status]
        if len(others):
            left_out = "; left out: " + ", ".join(f"{n} {s}" for s, n in others.items())
    frame, n_copies = drop_copies(frame)
    if n_copies:
        left_out += f"; {n_copies} copies of runs that are among the rows (a run counts once, where it ran)"
    if frame.empty:
        print(f"zoexp-report runs: none of the {total} rows is left to show{left_out}", file=sys.stderr)
        return 2
    try:
        summary, keys, metrics = summarize(frame, args.group_by.split(",") if args.group_by else None,
                                           args.metric.split(",") if args.metric else None)
    except ValueError as exc:
        print(f"zoexp-report runs: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(summary, keys, metrics)
    print(markdown if args.format == "md" else summary.to_csv(index=False), end="\n")
    note = f"{len(frame)} of {total} rows from {', '.join(str(f) for f in files)}{left_out}"
    print(note, file=sys.stderr)
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(markdown + "\n\n" + note + "\n", encoding="utf-8")
        summary.to_csv(stem.with_suffix(".csv"), index=False)
        print(f"wrote {stem.with_suffix('.md')}, {stem.with_suffix('.csv')}", file=sys.stderr)
    return 0
