"""Exact resume: a run killed by SIGTERM and continued reproduces the uninterrupted run (tiny-opt)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoexp.checkpoint import load_tensors
from zoexp.paths import conf_dir
from zoexp.results import read_rows

TESTS = Path(__file__).resolve().parent
TINY = ["model=tiny-opt", "task.num_train=32", "task.num_dev=16", "task.num_test=24",
        "run.batch_size=4", "run.eval_batch_size=16", "run.progress=false", "run.log_every=1"]
# every trajectory-relevant number of a row (wall-clock, memory, paths and dates differ)
SAME = ["status", "steps", "test/acc", "test/n", "dev/acc", "best_step", "forward_passes", "tokens",
        "train/final_loss", "optimizer_state_bytes", "optimizer_state_bytes_max", "trainable_params"]


def method_args(name: str, tmp_path: Path) -> list[str]:
    """Overrides selecting a method; ``toy-adam`` is a test-only first-order method with tensor state."""
    if name != "toy-adam":
        if not (conf_dir() / "method" / f"{name}.yaml").is_file():
            pytest.skip(f"conf/method/{name}.yaml is not on this branch yet")
        return [f"method={name}", "method.lr=1e-3"]
    extra = tmp_path / "extra-conf"
    (extra / "method").mkdir(parents=True, exist_ok=True)
    (extra / "method" / "toy-adam.yaml").write_text(
        "_target_: stateful_toys.ToyAdam\nname: toy-adam\nlr: 1e-3\n")
    return [f"hydra.searchpath=[file://{extra}]", "method=toy-adam"]


def env(data_dir: Path) -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "ZOEXP_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def run_inprocess(overrides: list[str], run_dir: Path) -> dict:
    """The runner as the CLI calls it, in this process (faster than a subprocess)."""
    from conftest import compose

    from zoexp.runner import run

    return run(compose(overrides), run_dir=run_dir)


def curve_without_time(row: dict) -> list[dict]:
    return [{k: v for k, v in point.items() if k != "train_time_s"} for point in row["curve"]]


def assert_same_run(a: dict, b: dict) -> None:
    assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    assert curve_without_time(a) == curve_without_time(b)
    assert [{k: v for k, v in d.items() if k != "train_time_s"} for d in a["dev_curve"]] == \
           [{k: v for k, v in d.items() if k != "train_time_s"} for d in b["dev_curve"]]


def final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")[0]


def test_a_signal_during_the_test_evaluation_writes_the_row_then_stops(tmp_path, fixture_data_dir, monkeypatch):
    """The test evaluation finishes (its row is the result), the row says ok, and the run then stops with
    Preempted (exit code 143 in the CLI), so that a sweep does not start its next job."""
    import zoexp.runner
    from zoexp.resume import Preempted

    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    evaluate = zoexp.runner.Experiment.evaluate

    def signalled(self, examples, split):
        if split == "test":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the test evaluation is armed
        return evaluate(self, examples, split)

    monkeypatch.setattr(zoexp.runner.Experiment, "evaluate", signalled)
    results = tmp_path / "rows.jsonl"
    with pytest.raises(Preempted, match="SIGTERM during the test evaluation; the run finished first and its row "
                                        r"is written \(status ok\)"):
        run_inprocess([*TINY, "method=zero-shot", f"run.results_file={results}"], tmp_path / "run")
    [row] = read_rows(results)
    assert row["status"] == "ok" and row["test/n"] == 24 and row["test/acc"] is not None
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(tmp_path, fixture_data_dir, monkeypatch):
    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    method, steps = "mezo", 24
    args = [*TINY, *method_args(method, tmp_path), f"results_dir={tmp_path / 'results'}", f"run.steps={steps}",
            "run.eval_every=6", "run.checkpoint_every=4", "run.checkpoint_keep=10", "run.keep_checkpoints=true"]
    cut = tmp_path / "results" / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "zoexp", *args, "run.name=cut"], cwd=tmp_path,
                            env=env(fixture_data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (cut / "checkpoints" / "step-00000008").is_dir():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # what a cluster does to a preempted job
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    (row,) = read_rows(tmp_path / "results" / "runs.jsonl")
    assert row["status"] == "preempted" and 8 <= row["preempted_step"] < steps, row.get("message")
    newest = Path(row["checkpoint"])
    assert newest.name == f"step-{row['preempted_step']:08d}" and (newest / "manifest.json").is_file()

    # the checkpoint written at the signal gets damaged: the periodic one before it must be used
    blob = newest / "optimizer.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8])

    resumed = run_inprocess([*args, "run.name=cut"], cut)  # the re-launched job (run.resume=auto)
    assert resumed["status"] == "ok"
    assert resumed["resumed_from_step"] in (4, 8) and resumed["resumed_from_step"] < row["preempted_step"]

    reference = run_inprocess([*args, "run.name=ref"], tmp_path / "results" / "runs" / "ref")
    assert_same_run(reference, resumed)
    a, b = final_weights(tmp_path / "results" / "runs" / "ref", steps), final_weights(cut, steps)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # re-launching a finished run returns its row and runs nothing
    again = run_inprocess([*args, "run.name=cut"], cut)
    assert again["finished_at"] == resumed["finished_at"]
    assert [r["status"] for r in read_rows(tmp_path / "results" / "runs.jsonl")] == ["preempted", "ok", "ok"]


@pytest.mark.parametrize("method", ["mezo", "hizoo", "focus", "hzo", "toy-adam"])
def test_continuing_any_checkpoint_gives_the_same_run(tmp_path, fixture_data_dir, method, monkeypatch):
    """Every method's state (seeds, Hessians, bandit, U/V seeds, FO moments) round-trips: resuming from a
    checkpoint mid-run (after a dev evaluation and a best-weights save) ends exactly as the full run."""
    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    monkeypatch.syspath_prepend(str(TESTS))
    steps = 6
    ref_dir = tmp_path / "results" / "runs" / "ref"
    args = [*TINY, *method_args(method, tmp_path), f"results_dir={tmp_path / 'results'}", f"run.steps={steps}",
            "run.eval_every=2", "run.checkpoint_every=3", "run.keep_checkpoints=true", "run.name=ref"]
    reference = run_inprocess(args, ref_dir)
    expected = final_weights(ref_dir, steps)
    resumed = run_inprocess([*args, f"run.resume={ref_dir / 'checkpoints' / 'step-00000003'}"], ref_dir)
    assert resumed["resumed_from_step"] == 3 and reference["best_step"] is not None
    assert_same_run(reference, resumed)
    got = final_weights(ref_dir, steps)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_checkpoint_holds_only_the_trained_parameters(tmp_path, fixture_data_dir, monkeypatch):
    """A method that trains a subset saves only that subset (the rest reloads as at start)."""
    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    from zoexp.models import param_groups

    class HeadOnly:
        @classmethod
        def model_param_groups(cls, model, **kwargs):
            return [g for g in param_groups(model) if g["role"] == "block" and g["block"] == 3]

    import zoexp.methods

    monkeypatch.setattr(zoexp.methods.MeZO, "model_param_groups", HeadOnly.model_param_groups, raising=False)
    run_dir = tmp_path / "run"
    row = run_inprocess([*TINY, f"results_dir={tmp_path / 'results'}", "run.steps=2", "run.eval_every=0",
                         "run.checkpoint_every=2", "run.keep_checkpoints=true"], run_dir)
    saved = final_weights(run_dir, 2)
    assert row["trainable_params"] == sum(t.numel() for t in saved.values())
    assert all(".layers.3." in name for name in saved)
    shutil.rmtree(run_dir)
