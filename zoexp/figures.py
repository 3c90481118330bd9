"""The papers' figures from result rows (matplotlib; PNG + PDF under ``results/figures/<profile>/``).

A figure is described in its table's data file (``zoexp/paper_tables/<table>.yaml``, key ``figures``):

- ``kind: curves`` -- training loss against steps and/or training wall-clock (``x: [step, time]``), one
  axes per panel, one line per series; each line is the chosen configuration's ``curve`` (the same
  best-by-dev choice as the table), averaged over seeds (thin lines: the single seeds);
- ``kind: bars`` -- a quantity (e.g. ``memory``) per series, grouped (e.g. per model);
- ``kind: blocks`` -- FOCUS's block activation: per block, the fraction of steps it was active and the
  mean ± std of its observed GSD scores (the rows' ``focus/block_*`` fields), one panel per row chosen.

Selections merge the table's ``select``, the figure's, the panel's (or group's) and the series' (later
wins). A panel or bar without rows says so on the plot; nothing is invented.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from zoexp.cells import matches, memory_bytes, quantity, select_best

X_LABELS = {"step": "step", "time": "training wall-clock (s)"}


def _select(*parts: dict | None) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part or {})
    return out


def _curves(rows: list[dict], select: dict) -> list[list[dict]]:
    chosen = select_best([r for r in rows if matches(r, select)])
    return [r.get("curve") or [] for r in chosen.rows if r.get("curve")]


def _mean_curve(curves: list[list[dict]], x: str) -> tuple[list[float], list[float]]:
    key = "step" if x == "step" else "train_time_s"
    steps = [tuple(p["step"] for p in c) for c in curves]
    if len(set(steps)) == 1:  # same logging steps in every seed: average pointwise
        xs = [statistics.fmean(c[i][key] for c in curves) for i in range(len(curves[0]))]
        ys = [statistics.fmean(c[i]["loss"] for c in curves) for i in range(len(curves[0]))]
        return xs, ys
    first = curves[0]
    return [p[key] for p in first], [p["loss"] for p in first]


def draw_curves(fig_spec: dict, table_select: dict, rows: list[dict], path: Path, profile: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = fig_spec.get("panels") or [{"label": "", "select": {}}]
    xs = fig_spec.get("x") or ["step"]
    # rows: the x axes (steps, wall-clock); columns: the panels (one panel: the x axes side by side)
    n_rows, n_cols = (1, len(xs)) if len(panels) == 1 else (len(xs), len(panels))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), squeeze=False)
    for j, panel in enumerate(panels):
        series = panel.get("series") or fig_spec.get("series") or []
        for i, x in enumerate(xs):
            ax = axes[0][i] if len(panels) == 1 else axes[i][j]
            drawn = 0
            for k, s in enumerate(series):
                select = _select(table_select, fig_spec.get("select"), panel.get("select"), s.get("select"))
                curves = _curves(rows, select)
                if not curves:
                    continue
                color = f"C{k}"
                if len(curves) > 1:
                    for c in curves:
                        key = "step" if x == "step" else "train_time_s"
                        ax.plot([p[key] for p in c], [p["loss"] for p in c], color=color, alpha=0.25, lw=0.8)
                mx, my = _mean_curve(curves, x)
                ax.plot(mx, my, color=color, lw=1.8, label=f"{s['label']} ({len(curves)} seed{'s' * (len(curves) > 1)})")
                drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes, color="gray")
            else:
                ax.legend(fontsize=7)
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel("training loss")
            ax.set_title(panel.get("label", ""), fontsize=9)
            ax.grid(alpha=0.3)
    width = max(40, int(4.2 * n_cols * 14))
    fig.suptitle(textwrap.fill(f"{fig_spec['title']}  [ours, {profile} profile]", width), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def draw_bars(fig_spec: dict, table_select: dict, rows: list[dict], path: Path, profile: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = fig_spec.get("groups") or [{"label": "", "select": {}}]
    series = fig_spec["series"]
    q = fig_spec.get("quantity", "memory")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(series) * len(groups), 3.6))
    width = 0.8 / len(series)
    missing, sources = [], set()
    for k, s in enumerate(series):
        for g, group in enumerate(groups):
            select = _select(table_select, fig_spec.get("select"), group.get("select"), s.get("select"))
            chosen = select_best([r for r in rows if matches(r, select)])
            values = [v for v in (quantity(r, q) for r in chosen.rows) if v is not None]
            sources.update(memory_bytes(r)[1] for r in chosen.rows)
            x = g + (k - (len(series) - 1) / 2) * width
            if not values:
                missing.append(f"{group.get('label')}/{s['label']}")
                continue
            mean = statistics.fmean(values)
            err = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.bar(x, mean, width, yerr=err or None, color=f"C{k}", label=s["label"] if g == 0 or not ax.containers else None)
            ax.text(x, mean, f"{mean:.2f}", ha="center", va="bottom", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(range(len(groups)), [g.get("label", "") for g in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)  # groups keep their place even when bars are missing
    source = "/".join(sorted(x for x in sources if x))
    ax.set_ylabel({"memory": f"peak {source} memory (GB)".replace("  ", " "),
                   "time": "training time (s)"}.get(q, q))
    title = f"{fig_spec['title']}  [ours, {profile} profile]"
    if missing:
        title += "\n" + textwrap.fill(f"no rows: {', '.join(missing)}", 110)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def draw_blocks(fig_spec: dict, table_select: dict, rows: list[dict], path: Path, profile: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    select = _select(table_select, fig_spec.get("select"))
    chosen = [r for r in select_best([r for r in rows if matches(r, select)]).rows
              if r.get("focus/block_active_frac")] if rows else []
    panels = chosen or [None]
    fig, axes = plt.subplots(2, len(panels), figsize=(max(4.5, 3.2 * len(panels)), 5.0), squeeze=False)
    for j, row in enumerate(panels):
        top, bottom = axes[0][j], axes[1][j]
        if row is None:
            top.text(0.5, 0.5, "no FOCUS rows with block statistics", ha="center", va="center", fontsize=8)
            continue
        frac = row["focus/block_active_frac"]
        blocks = range(len(frac))
        top.bar(blocks, frac, color="C0")
        k = (row.get("hparams") or {}).get("active_blocks")
        if k:
            top.axhline(min(k, len(frac)) / len(frac), color="k", lw=0.8, ls="--", label="uniform k/D")
            top.legend(fontsize=7)
        top.set_ylabel("fraction of steps active")
        top.set_title(f"{row.get('task')} seed {row.get('seed')}", fontsize=8)
        mean = [m if m is not None else float("nan") for m in row["focus/block_score_mean"]]
        std = [s if s is not None else 0.0 for s in row["focus/block_score_std"]]
        bottom.errorbar(blocks, mean, yerr=std, fmt="o", ms=3, color="C1", capsize=2)
        bottom.set_ylabel("observed GSD score (mean ± std)")
        bottom.set_xlabel("block (transformer layer)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle(f"{fig_spec['title']}  [ours, {profile} profile]", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=130)
    fig.savefig(out[1], metadata={"CreationDate": None})  # same curves, same bytes: no churn in git
    plt.close(fig)
    return out


def draw_figures(table, rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Every figure of ``table`` (a built zoexp.report.Table) drawn from ``rows``."""
    written: list[Path] = []
    for spec in table.layout.get("figures") or []:
        path = Path(out_dir) / "figures" / table.profile / spec["name"]
        draw = {"curves": draw_curves, "bars": draw_bars, "blocks": draw_blocks}[spec["kind"]]
        written += draw(spec, table.layout.get("select") or {}, rows, path, table.profile)
    return written
