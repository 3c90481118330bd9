"""Tasks as data: a spec (``tasks/<name>.yaml``) turns raw dataset rows into prompts and candidates.

A spec names its data source, the splits to sample from, a Jinja prompt template, the candidates, the
gold label, the metric and a ``version`` that goes into every result row (a changed prompt bumps it).
Templates run in Jinja's sandbox: they read fields, they cannot run code. The spec keys are listed in
``tasks/README.md``; in short:

- ``prompt``: template of the text before the answer. The part wrapped in the ``truncate_left`` filter
  (``{{ context | truncate_left }}``) is the passage: when an input is too long, tokens are cut from the
  left of that part only, never from the question or the answer.
- ``candidates`` (classification): a list of templates, one expression yielding a list, or
  ``{each: <expression>, as: <name>, template: <template>}`` (one candidate per item, e.g. ReCoRD's
  entities placed into the query). ``label``: an expression giving the gold index (or a list of them);
  or ``gold``: the gold item(s) among ``each`` items (or among the rendered candidates).
- ``answers`` (generation): an expression giving the gold answers (F1/EM take the max over them);
  ``target``: the trained continuation (also the answer shown in a demonstration); ``stop`` and
  ``max_new_tokens`` bound greedy decoding.
- ``filter``: rows for which this expression is false are dropped before sampling (e.g. unlabelled rows).

The MeZO protocol (both papers follow it): for seed s, ``numpy.random.RandomState(s).permutation`` of
the train split; its first ``num_train + num_dev`` rows are the sample, of which the last ``num_dev`` are
the dev set and the rest train (MeZO's ``sample_subset`` + ``train_samples[-num_dev:]``; when the split is
too small, train shrinks, dev keeps its size); the same seed permutes the test split (the public
validation split) and the first ``num_test`` rows are the test set. Where only one split exists here,
train/dev/test are disjoint slices of one permutation of it (test first), and the result row says so.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zoexp.paths import tasks_dir
from zoexp.taskdata import DataError, Example, TaskData

log = logging.getLogger(__name__)

# Private-use characters around the truncatable passage while a prompt is rendered; removed afterwards.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _truncate_left(text: Any) -> str:
    return f"{_OPEN}{text}{_CLOSE}"


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_ENV.filters["truncate_left"] = _truncate_left
_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".tsv", ".csv", ".parquet")


def available_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_spec(name: str) -> dict:
    from omegaconf import OmegaConf

    path = tasks_dir() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str | int) else list(value)


class Task:
    """A task spec with its compiled templates."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self._where: dict[str, list[str]] = {}  # split -> "file:line" of each loaded row (error messages)
        self.name: str = spec["name"]
        # what load_split read (zoexp.provenance): {path relative to data_dir: sha256}, and hub loads
        self.files_read: dict[str, str] = {}
        self.hub_loads: list[dict] = []
        self.version = spec.get("version", 0)
        self.type: str = spec.get("type", "classification")
        if self.type not in ("classification", "generation"):
            raise DataError(f"task {self.name}: type must be classification or generation, not {self.type!r}")
        self.metric: str = spec.get("metric", "acc" if self.type == "classification" else "f1")
        self.stop: str | None = spec.get("stop", "\n")
        self.max_new_tokens: int = int(spec.get("max_new_tokens", 50))
        self._prompt = _ENV.from_string(spec["prompt"])
        cands = spec.get("candidates")
        self._cands_expr = self._cands = self._each = None
        if isinstance(cands, str):
            self._cands_expr = _ENV.compile_expression(cands)
        elif isinstance(cands, dict):
            missing = {"each", "template"} - set(cands)
            if missing:
                raise DataError(f"task {self.name}: candidates needs {sorted(missing)} in its each-form")
            self._each = (_ENV.compile_expression(cands["each"]), cands.get("as", "item"),
                          _ENV.from_string(cands["template"]), bool(cands.get("unique", True)))
        else:
            self._cands = [_ENV.from_string(c) for c in (cands or [])]
        self._label = _ENV.compile_expression(str(spec["label"])) if spec.get("label") is not None else None
        self._gold = _ENV.compile_expression(spec["gold"]) if spec.get("gold") else None
        self._answers = _ENV.compile_expression(spec["answers"]) if spec.get("answers") else None
        self._target = _ENV.from_string(spec["target"]) if spec.get("target") else None
        self._filter = _ENV.compile_expression(spec["filter"]) if spec.get("filter") else None
        has_cands = self._cands or self._cands_expr is not None or self._each is not None
        if self.type == "classification" and (not has_cands or (self._label is None and self._gold is None)):
            raise DataError(f"task {self.name}: a classification task needs `candidates` and `label` (or `gold`)")
        if self.type == "generation" and self._answers is None:
            raise DataError(f"task {self.name}: a generation task needs `answers`")

    @classmethod
    def from_config(cls, cfg: Any) -> Task:
        from omegaconf import DictConfig, OmegaConf

        spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        return cls(spec)

    # ------------------------------------------------------------------ rendering

    def render_prompt(self, row: dict) -> tuple[str, tuple[int, int] | None]:
        """The prompt text and the [start, end) span of its truncatable passage (None if unmarked)."""
        text = self._prompt.render(**row)
        start = text.find(_OPEN)
        if start < 0:
            return text, None
        end = text.find(_CLOSE, start)
        if end < 0 or text.count(_OPEN) != 1 or text.count(_CLOSE) != 1:
            raise DataError(f"task {self.name}: the prompt may mark at most one passage with truncate_left")
        return text[:start] + text[start + 1:end] + text[end + 1:], (start, end - 1)

    def render(self, row: dict, idx: Any = None) -> Example:
        prompt, passage = self.render_prompt(row)
        ex_id = row.get("idx", row.get("id", idx))
        if self.type == "generation":
            answers = [str(a) for a in _as_list(self._answers(**row))]
            if not answers:
                raise DataError(f"task {self.name}: example {ex_id!r} has no gold answer")
            target = self._target.render(**row) if self._target is not None else None
            return Example(id=ex_id, prompt=prompt, answers=answers, passage=passage, gold_target=target)
        items = None
        if self._each is not None:
            each, name, template, unique = self._each
            items = list(each(**row))
            if unique:
                items = list(dict.fromkeys(items))
            candidates = [template.render(**row, **{name: item}) for item in items]
        elif self._cands_expr is not None:
            candidates = [str(c) for c in self._cands_expr(**row)]
        else:
            candidates = [t.render(**row) for t in self._cands]
        if self._gold is not None:
            pool = items if items is not None else candidates
            wanted = _as_list(self._gold(**row))
            golds = [pool.index(g) for g in dict.fromkeys(wanted) if g in pool]
            if not golds:
                raise DataError(f"task {self.name}: example {ex_id!r}: no gold {wanted!r} among the candidates")
        else:
            golds = [int(v) for v in _as_list(self._label(**row))]
            if not golds:
                raise DataError(f"task {self.name}: example {ex_id!r} has no label "
                                f"(`{self.spec['label']}` is missing or null)")
        for label in golds:
            if not 0 <= label < len(candidates):
                raise DataError(f"task {self.name}: label {label} out of range for {len(candidates)} candidates")
        return Example(id=ex_id, prompt=prompt, candidates=candidates, label=golds[0],
                       golds=golds if len(golds) > 1 else None, passage=passage)

    # ------------------------------------------------------------------ data

    def split_names(self, role: str) -> list[str]:
        """The source split names the spec lists for ``role`` (train or test), in order of preference."""
        splits = self.spec.get("splits", {"train": "train", "test": "validation"})
        return [str(s) for s in _as_list(splits.get(role))]

    def folder(self, data_dir) -> Path:
        """The local folder holding this task's ``<split>.<ext>`` files under ``data_dir``."""
        return Path(data_dir) / self.spec.get("source", {}).get("local", self.name)

    def has_split(self, split: str, data_dir) -> bool:
        if not data_dir:
            names = self._hub_split_names()
            return names is None or split in names
        return any((self.folder(data_dir) / f"{split}{ext}").is_file() for ext in _EXTENSIONS)

    def _hub_split_names(self) -> list[str] | None:
        hub = self.spec.get("source", {}).get("hub")
        if not hub:
            return None
        try:
            import datasets

            from zoexp.provenance import hub_revision

            return list(datasets.get_dataset_split_names(*hub, revision=hub_revision(self.spec.get("source", {}))))
        except Exception:  # offline, unknown dataset: let load_split report it
            return None

    def resolve_split(self, role: str, data_dir) -> str | None:
        """The first split listed for ``role`` (train or test) that exists in the source, else None."""
        return next((s for s in self.split_names(role) if self.has_split(s, data_dir)), None)

    def load_split(self, split: str, data_dir: str | os.PathLike | None) -> list[dict]:
        source = self.spec.get("source", {})
        if data_dir:
            folder = self.folder(data_dir)
            for ext in _EXTENSIONS:
                path = folder / f"{split}{ext}"
                if path.is_file():
                    from zoexp.provenance import sha256_file

                    self.files_read[os.path.relpath(path, data_dir)] = sha256_file(path)
                    rows, self._where[split] = read_rows_located(path)
                    return rows
            raise DataError(
                f"task {self.name}: no {split} file in {folder} (tried {', '.join(split + e for e in _EXTENSIONS)}). "
                "Point data_dir (or ZOEXP_DATA_DIR) at a folder with <task>/<split>.jsonl files, "
                "or set data_dir=null to download from the Hugging Face hub."
            )
        hub = source.get("hub")
        if not hub:
            raise DataError(f"task {self.name}: no data_dir given and the spec names no hub dataset; set data_dir")
        from zoexp.provenance import hub_revision

        revision = hub_revision(source)
        if revision is None:
            log.warning("task %s: hub dataset %s has no pinned revision (source.revision); its rows may change",
                        self.name, hub[0])
        self.hub_loads.append({"dataset": list(hub), "split": split, "revision": revision or "unpinned"})
        try:
            import datasets

            rows = list(datasets.load_dataset(*hub, split=split, revision=revision))
        except Exception as exc:  # network, missing dataset, ...
            raise DataError(
                f"task {self.name}: could not load {hub} split {split!r} from the Hugging Face hub ({exc}). "
                "Without internet, point data_dir (or ZOEXP_DATA_DIR) at local copies, e.g. ../shared/data."
            ) from exc
        self._where[split] = [f"hub {hub} split {split!r} row {i}" for i in range(len(rows))]
        rename = source.get("rename") or {}
        for row in rows:
            for old, new in rename.items():
                if old in row and new not in row:
                    row[new] = row.pop(old)
        return rows

    def rows(self, split: str, data_dir, notes: list[str]) -> list[dict]:
        """The raw rows of ``split`` after the spec's ``filter`` (what was dropped is added to ``notes``)."""
        rows = self.load_split(split, data_dir)
        where = self._where.get(split) or [f"{split} row {i}" for i in range(len(rows))]
        if self._filter is not None:
            keep = [self._located(where[i], self._filter, r) for i, r in enumerate(rows)]
            if not all(keep):
                notes.append(f"{split}: dropped {len(keep) - sum(map(bool, keep))} of {len(rows)} rows by filter "
                             f"`{self.spec['filter']}`")
            rows = [r for r, k in zip(rows, keep) if k]
            where = [w for w, k in zip(where, keep) if k]
        self._where[split] = where
        if not rows:
            raise DataError(f"task {self.name}: {self.source_of(split, data_dir)} has no usable rows; "
                            "check that the file holds the task's data (or point data_dir at another copy)")
        return rows

    def source_of(self, split: str, data_dir) -> str:
        """Where split ``split`` is read from: the file, or the hub dataset."""
        if data_dir:
            folder = self.folder(data_dir)
            found = [folder / f"{split}{e}" for e in _EXTENSIONS if (folder / f"{split}{e}").is_file()]
            return str(found[0]) if found else str(folder / f"{split}.jsonl")
        return f"hub {self.spec.get('source', {}).get('hub')} split {split!r}"

    def _located(self, where: str, fn, row, *args):
        """``fn(**row)`` (or ``fn(row, *args)``); an error names the file and line of the row."""
        try:
            return fn(row, *args) if args else fn(**row)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        except Exception as exc:  # a missing field, a value of the wrong kind
            raise DataError(f"{where}: task {self.name} cannot use this row ({type(exc).__name__}: {exc}); "
                            f"each row needs the fields the spec tasks/{self.name}.yaml reads") from None

    def sample(self, seed: int, data_dir=None, num_train: int | None = None, num_dev: int | None = None,
               num_test: int | None = None) -> TaskData:
        """Train/dev/test examples for one seed, following the MeZO protocol (see module doc)."""
        spec = self.spec
        num_train = int(spec.get("num_train", 1000) if num_train is None else num_train)
        num_dev = int(spec.get("num_dev", 500) if num_dev is None else num_dev)
        num_test = int(spec.get("num_test", 1000) if num_test is None else num_test)
        if spec.get("k_shot"):  # LM-BFF's k examples per class (masked-LM prompt tasks): zoexp.kshot
            from zoexp.kshot import sample_k_shot

            return sample_k_shot(self, seed, data_dir, int(spec["k_shot"]), num_test)
        train_split = self.resolve_split("train", data_dir)
        test_split = self.resolve_split("test", data_dir)
        notes: list[str] = []
        if train_split is None and test_split is None:
            wanted = self.split_names("train") + self.split_names("test")
            where = self.folder(data_dir) if data_dir else f"hub {spec.get('source', {}).get('hub')}"
            raise DataError(f"task {self.name}: none of the splits {wanted} found in {where}. "
                            "Point data_dir (or ZOEXP_DATA_DIR) at a folder with <task>/<split>.jsonl files.")
        if train_split and test_split and train_split != test_split:
            train_rows = self.rows(train_split, data_dir, notes)
            test_rows = self.rows(test_split, data_dir, notes)
            order = np.random.RandomState(seed).permutation(len(train_rows)).tolist()
            pool = order[:num_train + num_dev]
            if num_train + num_dev > len(train_rows):
                notes.append(f"{train_split} has {len(train_rows)} rows < num_train+num_dev={num_train + num_dev}: "
                             f"dev keeps {min(num_dev, len(pool))}, train gets the rest")
            n_dev = min(num_dev, len(pool))
            train_idx, dev_idx = pool[:len(pool) - n_dev], pool[len(pool) - n_dev:]
            test_idx = np.random.RandomState(seed).permutation(len(test_rows)).tolist()[:num_test]
            if num_test > len(test_rows):
                notes.append(f"{test_split} has {len(test_rows)} rows < num_test={num_test}: test uses all "
                             f"{len(test_rows)}")
            train = [train_rows[i] for i in train_idx]
            dev = [train_rows[i] for i in dev_idx]
            test = [test_rows[i] for i in test_idx]
            splits = {"train": train_split, "dev": train_split, "test": test_split, "disjoint_from_one_split": False}
        else:
            # One split only: disjoint slices of one permutation; test first, so the test set does not
            # depend on num_train/num_dev unless the split is too small for all three.
            only = test_split or train_split
            rows = self.rows(only, data_dir, notes)
            order = np.random.RandomState(seed).permutation(len(rows)).tolist()
            n_test = min(num_test, max(len(rows) - num_train - num_dev, len(rows) // 2))
            if n_test < num_test:
                notes.append(f"{only} has {len(rows)} rows: test gets {n_test} < num_test={num_test}")
            test_idx = order[:n_test]
            pool = order[n_test:n_test + num_train + num_dev]
            n_dev = min(num_dev, len(pool))
            train_idx, dev_idx = pool[:len(pool) - n_dev], pool[len(pool) - n_dev:]
            train = [rows[i] for i in train_idx]
            dev = [rows[i] for i in dev_idx]
            test = [rows[i] for i in test_idx]
            missing = "train" if test_split else "test"
            wanted = "/".join(self.split_names(missing)) or missing
            notes.append(
                f"no {wanted} split: train/dev/test sampled disjointly from {only} "
                f"({len(train)}/{len(dev)}/{len(test)} of {len(rows)})"
            )
            splits = {"train": only, "dev": only, "test": only, "disjoint_from_one_split": True}
        for note in notes:
            log.warning("task %s: %s", self.name, note)
        def render(split: str, rows: list[dict], idx: list[int]) -> list[Example]:
            where = self._where.get(splits[split], [])
            return [self._located(where[i] if i < len(where) else f"{splits[split]} row {i}", self.render, r, i)
                    for r, i in zip(rows, idx)]

        return TaskData(
            train=render("train", train, train_idx),
            dev=render("dev", dev, dev_idx),
            test=render("test", test, test_idx),
            notes=notes,
            splits=splits,
        )


def read_rows(path: Path) -> list[dict]:
    return read_rows_located(path)[0]


def read_rows_located(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a data file and where each one is (``file:line``); a line that is not a JSON object,
    or bytes that are not UTF-8, raise ``DataError`` naming the file and the line."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith((".jsonl.gz", ".jsonl")):
            return _read_jsonl(path)
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            rows = data["data"] if isinstance(data, dict) and "data" in data else list(data)
            return rows, [f"{path} row {i + 1}" for i in range(len(rows))]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: byte {exc.start} is not UTF-8 ({exc.reason}); save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix or remove that line") from None
    rows = _read_table(path)
    return rows, [f"{path} row {i + 1}" for i in range(len(rows))]


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: byte {exc.start} of the line is not UTF-8 ({exc.reason}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                what = "truncated" if not line.endswith("\n") else "not valid JSON"  # the file's cut-off end
                raise DataError(f"{path}:{number}: {what} ({exc.msg}, column {exc.colno}); fix or remove "
                                "that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object, not {type(row).__name__}")
            rows.append(row)
            where.append(f"{path}:{number}")
    return rows, where


def _read_table(path: Path) -> list[dict]:
    name = path.name
    import pandas as pd

    if name.endswith(".parquet"):
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", quoting=3 if name.endswith(".tsv") else 0)
    return frame.to_dict(orient="records")
