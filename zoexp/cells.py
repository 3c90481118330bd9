"""What a table cell (and a figure's line) shows for a set of result rows: row fields, quantities and
the best-by-dev choice of configuration. Shared by ``zoexp.report`` (tables) and ``zoexp.figures``
(plots), which import this module and not each other's internals.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoexp.provenance import current_hparams

# Run settings that do not define a configuration: where a run writes, how it shows progress, what it keeps
# or also tests; the rest of `run` is part of the configuration (the report's cells, zoexp-report runs).
RUN_BOOKKEEPING = frozenset({
    "seed", "progress", "results_file", "dir", "name", "resume", "eval_batch_size", "log_every", "save_best",
    "keep_best", "test_final", "device", "save_predictions", "checkpoint_every", "checkpoint_keep",
    "keep_checkpoints", "distributed", "dist_backend", "dist_timeout_min", "accumulation_steps"})


class ReportError(RuntimeError):
    """Rows that must not be put in one table (the message says which and why)."""


# --------------------------------------------------------------------------- row access


def get_path(row: dict, path: str) -> Any:
    """A row field by name: top-level keys first (``test/acc``), then dotted paths (``hparams.rank``);
    ``role`` / ``variant`` / ``k_shot`` are shorthands for ``cell.model_role`` / ``cell.variant`` /
    ``task_protocol.k_shot``."""
    path = {"role": "cell.model_role", "variant": "cell.variant", "k_shot": "task_protocol.k_shot"}.get(path, path)
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def matches(row: dict, select: dict | None) -> bool:
    for key, wanted in (select or {}).items():
        value = get_path(row, key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if not any(_equal(value, w) for w in options):
            return False
    return True


def _equal(a, b) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def metric_of(row: dict) -> str:
    proto = row.get("task_protocol") or {}
    if proto.get("metric"):
        return proto["metric"]
    return "acc" if "test/acc" in row else "f1"


def row_hparams(row: dict) -> dict | None:
    """The row's method hyperparameters as the current config names them (``current_hparams``)."""
    return current_hparams(row.get("method"), row.get("hparams"))


def config_key(row: dict) -> str:
    """Everything that defines a configuration except the seed."""
    run = {k: v for k, v in (row.get("run") or {}).items() if k not in RUN_BOOKKEEPING}
    return json.dumps({"hparams": row_hparams(row), "run": run, "dtype": row.get("dtype"),
                       "model": row.get("model"), "task_protocol": row.get("task_protocol")},
                      sort_keys=True, default=str)


def describe_config(row: dict) -> str:
    parts = [f"{k}={v}" for k, v in sorted((row_hparams(row) or {}).items()) if v is not None]
    run = row.get("run") or {}
    parts.append(f"bs={run.get('batch_size')}")
    parts.append(f"steps={row.get('steps', run.get('steps'))}")
    return " ".join(parts)


# --------------------------------------------------------------------------- quantities


def memory_bytes(row: dict) -> tuple[float | None, str]:
    for phase in ("train", "eval"):
        value = row.get(f"mem/{phase}_gpu_reserved_peak_bytes")
        if value:
            return value, "GPU"
    for phase in ("train", "eval"):
        value = row.get(f"mem/{phase}_rss_peak_bytes")
        if value:
            return value, "host RSS"
    return None, ""


def quantity(row: dict, name: str) -> Any:
    """The value a cell shows for one row (None: not recorded)."""
    if name == "test":
        value = row.get(f"test/{metric_of(row)}")
        return None if value is None else 100.0 * value
    if name == "dev":
        value = row.get(f"dev/{metric_of(row)}")
        return None if value is None else 100.0 * value
    if name == "test_final":  # the weights after the last step (run.test_final)
        value = row.get(f"test_final/{metric_of(row)}")
        return None if value is None else 100.0 * value
    if name == "memory":
        value, _ = memory_bytes(row)
        return None if value is None else value / 2**30
    if name == "time":
        return row.get("time/train_s")
    if name == "time_h":
        value = row.get("time/train_s")
        return None if value is None else value / 3600.0
    if name == "throughput":
        return row.get("tokens_per_s")
    if name == "loss":
        return row.get("train/final_loss")
    if name == "state":
        value = row.get("optimizer_state_bytes")
        return None if value is None else value / 2**30
    if name == "batch_size":
        return (row.get("run") or {}).get("batch_size")
    if name in ("dtype", "device", "model"):
        return row.get(name)
    raise ReportError(f"unknown quantity {name!r}")


