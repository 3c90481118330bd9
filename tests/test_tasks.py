"""Task specs: golden prompts and candidates for every task; the MeZO sampling protocol; missing splits."""

from __future__ import annotations

import numpy as np
import pytest
from task_fixtures import GOLDEN, variants, write_split

from zoexp.tasks import DataError, Example, Task, available_tasks, load_spec

ALL_TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record",
             "sst5", "snli", "mnli", "trec", "squad", "drop"]
MLM_TASKS = ["sst2-mlm", "sst5-mlm", "snli-mlm", "mnli-mlm", "rte-mlm", "trec-mlm"]  # masked-LM prompts (zoexp.mlm)


def test_all_fifteen_tasks_exist_at_version_1():
    assert sorted(available_tasks()) == sorted(ALL_TASKS + MLM_TASKS)
    for name in ALL_TASKS + MLM_TASKS:
        spec = load_spec(name)
        assert spec["name"] == name and spec["version"] == 1


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_prompt_and_candidates(name):
    row, prompt, cands, label, target = GOLDEN[name]
    task = Task(load_spec(name))
    ex = task.render(row)
    assert ex.prompt == prompt
    if task.type == "classification":
        assert ex.candidates == cands and ex.label == label
    else:
        assert ex.answers == cands and ex.candidates == []
    assert ex.target == target


def test_boolq_keeps_an_existing_question_mark_and_copa_keeps_capital_i():
    boolq = Task(load_spec("boolq"))
    ex = boolq.render({"question": "does it rain in june?", "passage": "June is dry.", "label": 0})
    assert ex.prompt == "June is dry. Does it rain in june?\n" and ex.label == 1  # false -> "No"
    copa = Task(load_spec("copa"))
    ex = copa.render({"premise": "I wanted to conserve energy.", "choice1": "I swept the floor.",
                      "choice2": "I shut off the lights.", "question": "effect", "label": 1})
    assert ex.prompt == "I wanted to conserve energy so"
    assert ex.candidates == [" I swept the floor.", " I shut off the lights."] and ex.target == " I shut off the lights."


def test_record_has_every_answer_as_gold_and_scores_duplicate_entities_once():
    task = Task(load_spec("record"))
    row = dict(GOLDEN["record"][0], answers=["Japan", "Tokyo"])
    ex = task.render(row)
    assert len(ex.candidates) == 2
    assert ex.label == 1 and ex.gold_labels == [1, 0]  # trained on the first answer, both count as correct
    with pytest.raises(DataError, match="no gold"):
        task.render(dict(row, answers=["Osaka"]))


@pytest.mark.parametrize("name", ["boolq", "multirc", "record", "squad", "drop"])
def test_long_passage_tasks_mark_the_passage(name):
    row = GOLDEN[name][0]
    ex = Task(load_spec(name)).render(row)
    start, end = ex.passage
    passage = ex.prompt[start:end]
    raw = row.get("passage", row.get("paragraph", row.get("context")))
    assert passage == raw.replace("@highlight\n", "- ")
    assert "\ue000" not in ex.prompt and "\ue001" not in ex.prompt


def test_short_tasks_mark_no_passage():
    for name in ("sst2", "rte", "cb", "copa", "wic", "wsc", "sst5", "snli", "mnli", "trec"):
        assert Task(load_spec(name)).render(GOLDEN[name][0]).passage is None


# --------------------------------------------------------------------------- protocol


def _task(name: str, **overrides) -> Task:
    return Task({**load_spec(name), **overrides})


def test_protocol_sizes_match_mezo_sample_subset(tmp_path):
    rows = variants("rte", 60)
    write_split(tmp_path, "rte", "train", rows)
    write_split(tmp_path, "rte", "validation", variants("rte", 30))
    data = _task("rte").sample(7, tmp_path, num_train=16, num_dev=8, num_test=20)
    assert (len(data.train), len(data.dev), len(data.test)) == (16, 8, 20)
    # MeZO: np.random.seed(s); np.random.permutation(len)[:num_train + num_dev]; dev = the last num_dev
    order = np.random.RandomState(7).permutation(60).tolist()
    assert [e.id for e in data.train] == order[:16]
    assert [e.id for e in data.dev] == order[16:24]
    assert [e.id for e in data.test] == np.random.RandomState(7).permutation(30).tolist()[:20]
    assert not data.notes and data.splits == {"train": "train", "dev": "train", "test": "validation",
                                              "disjoint_from_one_split": False}


