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

