"""run.loss=auto (MeZO's per-task choice) is the default of a bare run and of every reproduction profile;
lm stays an option. Tables whose HZO cells offload (HZO Tables 4, 7) pin lm for every method: the
offloaded dual forward computes the LM loss only, and memory must compare like with like."""

from __future__ import annotations

import pytest
from conftest import compose

from zoexp.sweep import PROFILES, expand, experiment_names, load_sweep

OFFLOADED_TABLES = {"hzo_table4", "hzo_table7"}


def test_bare_run_trains_with_mezos_choice():
    assert compose([]).run.loss == "auto"
    assert compose(["run.loss=lm"]).run.loss == "lm"


@pytest.mark.parametrize("name", experiment_names())
def test_every_profile_defaults_to_auto(name):
    base = compose([]).run.loss
    for profile in PROFILES:
        plan = expand(load_sweep(name), profile, check_available=False)
        losses = {job.settings.get("run.loss", base) for job in plan.jobs}
        assert losses <= ({"lm"} if name in OFFLOADED_TABLES else {"auto"}), (name, profile, losses)
        if name not in OFFLOADED_TABLES:
            assert not any(job.settings.get("run.offload") for job in plan.jobs), (name, profile)