TEXT_QUANTITIES = ("batch_size", "dtype", "device", "model")
TIME_QUANTITIES = ("time", "time_h", "throughput")  # measured by the training phase's wall-clock
SHARED_BELOW = 0.8  # CPU share under which a CPU run's machine counts as shared


def cpu_share(row: dict) -> float | None:
    """The share of its training phase a CPU run had its cores: process CPU seconds / (wall-clock x
    threads). None where not measurable (not a CPU run, or a row from before ``cpu/train_s``)."""
    cpu, wall, threads = row.get("cpu/train_s"), row.get("time/train_s"), row.get("threads")
    if not str(row.get("device", "")).startswith("cpu") or not (cpu and wall and threads):
        return None
    return cpu / (wall * threads)


def timing_conditions(row: dict) -> str:
    """What a row's wall-clock was measured under, as a label: threads, and whether the machine was
    shared (``cpu_share`` below ``SHARED_BELOW``). Rows whose labels differ should not be compared."""
    threads = row.get("threads")
    label = "threads not recorded" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"
    share = cpu_share(row)
    if share is not None and share < SHARED_BELOW:
        label += ", machine shared"
    return label


# --------------------------------------------------------------------------- cell selection


@dataclass
class Selection:
    rows: list[dict]  # the chosen configuration's rows (one per seed)
    n_configs: int  # configurations that were candidates
    dev: float | None  # mean dev metric of the chosen configuration (x100)
    failed: list[dict] = field(default_factory=list)  # rows that did not finish ok

    @property
    def config(self) -> str:
        return describe_config(self.rows[0]) if self.rows else ""


def run_key(row: dict) -> tuple:
    """One run: its configuration, its seed and the cell it was run for. A row with the key of an earlier
    row is the same computation made again (a re-run under other bookkeeping, e.g. run.test_final=true)."""
    return (config_key(row), *_run_identity(row))


def _run_identity(row: dict) -> tuple:
    """What tells a configuration's runs apart (its config_key aside): the seed, and the cell it was run for."""
    return (row.get("seed"), row.get("method"), row.get("task"), row.get("model"), get_path(row, "cell.model_role"),
            get_path(row, "cell.variant"))


def select_best(rows: list[dict]) -> Selection:
    """Among the configurations of ``rows``, the one with the best mean dev metric (ties: first seen)."""
    failed = [r for r in rows if r.get("status") != "ok"]
    groups: dict[str, list[dict]] = {}
    bad: set[str] = set()
    for row in rows:
        key = config_key(row)
        if row.get("status") == "ok":
            groups.setdefault(key, []).append(row)
        else:
            bad.add(key)
    # one row per run: a run made again under other bookkeeping (e.g. run.test_final=true, a new job of the
    # sweep) is the same computation, and its later row stands for it
    groups = {k: list({_run_identity(r): r for r in g}.values()) for k, g in groups.items()}
    candidates = {k: g for k, g in groups.items() if k not in bad}
    if not candidates:
        return Selection([], 0, None, failed)
    scored = []
    for key, group in candidates.items():
        devs = [quantity(r, "dev") for r in group]
        dev = statistics.fmean(devs) if all(d is not None for d in devs) else None
        scored.append((dev, key, group))
    if len(scored) > 1 and any(dev is None for dev, _, _ in scored):
        # without a dev metric for every configuration there is no honest way to choose
        return Selection([], len(scored), None, failed)
    best = max(scored, key=lambda item: -math.inf if item[0] is None else item[0])
    group = sorted(best[2], key=lambda r: r.get("seed", 0))
    return Selection(group, len(scored), best[0], failed)


PAPER_DIR = Path(__file__).resolve().parent / "paper_tables"  # each table's layout and published numbers


def table_names() -> list[str]:
    return sorted(p.stem for p in PAPER_DIR.glob("*.yaml"))


def load_layout(name: str) -> dict:
    import yaml

    path = PAPER_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ReportError(f"no table {name!r}; available: {', '.join(table_names())}")
    with open(path, encoding="utf-8") as fh:
        layout = yaml.safe_load(fh)
    layout.setdefault("name", name)
    return layout
