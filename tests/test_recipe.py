"""The runner's recipe pieces: the loop state a checkpoint saves, and the settings read once."""

from __future__ import annotations

import math

import pytest
from conftest import compose

from zoexp.closure import Counters
from zoexp.runner import Settings, TrainState


def test_train_state_round_trips_through_its_state_dict():
    counters = Counters(forward_passes=12, tokens=345, curve=[{"step": 5, "loss": 0.7}],
                        dev_curve=[{"step": 5, "acc": 0.6}])
    state = TrainState(step=5, t_train=1.5, window=[0.7, 0.6], max_state=1024, best_value=0.6, best_step=5,
                       best_metrics={"acc": 0.6}, last_dev_step=5, counters=counters)
    held = Counters()
    restored = TrainState(counters=held)
    restored.load_state_dict(state.state_dict())
    assert restored == state
    assert restored.counters is held  # the closure holds this object: it is filled in place, not replaced


def test_train_state_loads_a_checkpoint_written_before_last_dev_step():
    old = TrainState(step=3, last_dev_step=3).state_dict()
    old["evaluated_at"] = old.pop("last_dev_step")
    state = TrainState()
    state.load_state_dict(old)
    assert state.last_dev_step == 3 and state.step == 3


def test_a_fresh_train_state_has_no_best_yet():
    state = TrainState()
    assert state.best_value == -math.inf and state.best_step is None and state.step == 0


def test_settings_are_read_once_and_check_the_schedule():
    cfg = compose(["model=tiny-opt", "run.steps=7", "run.eval_every=0", "run.log_every=0"])
    s = Settings.from_config(cfg, trains=True)
    assert (s.steps, s.eval_every, s.log_every) == (7, 7, 1)  # eval_every 0: once, after the last step
    assert Settings.from_config(cfg, trains=False).steps == 0
    assert not Settings.from_config(cfg, trains=True, is_main=False).progress
    cfg.run.lr_schedule = "cosine"
    with pytest.raises(ValueError, match="run.lr_schedule must be constant or linear"):
        Settings.from_config(cfg, trains=True)



def test_test_final_tests_the_weights_after_the_last_step_beside_the_best_by_dev(tmp_path, fixture_data_dir,
                                                                                monkeypatch):
    """run.test_final=true: test/acc is the best-by-dev weights' (as always), test_final/acc the last step's.
    Evaluation is replaced by a fingerprint of the weights, minus their distance from the initial ones, so the
    dev metric is best at the first evaluation and every value names the weights it was computed on."""
    import copy

    import torch

    import zoexp.runner as runner

    start: dict = {}
    calls: list[str] = []

    def fingerprint(model, encoder, task, examples, **kwargs):
        params = dict(model.named_parameters())
        if not start:
            start.update({n: p.detach().clone() for n, p in params.items()})
        calls.append(len(examples))
        with torch.no_grad():
            distance = sum(float((p - start[n]).abs().sum()) for n, p in params.items())
        return {"acc": -distance, "n": len(examples)}

    monkeypatch.setattr(runner, "evaluate", fingerprint)
    base = ["model=tiny-opt", "method=sgd", "method.lr=0.05", f"data_dir={fixture_data_dir}", "task.num_train=16",
            "task.num_dev=8", "task.num_test=6", "run.batch_size=4", "run.steps=4", "run.eval_every=2",
            "run.eval_at_start=true", "run.progress=false", f"results_dir={tmp_path}"]

    def one(*overrides):
        start.clear()
        calls.clear()
        return runner.run(copy.deepcopy(compose([*base, *overrides])), run_dir=tmp_path / "-".join(overrides))

    row = one("run.test_final=true", "run.keep_best=memory")
    dev = {e["step"]: e["acc"] for e in row["dev_curve"]}
    assert row["best_step"] == 0 and row["test/acc"] == dev[0] == 0.0  # the untrained weights are the best on dev
    assert row["test_final/acc"] == dev[4] < dev[2] < 0 and row["test_final/step"] == 4
    assert calls.count(6) == 2  # two test evaluations: the final weights, then the best ones
    final = one("run.keep_best=none")  # the same run testing its final weights: the same number
    assert final["test/acc"] == row["test_final/acc"] and "test_final/acc" not in final
    # the tested weights are the final ones (no best kept): test_final is test, and no second evaluation
    same = one("run.test_final=true", "run.keep_best=none")
    assert same["test_final/acc"] == same["test/acc"] == final["test/acc"] and calls.count(6) == 1
