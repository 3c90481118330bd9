"""The researcher's daily loop: metrics.csv streamed during a run, the optional TensorBoard / W&B loggers,
console loss lines without the progress bar, predictions.jsonl, and the data files' sha256 in the row."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from conftest import compose

from zoexp.loggers import COLUMNS, LoggerError, MetricsLogger


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fixture_data_dir):
    """One short MeZO run on the tiny model with predictions, progress bar off: (row, run dir, log records)."""
    from zoexp.runner import run

    out = tmp_path_factory.mktemp("daily")
    cfg = compose(["model=tiny-opt", "method=mezo", f"data_dir={fixture_data_dir}", f"results_dir={out}",
                   "run.steps=4", "run.batch_size=4", "run.log_every=2", "run.eval_every=4", "run.progress=false",
                   "run.save_predictions=true", "task.num_train=8", "task.num_dev=4", "task.num_test=6"])
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("zoexp")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        row = run(cfg, run_dir=out / "run")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return row, out / "run", records


def test_metrics_csv_has_a_line_every_log_every_steps(finished):
    row, run_dir, _ = finished
    assert row["status"] == "ok"
    with open(run_dir / "metrics.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in lines] == [2, 4]
    assert tuple(lines[0]) == COLUMNS
    for r, point in zip(lines, row["curve"]):
        assert float(r["loss"]) == pytest.approx(point["loss"], rel=1e-5)
        assert float(r["proj_grad"]) == pytest.approx(point["proj_grad"], rel=1e-5)
        assert float(r["lr"]) == pytest.approx(float(row["hparams"]["lr"]))
        assert int(r["rss_peak_bytes"]) > 0 and r["gpu_allocated_peak_bytes"] == ""  # CPU run
    assert [int(r["forward_passes"]) for r in lines] == [4, 8]  # MeZO: 2 per step
    assert float(lines[1]["train_time_s"]) >= float(lines[0]["train_time_s"]) > 0


def test_progress_off_prints_the_loss_every_log_every_steps(finished):
    _, _, records = finished
    lines = [m for m in records if m.startswith("step ") and " loss " in m]
    assert len(lines) == 2 and lines[0].startswith("step 2/4  loss ") and "proj_grad" in lines[0]


def test_predictions_jsonl_lists_every_test_example(finished):
    row, run_dir, _ = finished
    path = run_dir / "predictions.jsonl"
    assert row["predictions_file"] == str(path)
    preds = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(preds) == row["test/n"] == 6
    for p in preds:
        assert set(p) >= {"id", "prompt", "gold", "candidates", "scores", "prediction", "correct"}
        assert p["prediction"] == max(range(len(p["scores"])), key=p["scores"].__getitem__)
        assert p["correct"] == (p["prediction"] == p["gold"])
    assert sum(p["correct"] for p in preds) / len(preds) == pytest.approx(row["test/acc"])


def test_generation_predictions_carry_text_f1_and_em():
    from zoexp.evaluation import prediction_records
    from zoexp.tasks import Example

    examples = [Example(id="q1", prompt="Q: capital of France? A:", answers=["Paris", "paris, france"]),
                Example(id="q2", prompt="Q: 2+2? A:", answers=["four"])]
    recs = prediction_records(examples, outputs=["Paris", "five"])
    assert recs[0] == {"id": "q1", "prompt": examples[0].prompt, "gold": ["Paris", "paris, france"],
                       "prediction": "Paris", "f1": 1.0, "em": 1.0}
    assert recs[1]["f1"] == 0.0 and recs[1]["em"] == 0.0


def test_a_resumed_run_keeps_the_lines_up_to_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path)
    for step in (2, 4, 6):
        first.log_train(step, {"loss": 1.0 / step})
    first.close()
    again = MetricsLogger(tmp_path)
    again.start(resume_step=4)
    again.log_train(6, {"loss": 0.5})
    again.close()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [(r["step"], r["loss"]) for r in lines] == [("2", "0.5"), ("4", "0.25"), ("6", "0.5")]


def test_rank_other_than_zero_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log_train(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.csv").exists()


def test_logger_group_composes():
    for name in ("csv", "tensorboard", "wandb"):
        cfg = compose([f"logger={name}"])
        assert cfg.logger.backend == name
    assert compose(["logger=wandb"]).logger.mode in ("offline", "online", "disabled")


def test_unknown_backend_is_one_line(tmp_path):
    with pytest.raises(LoggerError, match="csv, tensorboard, wandb"):
        MetricsLogger(tmp_path, {"backend": "mlflow"})


def test_tensorboard_events_hold_the_training_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, {"backend": "tensorboard", "subdir": "tb"})
    for step in (5, 10):
        logger.log_train(step, {"loss": 2.0 / step, "lr": 1e-6, "proj_grad": 0.5})
    logger.log_eval(10, "dev", {"acc": 0.75, "n": 4})
    logger.close({"test/acc": 0.8})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(5, 0.4), (10, 0.2)]
    assert events.Scalars("dev/acc")[0].value == pytest.approx(0.75)


def test_wandb_offline_run_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    logger = MetricsLogger(tmp_path, {"backend": "wandb", "mode": "offline", "project": "zoexp-test"},
                           {"method": {"name": "mezo"}})
    logger.log_train(5, {"loss": 0.4})
    logger.close({"test/acc": 0.8})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("5,0.4,")


def test_missing_logger_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(LoggerError, match=r"pip install 'zoexp\[logging\]'"):
        MetricsLogger(tmp_path, {"backend": "wandb"})


# --------------------------------------------------------------------------- data provenance


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rows_record_the_sha256_of_each_data_file_read(finished, fixture_data_dir):
    row, _, _ = finished
    assert row["data/sha256"] == {f"sst2/{s}.jsonl": _sha(fixture_data_dir / "sst2" / f"{s}.jsonl")
                                  for s in ("train", "validation")}
    assert row["data/manifest"] is None  # the fixture folder has no MANIFEST.md


def test_the_shared_data_matches_its_manifest():
    from conftest import shared_data_dir

    from zoexp.provenance import check_manifest, read_manifest
    from zoexp.tasks import Task

    root = shared_data_dir()
    if root is None or read_manifest(root) is None:
        pytest.skip("no shared data folder with a MANIFEST.md")
    task = Task.from_config(compose(["task=cb"]).task)
    task.sample(0, data_dir=root)
    assert set(task.files_read) == {"cb/train.jsonl", "cb/validation.jsonl"}
    assert check_manifest(task.files_read, root) == "ok"


def test_a_changed_file_is_a_manifest_mismatch(tmp_path, fixture_data_dir):
    import shutil

    from zoexp.provenance import check_manifest
    from zoexp.tasks import Task

    shutil.copytree(fixture_data_dir / "sst2", tmp_path / "sst2")
    good = _sha(tmp_path / "sst2" / "train.jsonl")
    (tmp_path / "MANIFEST.md").write_text("| file | rows | sha256 | source |\n|---|---|---|---|\n"
                                          f"| sst2/train.jsonl | 48 | {good} | fixture |\n"
                                          f"| sst2/validation.jsonl | 24 | {'0' * 64} | fixture |\n")
    task = Task.from_config(compose(["task=sst2"]).task)
    task.sample(0, data_dir=tmp_path, num_train=8, num_dev=4, num_test=4)
    assert check_manifest(task.files_read, tmp_path) == "mismatch: sst2/validation.jsonl"
    assert check_manifest({"sst2/train.jsonl": good, "sst2/extra.jsonl": good}, tmp_path) == \
        "not listed: sst2/extra.jsonl"


def test_hub_loads_pin_a_dataset_revision(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from zoexp.provenance import HUB_REVISIONS
    from zoexp.tasks import Task

    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"idx": i, "sentence": "fine ", "label": i % 2} for i in range(4)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = Task.from_config(compose(["task=sst2"]).task)
    task.load_split("train", None)
    assert calls[-1] == (("nyu-mll/glue", "sst2"), {"split": "train", "revision": HUB_REVISIONS["nyu-mll/glue"]})
    assert task.hub_loads == [{"dataset": ["nyu-mll/glue", "sst2"], "split": "train",
                               "revision": HUB_REVISIONS["nyu-mll/glue"]}]
    pinned = Task.from_config(compose(["task=sst2", "+task.source.revision=abc123"]).task)
    pinned.load_split("validation", None)
    assert calls[-1][1]["revision"] == "abc123"
