"""What made a result row: the code of its method and the data it read.

**Code.** Which code made a result row: a version of each method's source, computed at run time.

A table must not mix rows of one method made by different code (``zoexp.report`` refuses them). The git
commit is too coarse for that -- any commit changes it -- so every row also carries ``code_version``: a
hash of the source files that define the method, i.e.

- the module of the method's class and of each of its base classes that lives in ``zoexp``,
- every ``zoexp.methods`` module those import, transitively (the ZO core: ``base``, ``noise``,
  ``philox`` and its C kernel ``philox.c``; HiZOO for FOCUS; ...).

Code outside ``zoexp.methods`` (runner, scoring, models) is shared by every method; the row's
``git_commit`` covers it.

A refactor that changes a method's files but not its results (the same bits) records the versions
before and after in ``zoexp/code_versions.yaml``, with its evidence (``tests/fingerprints.py`` run on
the old and the new code on one machine); ``canonical_code_version`` maps each version to the first of
its equivalents, and the report compares those, so rows made before and after such a refactor stay
one table. Methods without an optimizer (zero-shot, ICL) have no code version. A method class defined outside
zoexp (``docs/extending.md``) adds its own source file(s).

**Data.** Data provenance: the sha256 of every local data file a run reads, checked against the data folder's
MANIFEST.md when it has one, and pinned revisions for Hugging Face hub loads.

Rows carry ``data/sha256`` ({"sst2/train.jsonl": "7b84...", ...}, paths relative to ``data_dir``) and
``data/manifest`` (``ok`` when every file read is listed with that hash, ``mismatch: <files>`` when one is
not, ``not listed: <files>``, or null without a manifest). A hub load records
``data/hub`` = {"dataset": ..., "revision": ...}; the revision comes from the task spec's
``source.revision`` or, failing that, ``HUB_REVISIONS`` below (null = unpinned, with a warning).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
_PKG = Path(__file__).resolve().parent
METHODS_PACKAGE = "zoexp.methods"
# files a methods module uses without importing them as Python
_COMPANIONS = {"zoexp.methods.philox": ("philox.c",)}


def module_name(path: Path, root: Path) -> str:
    """``zoexp/methods/base.py`` -> ``zoexp.methods.base`` (``__init__.py`` names its package)."""
    parts = list(path.resolve().relative_to(root.resolve().parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, name: str, known: set[str] | frozenset[str]) -> set[str]:
    """The modules among ``known`` that the source of module ``name`` (file ``path``) imports, anywhere in
    the file (module level and inside functions). ``from P import n`` is ``P.n`` when that is a known
    module, else ``P``; relative imports are resolved; a submodule import does not count as one of its
    parent package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {t for t in targets if t in known and t != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the same package it imports} for the package in folder ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = frozenset(files)
    return {name: module_imports(path, name, known) for name, path in files.items()}


@functools.cache
def _methods_graph() -> dict[str, set[str]]:
    graph = import_graph(_PKG)
    return {m: {t for t in targets if t.startswith(METHODS_PACKAGE)} for m, targets in graph.items()}


def method_modules(cls: type) -> list[str]:
    """The zoexp modules that define ``cls``: its own and its zoexp base classes' modules, and every
    ``zoexp.methods`` module they import (transitively)."""
    graph = _methods_graph()
    todo = [c.__module__ for c in inspect.getmro(cls) if c.__module__ in graph]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return sorted(seen)


