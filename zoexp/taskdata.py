"""What sampling a task produces: rendered examples and the train/dev/test sets.

Kept apart from ``zoexp.tasks`` so that the sampling protocols (``zoexp.tasks``' MeZO protocol,
``zoexp.kshot``'s k examples per class) and the scorers can share these types without importing each
other. ``zoexp.tasks`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(RuntimeError):
    pass


@dataclass
class Example:
    """One rendered example: the prompt, its candidates (classification) or gold answers (generation)."""

    id: Any
    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: int | None = None  # index of the gold candidate (the one trained on)
    answers: list[str] = field(default_factory=list)  # gold answers (generation)
    golds: list[int] | None = None  # every correct candidate, when there are several (ReCoRD)
    passage: tuple[int, int] | None = None  # [start, end) of the prompt that may be cut from the left
    gold_target: str | None = None  # trained continuation of a generation example (spec `target`)

    @property
    def target(self) -> str:
        """The continuation trained on: the gold candidate, or the generation target / first answer."""
        if self.candidates:
            return self.candidates[self.label]
        return self.gold_target if self.gold_target is not None else self.answers[0]

    @property
    def gold_labels(self) -> list[int]:
        return list(self.golds) if self.golds else [self.label]


@dataclass
class TaskData:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)
    splits: dict = field(default_factory=dict)  # which source split each set came from
