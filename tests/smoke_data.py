"""Small data folders for the smoke profile of the reproduction sweeps.

Per task: the hand-written rows of ``tests/task_fixtures.py`` when that module knows the task (no
outside data needed), else the first rows of each split of the real data (``ZOEXP_DATA_DIR`` or
``../shared/data``), else nothing (the caller skips what needs it).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from conftest import shared_data_dir

from zoexp.tasks import load_spec

N_ROWS = 400  # per split: plenty for 16 train + 8 dev + 8 test, and for k = 4 per class


def _fixture_rows(task: str, n: int) -> list[dict] | None:
    try:
        import task_fixtures
    except ImportError:
        return None
    base = task[:-4] if task.endswith("-mlm") else task
    if base not in getattr(task_fixtures, "GOLDEN", {}):
        return None
    return task_fixtures.variants(base, n)


def _split_names(spec: dict) -> list[str]:
    """Every split a spec may read (a list of alternatives: all of them)."""
    splits = spec.get("splits") or {"train": "train", "test": "validation"}
    names = []
    for role in ("train", "test"):
        value = splits.get(role)
        names += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    return names


def _copy_head(src: Path, dst: Path, n: int) -> None:
    opener = gzip.open if src.name.endswith(".gz") else open
    with opener(src, "rt", encoding="utf-8") as fh:
        lines = [line for _, line in zip(range(n), fh)]
    dst.write_text("".join(lines), encoding="utf-8")


def build(root: Path, tasks: set[str]) -> dict[str, str]:
    """Write data for ``tasks`` under ``root``; returns {task: why there is none} for the rest. Tasks that
    read the same folder (sst2 and sst2-mlm) get one folder with every split either of them reads."""
    import json

    shared = shared_data_dir()
    folders: dict[str, list[tuple[str, dict]]] = {}
    for task in sorted(tasks):
        spec = load_spec(task)
        folders.setdefault((spec.get("source") or {}).get("local", task), []).append((task, spec))
    missing = {}
    for name, users in folders.items():
        folder = root / name
        if folder.is_dir():
            continue
        rows = next((r for r in (_fixture_rows(t, 96) for t, _ in users) if r is not None), None)
        if rows is not None:
            folder.mkdir(parents=True)
            for split in sorted({s for _, spec in users for s in _split_names(spec)}):
                (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            continue
        src = shared / name if shared else None
        if src is not None and src.is_dir():
            folder.mkdir(parents=True)
            for path in sorted(src.iterdir()):
                if path.name.endswith((".jsonl", ".jsonl.gz")):
                    _copy_head(path, folder / path.name.replace(".jsonl.gz", ".jsonl"), N_ROWS)
            continue
        for task, _ in users:
            missing[task] = f"no data for task {task} (no fixture rows, no {name}/ in ZOEXP_DATA_DIR or ../shared/data)"
    return missing