def _source_files(modules: list[str]) -> list[Path]:
    files = []
    for m in modules:
        path = _PKG.parent.joinpath(*m.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        files.append(path)
        files += [path.parent / extra for extra in _COMPANIONS.get(m, ())]
    return [f for f in files if f.is_file()]  # (an install without the C source hashes what it has)


def _outside_files(cls: type) -> list[Path]:
    """Source files of ``cls`` and its base classes that live outside zoexp and torch (a user's method)."""
    files = []
    for c in inspect.getmro(cls):
        if c.__module__ in _methods_graph() or c.__module__.split(".")[0] in ("torch", "builtins", "typing", "abc"):
            continue
        try:
            files.append(Path(inspect.getsourcefile(c) or ""))
        except TypeError:  # a class without a source file (built in C)
            continue
    return [f for f in files if f.is_file()]


def code_version_of(cls: type) -> str:
    """sha256 (first 12 hex digits) of the source files that define ``cls`` (see module doc)."""
    digest = hashlib.sha256()
    for path in _source_files(method_modules(cls)) + _outside_files(cls):
        name = path.relative_to(_PKG.parent).as_posix() if path.is_relative_to(_PKG.parent) else path.name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


EQUIVALENCES_FILE = _PKG / "code_versions.yaml"


def _entries() -> list[dict]:
    """The entries of ``code_versions.yaml`` (none when the file is absent)."""
    import yaml

    text = EQUIVALENCES_FILE.read_text(encoding="utf-8") if EQUIVALENCES_FILE.is_file() else ""
    return yaml.safe_load(text) or []


@functools.cache
def _canonical_versions() -> dict[tuple[str, str], str]:
    """{(method, version): the first-listed version of its equivalence class} from ``code_versions.yaml``
    (a class is the union of every entry listing the version)."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for entry in _entries():
        for method, versions in (entry.get("versions") or {}).items():
            first = find((str(method), str(versions[0])))
            for v in versions[1:]:
                root = find((str(method), str(v)))
                if root != first:
                    parent[root] = first
    return {key: find(key)[1] for key in parent}


@functools.cache
def _hparam_changes() -> dict[str, tuple[dict, frozenset]]:
    """{method: (hyperparameters a later commit added, with the value earlier rows ran with; hyperparameters
    it removed)} from the ``hparams`` of ``code_versions.yaml``'s entries."""
    changes: dict[str, tuple[dict, frozenset]] = {}
    for entry in _entries():
        for method, change in (entry.get("hparams") or {}).items():
            added, removed = changes.get(str(method), ({}, frozenset()))
            changes[str(method)] = ({**added, **(change.get("added") or {})},
                                    removed | frozenset(change.get("removed") or ()))
    return changes


def current_hparams(method, hparams: dict | None) -> dict | None:
    """A row's ``hparams`` as the current config spells them: a key a later commit removed is dropped, a
    key it added gets the value the earlier rows ran with (``code_versions.yaml``), so one configuration
    run before and after such a commit stays one configuration."""
    if hparams is None or method is None or str(method) not in _hparam_changes():
        return hparams
    added, removed = _hparam_changes()[str(method)]
    return {**added, **{k: v for k, v in hparams.items() if k not in removed}}


def canonical_code_version(method, version):
    """The version ``version`` of ``method``'s code counts as (itself unless ``code_versions.yaml`` lists it
    as computing the same bits as an earlier version)."""
    if method is None or version is None:
        return version
    return _canonical_versions().get((str(method), str(version)), version)


def method_code_version(method_cfg) -> str | None:
    """The code version of the method a config names (``_target_``); None for a method without one."""
    target = method_cfg.get("_target_") if method_cfg is not None else None
    if not target:
        return None
    module, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):  # the run fails later with the real error (building the method)
        return None
    return code_version_of(cls) if isinstance(cls, type) else None


# --------------------------------------------------------------------------- data

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


@functools.cache
def conf_code_versions() -> dict[str, str]:
    """{method config name: code version} for every config in ``conf/method`` that names a class."""
    from omegaconf import OmegaConf

    from zoexp.paths import conf_dir

    out = {}
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        version = method_code_version(OmegaConf.load(path))
        if version:
            out[path.stem] = version
    return out


if __name__ == "__main__":  # python -m zoexp.provenance: each method's current code version (for code_versions.yaml)
    for name, version in conf_code_versions().items():
        print(f"{name}: {version}")