def test_sampling_depends_only_on_the_seed(tmp_path):
    write_split(tmp_path, "rte", "train", variants("rte", 60))
    write_split(tmp_path, "rte", "validation", variants("rte", 30))
    task = _task("rte")
    a = task.sample(3, tmp_path, num_train=10, num_dev=5, num_test=10)
    b = _task("rte").sample(3, tmp_path, num_train=10, num_dev=5, num_test=10)
    c = task.sample(4, tmp_path, num_train=10, num_dev=5, num_test=10)
    ids = lambda d: ([e.id for e in d.train], [e.id for e in d.dev], [e.id for e in d.test])  # noqa: E731
    assert ids(a) == ids(b) and a.train[0].prompt == b.train[0].prompt
    assert ids(a) != ids(c)


def test_small_train_split_keeps_dev_and_trains_on_the_rest(tmp_path):
    """CB (250 train) with num_dev=100: MeZO trains on 150 and validates on 100."""
    write_split(tmp_path, "cb", "train", variants("cb", 25))
    write_split(tmp_path, "cb", "validation", variants("cb", 6))
    data = _task("cb").sample(0, tmp_path, num_train=1000, num_dev=10)
    assert (len(data.train), len(data.dev), len(data.test)) == (15, 10, 6)
    assert not {e.id for e in data.train} & {e.id for e in data.dev}
    assert "dev keeps 10" in data.notes[0]
    assert load_spec("cb")["num_dev"] == 100 and load_spec("copa")["num_dev"] == 100


@pytest.mark.parametrize("present", ["validation", "train"])
def test_one_split_only_gives_disjoint_sets_and_says_so(tmp_path, present):
    write_split(tmp_path, "boolq", present, variants("boolq", 40))
    data = _task("boolq").sample(0, tmp_path, num_train=10, num_dev=5, num_test=20)
    assert (len(data.train), len(data.dev), len(data.test)) == (10, 5, 20)
    ids = [e.id for e in data.train + data.dev + data.test]
    assert len(set(ids)) == len(ids)  # disjoint
    assert data.splits["disjoint_from_one_split"] and data.splits["test"] == present
    assert "sampled disjointly" in data.notes[0]
    # the test set does not depend on how many train examples are asked for
    other = _task("boolq").sample(0, tmp_path, num_train=3, num_dev=2, num_test=20)
    assert [e.id for e in other.test] == [e.id for e in data.test]


def test_one_tiny_split_still_keeps_half_for_test(tmp_path):
    write_split(tmp_path, "boolq", "validation", variants("boolq", 12))
    data = _task("boolq").sample(0, tmp_path, num_train=1000, num_dev=500, num_test=1000)
    assert len(data.test) == 6 and len(data.train) + len(data.dev) == 6


def test_split_preference_list_and_filter(tmp_path):
    rows = variants("snli", 30)
    rows[0]["label"] = -1  # HF snli: no gold label
    write_split(tmp_path, "snli", "validation", rows)
    data = _task("snli").sample(0, tmp_path, num_train=5, num_dev=5, num_test=10)
    assert data.splits["test"] == "validation"  # no `test` split here: the next one listed
    assert any("dropped 1 of 30" in n for n in data.notes)
    assert all(e.label in (0, 1, 2) for e in data.train + data.dev + data.test)


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "rte")):
        _task("rte").sample(0, tmp_path)


@pytest.mark.parametrize("name", ["record", "drop"])
def test_offline_only_tasks_load_from_fixtures(tmp_path, name):
    """ReCoRD and DROP are not available offline: their loaders read HF-format files (jsonl, parquet)."""
    write_split(tmp_path, name, "train", variants(name, 20), fmt="parquet")
    write_split(tmp_path, name, "validation", variants(name, 8))
    data = _task(name).sample(1, tmp_path, num_train=6, num_dev=4, num_test=8)
    assert (len(data.train), len(data.dev), len(data.test)) == (6, 4, 8)
    ex = data.train[0]
    if name == "record":  # parquet gives numpy arrays for list fields: still plain candidates
        assert ex.candidates[ex.label] == " Japan celebrated the win."
        assert all(isinstance(c, str) for c in ex.candidates)
    else:
        assert ex.answers == ["4"] and ex.target == " 4\n" and ex.prompt.startswith("Passage: The Bears")


def test_hub_rows_are_renamed_and_missing_hub_splits_fall_back(monkeypatch):
    import datasets

    rows = [{"text": f"fine film {i}", "label": i % 5, "label_text": "x"} for i in range(30)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: [dict(r) for r in rows])
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: ["test"])
    data = _task("sst5").sample(0, None, num_train=5, num_dev=5, num_test=10)
    assert data.train[0].prompt.startswith("fine film") and data.splits["disjoint_from_one_split"]


def test_example_target_and_gold_labels_defaults():
    ex = Example(id=0, prompt="p", candidates=["a", "b"], label=1)
    assert ex.target == "b" and ex.gold_labels == [1]
    gen = Example(id=0, prompt="p", answers=["x", "y"])
    assert gen.target == "x"
