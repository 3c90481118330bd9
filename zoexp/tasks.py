"""Tasks as data: a spec (``tasks/<name>.yaml``) turns raw dataset rows into prompts and candidates.

A spec names its data source, the splits to sample from, a Jinja prompt template, the candidates (a
list of templates, or one expression that yields a list), the gold label expression, the metric and a
``version`` that goes into every result row (a changed prompt bumps it). Templates run in Jinja's
sandbox: they read fields, they cannot run code.

The MeZO protocol (both papers follow it): for seed s, permute the train split with
``numpy.random.RandomState(s)``; the first ``num_train`` rows train, the next ``num_dev`` are the dev
set; permute the test split (the public validation split) with the same seed and keep ``num_test``.
Where a task has no train split here, train/dev/test are disjoint slices of one permutation of the
split that exists, and the result row says so.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zoexp.paths import tasks_dir

log = logging.getLogger(__name__)

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".tsv", ".csv", ".parquet")


class DataError(RuntimeError):
    pass


@dataclass
class Example:
    """One rendered example: the prompt, its candidates (classification) or gold answers (generation)."""

    id: Any
    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: int | None = None  # index of the gold candidate
    answers: list[str] = field(default_factory=list)  # gold answers (generation)

    @property
    def target(self) -> str:
        """The continuation trained on: the gold candidate, or the first gold answer."""
        return self.candidates[self.label] if self.candidates else self.answers[0]


@dataclass
class TaskData:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)


def available_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_spec(name: str) -> dict:
    from omegaconf import OmegaConf

    path = tasks_dir() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


class Task:
    """A task spec with its compiled templates."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.name: str = spec["name"]
        self.version = spec.get("version", 0)
        self.type: str = spec.get("type", "classification")
        if self.type not in ("classification", "generation"):
            raise DataError(f"task {self.name}: type must be classification or generation, not {self.type!r}")
        self.metric: str = spec.get("metric", "accuracy" if self.type == "classification" else "f1")
        self._prompt = _ENV.from_string(spec["prompt"])
        cands = spec.get("candidates")
        if isinstance(cands, str):
            self._cands_expr = _ENV.compile_expression(cands)
            self._cands = None
        else:
            self._cands_expr = None
            self._cands = [_ENV.from_string(c) for c in (cands or [])]
        self._label = _ENV.compile_expression(str(spec["label"])) if spec.get("label") is not None else None
        self._answers = _ENV.compile_expression(spec["answers"]) if spec.get("answers") else None
        if self.type == "classification" and (self._label is None or not (self._cands or self._cands_expr)):
            raise DataError(f"task {self.name}: a classification task needs `candidates` and `label`")
        if self.type == "generation" and self._answers is None:
            raise DataError(f"task {self.name}: a generation task needs `answers`")

    @classmethod
    def from_config(cls, cfg: Any) -> Task:
        from omegaconf import DictConfig, OmegaConf

        spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        return cls(spec)

    def render(self, row: dict, idx: Any = None) -> Example:
        prompt = self._prompt.render(**row)
        ex_id = row.get("idx", idx)
        if self.type == "generation":
            answers = self._answers(**row)
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            return Example(id=ex_id, prompt=prompt, answers=answers)
        if self._cands_expr is not None:
            candidates = [str(c) for c in self._cands_expr(**row)]
        else:
            candidates = [t.render(**row) for t in self._cands]
        label = int(self._label(**row))
        if not 0 <= label < len(candidates):
            raise DataError(f"task {self.name}: label {label} out of range for {len(candidates)} candidates")
        return Example(id=ex_id, prompt=prompt, candidates=candidates, label=label)

    # ------------------------------------------------------------------ data

    def load_split(self, split: str, data_dir: str | os.PathLike | None) -> list[dict]:
        source = self.spec.get("source", {})
        if data_dir:
            folder = Path(data_dir) / source.get("local", self.name)
            for ext in _EXTENSIONS:
                path = folder / f"{split}{ext}"
                if path.is_file():
                    return read_rows(path)
            raise DataError(
                f"task {self.name}: no {split} file in {folder} (tried {', '.join(split + e for e in _EXTENSIONS)}). "
                "Point data_dir (or ZOEXP_DATA_DIR) at a folder with <task>/<split>.jsonl files, "
                "or set data_dir=null to download from the Hugging Face hub."
            )
        hub = source.get("hub")
        if not hub:
            raise DataError(f"task {self.name}: no data_dir given and the spec names no hub dataset; set data_dir")
        try:
            import datasets

            return list(datasets.load_dataset(*hub, split=split))
        except Exception as exc:  # network, missing dataset, ...
            raise DataError(
                f"task {self.name}: could not load {hub} split {split!r} from the Hugging Face hub ({exc}). "
                "Without internet, point data_dir (or ZOEXP_DATA_DIR) at local copies, e.g. ../shared/data."
            ) from exc

    def has_split(self, split: str, data_dir) -> bool:
        if not data_dir:
            return True
        folder = Path(data_dir) / self.spec.get("source", {}).get("local", self.name)
        return any((folder / f"{split}{ext}").is_file() for ext in _EXTENSIONS)

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
        splits = spec.get("splits", {"train": "train", "test": "validation"})
        train_split, test_split = splits.get("train"), splits["test"]
        notes: list[str] = []
        if train_split and self.has_split(train_split, data_dir):
            train_rows = self.load_split(train_split, data_dir)
            test_rows = self.load_split(test_split, data_dir)
            order = np.random.RandomState(seed).permutation(len(train_rows)).tolist()
            if num_train + num_dev > len(train_rows):
                notes.append(f"{train_split} has {len(train_rows)} rows < num_train+num_dev={num_train + num_dev}")
            train_idx, dev_idx = order[:num_train], order[num_train:num_train + num_dev]
            test_idx = np.random.RandomState(seed).permutation(len(test_rows)).tolist()[:num_test]
            train = [train_rows[i] for i in train_idx]
            dev = [train_rows[i] for i in dev_idx]
            test = [test_rows[i] for i in test_idx]
        else:
            # One split only: disjoint slices of one permutation; test first so it stays comparable
            # across different num_train choices.
            rows = self.load_split(test_split, data_dir)
            order = np.random.RandomState(seed).permutation(len(rows)).tolist()
            n_test = min(num_test, max(len(rows) - num_train - num_dev, len(rows) // 2))
            test_idx = order[:n_test]
            rest = order[n_test:]
            train_idx, dev_idx = rest[:num_train], rest[num_train:num_train + num_dev]
            train = [rows[i] for i in train_idx]
            dev = [rows[i] for i in dev_idx]
            test = [rows[i] for i in test_idx]
            notes.append(
                f"no {train_split or 'train'} split: train/dev/test sampled disjointly from {test_split} "
                f"({len(train)}/{len(dev)}/{len(test)} of {len(rows)})"
            )
        for note in notes:
            log.warning("task %s: %s", self.name, note)
        return TaskData(
            train=[self.render(r, i) for r, i in zip(train, train_idx)],
            dev=[self.render(r, i) for r, i in zip(dev, dev_idx)],
            test=[self.render(r, i) for r, i in zip(test, test_idx)],
            notes=notes,
        )


def read_rows(path: Path) -> list[dict]:
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data["data"] if isinstance(data, dict) and "data" in data else list(data)
    import pandas as pd

    if name.endswith(".parquet"):
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", quoting=3 if name.endswith(".tsv") else 0)
    return frame.to_dict(orient="records")
