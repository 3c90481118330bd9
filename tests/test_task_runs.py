"""Whole runs on every task through ``runner.run`` (tiny model, fixture data): zero-shot, ICL, the
classification loss. ReCoRD and DROP only exist here as fixtures."""

from __future__ import annotations

import pytest
from conftest import compose
from task_fixtures import GOLDEN, variants, write_split

from zoexp.results import read_rows
from zoexp.runner import run

SMALL = ["model=tiny-llama", "task.num_train=6", "task.num_dev=4", "task.num_test=5", "run.progress=false",
         "run.eval_batch_size=8", "run.batch_size=2"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-data")
    for name in GOLDEN:
        write_split(root, name, "train", variants(name, 14))
        write_split(root, name, "validation", variants(name, 7))
        write_split(root, name, "test", variants(name, 7))
        if name == "mnli":
            write_split(root, name, "validation_matched", variants(name, 7))
    return root


def _run(tmp_path, root, overrides):
    cfg = compose([*SMALL, f"data_dir={root}", f"results_dir={tmp_path}", *overrides])
    return run(cfg, run_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_zero_shot_runs_on_every_task(tmp_path, fixture_root, name):
    row = _run(tmp_path, fixture_root, [f"task={name}", "method=zero-shot", "run.max_new_tokens=4"])
    metric = "acc" if name not in ("squad", "drop") else "f1"
    assert row["status"] == "ok" and row["task"] == name and row["task_version"] == 1
    assert 0 <= row[f"test/{metric}"] <= 1 and row["test/n"] == 5
    assert row["eval/test_examples_per_s"] > 0 and row["data/splits"]["test"] in ("validation", "test",
                                                                                   "validation_matched")
    if name in ("squad", "drop"):
        assert 0 <= row["test/em"] <= 1
    assert read_rows(tmp_path / "runs.jsonl")[-1]["task"] == name


def test_icl_prepends_demonstrations_and_records_k(tmp_path, fixture_root):
    row = _run(tmp_path, fixture_root, ["task=rte", "method=icl", "method.demonstrations=3"])
    assert row["status"] == "ok" and row["method"] == "icl" and row["steps"] == 0
    assert row["icl/demonstrations_requested"] == 3 and row["icl/demonstrations"] == 3
    assert row["icl/demonstrations_mean"] == 3 and row["icl/examples_with_fewer_demos"] == 0


def test_icl_on_generation_with_a_tight_context(tmp_path, fixture_root):
    row = _run(tmp_path, fixture_root, ["task=squad", "method=icl", "method.demonstrations=4",
                                        "run.max_length=120", "run.max_new_tokens=5"])
    assert row["status"] == "ok" and row["icl/demonstrations_mean"] < 4 and row["eval/max_length"] == 120


@pytest.mark.parametrize("loss,expected", [("classification", "classification"), ("auto", "classification"),
                                           ("lm", "lm")])
def test_training_loss_option(tmp_path, fixture_root, loss, expected):
    row = _run(tmp_path, fixture_root, ["task=cb", "method=mezo", "run.steps=2", "run.eval_every=0",
                                        f"run.loss={loss}"])
    assert row["status"] == "ok" and row["train/loss_kind"] == expected and row["forward_passes"] == 4


def test_auto_loss_follows_mezo_per_task(tmp_path, fixture_root):
    row = _run(tmp_path, fixture_root, ["task=copa", "method=mezo", "run.steps=1", "run.eval_every=0",
                                        "run.loss=auto"])
    assert row["train/loss_kind"] == "lm"  # MeZO trains COPA with the LM loss


def test_classification_loss_on_a_generation_task_fails_clearly(tmp_path, fixture_root):
    with pytest.raises(ValueError, match="needs a classification task"):
        _run(tmp_path, fixture_root, ["task=squad", "method=mezo", "run.steps=1", "run.loss=classification"])
