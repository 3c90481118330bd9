"""Result rows: one JSON object per finished (or failed) run, appended atomically to a JSON-lines file.

A row is written with a single ``write`` on a file opened for appending, under an exclusive lock, then
flushed to disk: concurrent runs of a sweep never interleave, and a killed run never leaves half a
row. Readers skip (and report) any line that does not parse, so nothing already written is lost.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)


def _clean(value):
    """JSON-safe values: non-finite floats become None, tensors and paths become numbers/strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def append_row(path: str | os.PathLike, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_clean(row), sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn last line (killed writer) stays its own line
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d is not a complete row (skipped)", path, number)
    return rows


@functools.cache
def git_commit() -> str | None:
    """Commit of the source checkout zoexp runs from (None for an installed wheel outside git).

    Read once per process: the code that runs is the code imported at start, whatever happens to the
    checkout during a long sweep (and a sweep of hundreds of runs spawns git only once)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("zoexp", "torch", "transformers", "hydra-core", "datasets", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


#: a run whose last logged training loss is this many times its first is named as rising (diverging without
#: a NaN, which would have stopped it as ``diverged``): by the runner's warning and the report's note
LOSS_ROSE = 2.0


def loss_rise(curve: list[dict] | None) -> float | None:
    """The last logged training loss over the first (``curve``: a row's ``curve``); None with fewer than two
    finite points or a first loss that is not positive."""
    losses = [p.get("loss") for p in curve or []]
    losses = [x for x in losses if isinstance(x, int | float) and math.isfinite(x)]
    if len(losses) < 2 or losses[0] <= 0:
        return None
    return losses[-1] / losses[0]


def rows_files(path: str | os.PathLike) -> list[Path]:
    """The JSON-lines row files at ``path``: the file itself, or for a results directory its ``runs.jsonl``
    and the reproduction sweeps' ``experiments/<table>/<profile>.jsonl``."""
    path = Path(path)
    if path.is_dir():
        return [p for p in [path / "runs.jsonl", *sorted(path.glob("experiments/*/*.jsonl"))] if p.is_file()]
    return [path] if path.exists() else []


def to_frame(path: str | os.PathLike = "results", status: str | None = None):
    """Result rows as a pandas DataFrame, one row per run.

    ``path``: a rows file (``results/runs.jsonl``, ``results/experiments/focus_table3/cpu.jsonl``) or a
    results directory (all of its row files). Nested fields become dotted columns (``hparams.lr``,
    ``run.batch_size``, ``versions.torch``, ``cell.variant``); metric keys stay as they are (``test/acc``,
    ``dev/acc``, ``time/train_s``); lists (``curve``, ``dev_curve``) stay lists. ``rows_file`` says where
    each row came from. ``status`` keeps only rows with that status (e.g. ``"ok"``).

        >>> from zoexp.results import to_frame
        >>> df = to_frame("results/runs.jsonl", status="ok")
        >>> df.groupby(["method", "task"])["test/acc"].agg(["mean", "std", "count"])
    """
    import pandas as pd

    rows = []
    for file in rows_files(path):
        rows.extend({**row, "rows_file": str(file)} for row in read_rows(file))
    if status is not None:
        rows = [r for r in rows if r.get("status") == status]
    if not rows:
        return pd.DataFrame()
    # dicts inside lists (curve points) are left alone; only nested dicts become columns
    return pd.json_normalize(rows, sep=".")
