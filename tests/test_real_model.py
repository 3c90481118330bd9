"""Slow: the real SmolLM2-135M on real SST-2 data (`make test-slow`)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, shared_data_dir
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from zoexp.models import load_model

    cfg = OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")
    return load_model(cfg, "fp32", "cpu")


@pytest.fixture(scope="module")
def sst2():
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("real SST-2 data not found (set ZOEXP_DATA_DIR)")
    from zoexp.tasks import Task, load_spec

    return Task(load_spec("sst2")), data_dir


def test_zero_shot_on_200_validation_examples(smollm2, sst2):
    from zoexp.evaluation import evaluate
    from zoexp.scoring import Encoder

    model, tok = smollm2
    task, data_dir = sst2
    data = task.sample(0, data_dir=data_dir, num_train=0, num_dev=0, num_test=200)
    result = evaluate(model, Encoder(tok), task, data.test, batch_size=32)
    # MeZO's template puts this instruct model near chance (0.53 on 300 examples measured); the prompt
    # version is recorded in every row. The check is that real scoring runs end to end and is sane.
    assert result["n"] == 200 and 0.4 <= result["acc"] <= 0.9


def test_mezo_lowers_the_training_loss_in_100_steps(smollm2, sst2):
    from zoexp.methods import MeZO
    from zoexp.models import param_groups
    from zoexp.scoring import Encoder, lm_loss
    from zoexp.training import BatchSampler

    model, tok = smollm2
    task, data_dir = sst2
    data = task.sample(0, data_dir=data_dir, num_train=64, num_dev=0, num_test=0)
    enc = Encoder(tok)
    fixed = data.train  # the fixed train sample the loss is measured on

    def train_loss() -> float:
        with torch.no_grad():
            return sum(lm_loss(model, enc, fixed[i:i + 16], tok.pad_token_id).item() for i in range(0, 64, 16)) / 4

    before = train_loss()
    opt = MeZO(param_groups(model), lr=1e-5, eps=1e-3, seed=0)
    sampler = BatchSampler(len(fixed), 16, seed=0)
    for _ in range(100):
        batch = [fixed[i] for i in sampler.next()]
        opt.step(lambda batch=batch: lm_loss(model, enc, batch, tok.pad_token_id))
    after = train_loss()
    assert after < before - 0.05, (before, after)
