"""k-shot sampling (LM-BFF, MeZO's medium models): k examples per class for train and k for dev.

For seed s the train split is permuted with ``numpy.random.RandomState(s)``; walking that order, the
first k examples of each class form the training set and the next k of each class the dev set. The
test set is the first ``num_test`` rows of the same seed's permutation of the test split. Where only
one split exists, the test set comes first from its permutation (capped at half the split, so it does
not depend on k) and train/dev are drawn from the rest; the notes say so.
"""

from __future__ import annotations

import logging

import numpy as np

from zoexp.taskdata import DataError, TaskData

log = logging.getLogger(__name__)


def sample_k_shot(task, seed: int, data_dir, k: int, num_test: int):
    train_split = task.resolve_split("train", data_dir)
    test_split = task.resolve_split("test", data_dir)
    notes: list[str] = []
    if test_split is None:
        raise DataError(f"task {task.name}: no test split {task.split_names('test')} in "
                        f"{task.folder(data_dir) if data_dir else 'the hub'}")
    if train_split and train_split != test_split:
        pool_rows = task.rows(train_split, data_dir, notes)
        test_rows = task.rows(test_split, data_dir, notes)
        pool_order = np.random.RandomState(seed).permutation(len(pool_rows)).tolist()
        test_idx = np.random.RandomState(seed).permutation(len(test_rows)).tolist()[:num_test]
    else:
        pool_rows = test_rows = task.rows(test_split, data_dir, notes)
        order = np.random.RandomState(seed).permutation(len(pool_rows)).tolist()
        n_test = min(num_test, len(pool_rows) // 2)
        test_idx, pool_order = order[:n_test], order[n_test:]
        notes.append(f"no {train_split or 'train'} split: test = {n_test} rows of {test_split}, "
                     f"k-shot train/dev drawn from the other {len(pool_order)}")
    train, dev = [], []
    taken: dict[int, list[int]] = {}
    n_classes = None
    skipped = 0
    for i in pool_order:
        try:
            ex = task.render(pool_rows[i], i)
        except DataError:  # e.g. an unlabelled row (label -1 in HF SNLI)
            skipped += 1
            continue
        n_classes = n_classes or len(ex.candidates)
        counts = taken.setdefault(ex.label, [0, 0])
        if counts[0] < k:
            counts[0] += 1
            train.append(ex)
        elif counts[1] < k:
            counts[1] += 1
            dev.append(ex)
        if len(taken) == n_classes and all(c == [k, k] for c in taken.values()):
            break
    short = {c: n for c, n in taken.items() if n != [k, k]}
    if short or (n_classes and len(taken) < n_classes):
        notes.append(f"fewer than k={k} examples per class for some classes (train, dev): {short}")
    if skipped:
        notes.append(f"{skipped} rows without a valid label skipped")
    for note in notes:
        log.warning("task %s: %s", task.name, note)
    test = [task.render(test_rows[i], i) for i in test_idx]
    one = pool_rows is test_rows
    splits = {"train": test_split if one else train_split, "dev": test_split if one else train_split,
              "test": test_split, "disjoint_from_one_split": one, "k_shot": k}
    return TaskData(train=train, dev=dev, test=test, notes=notes, splits=splits)
