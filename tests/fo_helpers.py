"""Helpers shared by the first-order tests: a fresh copy of a tiny model, a fixed batch, its closure."""

from __future__ import annotations

import copy

import torch
from conftest import compose

from zoexp.closure import Counters, make_closure
from zoexp.methods import build_method
from zoexp.scoring import Encoder
from zoexp.tasks import Task


def batch(data_dir, n: int = 8):
    task = Task.from_config(compose(["task=sst2"]).task)
    return task.sample(0, data_dir=data_dir, num_train=n, num_dev=0, num_test=0).train


def setup(tiny, data_dir, method: str, overrides=(), n: int = 8, seed: int = 0):
    """(model copy, optimizer, closure, counters) for ``method`` on a fresh copy of a session tiny model."""
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose([f"method={method}", *overrides])
    opt = build_method(cfg.method, model, seed=seed)
    counters = Counters()
    closure = make_closure(model, Encoder(tok, 512), batch(data_dir, n), tok.pad_token_id, counters)
    model.train(opt.train_mode)
    return model, opt, closure, counters


@torch.no_grad()
def eval_loss(model, closure) -> float:
    was = model.training
    model.eval()
    value = float(closure())
    model.train(was)
    return value


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
