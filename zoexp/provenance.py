"""Data provenance: the sha256 of every local data file a run reads, checked against the data folder's
MANIFEST.md when it has one, and pinned revisions for Hugging Face hub loads.

Rows carry ``data/sha256`` ({"sst2/train.jsonl": "7b84...", ...}, paths relative to ``data_dir``) and
``data/manifest`` (``ok`` when every file read is listed with that hash, ``mismatch: <files>`` when one is
not, ``not listed: <files>``, or null without a manifest). A hub load records
``data/hub`` = {"dataset": ..., "revision": ...}; the revision comes from the task spec's
``source.revision`` or, failing that, ``HUB_REVISIONS`` below (null = unpinned, with a warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Dataset repository commits on the Hugging Face hub. This project's machines reach no hub, so these could
# not be checked from here: each is the commit that public code pinning the same repository uses (found in
# public GitHub repositories; nyu-mll/glue, stanfordnlp/snli and rajpurkar/squad by several independently).
# A task spec's `source.revision` overrides its entry; `task.source.revision=main` follows the branch.
HUB_REVISIONS: dict[str, str | None] = {
    "nyu-mll/glue": "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c",
    "glue": "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c",  # the hub redirects the legacy name to nyu-mll/glue
    "aps/super_glue": "3de24cf8022e94f4ee4b9d55a6f539891524d646",
    "super_glue": "3de24cf8022e94f4ee4b9d55a6f539891524d646",  # legacy name of aps/super_glue
    "stanfordnlp/snli": "cdb5c3d5eed6ead6e5a341c8e56e669bb666725b",
    "rajpurkar/squad": "7b6d24c440a36b6815f21b70d25016731768db1f",
    "SetFit/sst5": "e51bdcd8cd3a30da231967c1a249ba59361279a3",
    "CogComp/trec": "65752bf53af25bc935a0dce92fb5b6c930728450",
    "ucinlp/drop": None,  # no pinned commit found; loads the default branch (the row says "unpinned")
}

_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime): a sweep hashes each file once."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def hub_revision(source: dict) -> str | None:
    """The revision a hub load pins: the spec's ``source.revision``, else ``HUB_REVISIONS``, else None."""
    if source.get("revision"):
        return str(source["revision"])
    hub = source.get("hub") or []
    return HUB_REVISIONS.get(str(hub[0])) if hub else None


_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|[^|]*\|\s*([0-9a-f]{64})\b")


def read_manifest(data_dir: str | os.PathLike) -> dict[str, str] | None:
    """{relative path: sha256} from ``<data_dir>/MANIFEST.md`` (a markdown table: file | rows | sha256 | ...)."""
    path = Path(data_dir) / "MANIFEST.md"
    if not path.is_file():
        return None
    listed = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m:
            listed[m.group(1)] = m.group(2)
    return listed


def check_manifest(files: dict[str, str], data_dir) -> str | None:
    """``ok`` / ``mismatch: ...`` / ``not listed: ...`` for the files read (see the module docstring)."""
    if not files or not data_dir:
        return None
    listed = read_manifest(data_dir)
    if listed is None:
        return None
    wrong = sorted(f for f, sha in files.items() if f in listed and listed[f] != sha)
    missing = sorted(f for f in files if f not in listed)
    if wrong:
        log.warning("data files differ from %s/MANIFEST.md: %s", data_dir, ", ".join(wrong))
        return "mismatch: " + ", ".join(wrong)
    if missing:
        return "not listed: " + ", ".join(missing)
    return "ok"
