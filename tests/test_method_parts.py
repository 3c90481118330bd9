"""The parts the ZO methods share (zoexp.methods.base, zoexp.methods.hizoo.HessianZO): one ε per step,
hyperparameters in the param groups, the weight-decay factor, old checkpoints, and FOCUS's scores
independent of the noise workers' order."""

from __future__ import annotations

import pytest
import torch
from toys import Quadratic

from zoexp.methods import HZO, HiZOO, MeZO
from zoexp.methods.base import decay_factor


def test_decay_factor_is_one_minus_lr_lambda_on_matrices_only():
    w, b = torch.zeros(3, 2), torch.zeros(3)
    assert decay_factor(0.1, 0.5, w) == pytest.approx(0.95)
    assert decay_factor(0.1, 0.5, b) == 1.0  # biases and norm scales never decay (as in MeZO)
    assert decay_factor(0.1, 0.0, w) == 1.0


@pytest.mark.parametrize("cls", [MeZO, HiZOO, HZO])
def test_one_eps_per_zo_step(cls):
    q = Quadratic()
    groups = q.groups()
    groups[1]["eps"] = 1e-2  # the two-point estimate divides by one 2ε
    with pytest.raises(ValueError, match="same eps"):
        cls(groups, lr=1e-3, eps=1e-3, **({"fo_layers": 0} if cls is HZO else {}))
    assert cls(q.groups(), lr=1e-3, eps=1e-3, **({"fo_layers": 0} if cls is HZO else {})).eps == 1e-3


def test_hessian_hyperparameters_are_read_from_each_group():
    """As torch.optim reads lr: a group with α = 0 keeps D = 1, the other's D moves."""
    q = Quadratic()
    groups = q.groups()
    groups[1]["hessian_smooth"] = 0.0
    opt = HiZOO(groups, lr=1e-3, eps=1e-2, hessian_smooth=0.5, seed=1)
    for _ in range(3):
        opt.step(q)
    assert not torch.equal(opt.hessian(q.w), torch.ones_like(q.w))
    assert torch.equal(opt.hessian(q.b), torch.ones_like(q.b))
    assert opt.param_groups[0]["hessian_smooth"] == 0.5 and opt.param_groups[1]["hessian_smooth"] == 0.0


def test_checkpoint_without_group_hyperparameters_still_loads():
    """A checkpoint written before the Hessian hyperparameters moved into the param groups resumes with
    the constructor's values (``ZOMethod.load_state_dict`` fills missing group keys from the defaults)."""
    q = Quadratic()
    opt = HiZOO(q.groups(), lr=1e-3, eps=1e-2, hessian_smooth=0.5, seed=1)
    opt.step(q)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for k in ("hessian_smooth", "hessian_min", "hessian_max", "hessian_update", "hessian_form", "state_dtype"):
            del g[k]
    fresh = HiZOO(Quadratic().groups(), lr=1e-3, eps=1e-2, hessian_smooth=0.5, seed=1)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["hessian_smooth"] == 0.5 and fresh.steps_done == 1
    fresh.step(q)


def test_focus_scores_do_not_depend_on_the_noise_workers_order():
    """Block scores sum the per-chunk Σ z² (filled by two noise workers in any order) in a fixed order,
    so a seeded FOCUS run gives the same bits every time. Before the fix, 4 runs of this fingerprint
    (tiny LLaMA, greedy GSD with the probe) gave 3 different results."""
    from fingerprints import fingerprint

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the noise workers follow torch's thread count
    try:
        first = fingerprint("tiny-llama", "focus-gsd-probe", offload=False)
        for _ in range(3):
            assert fingerprint("tiny-llama", "focus-gsd-probe", offload=False) == first
    finally:
        torch.set_num_threads(threads)


def test_tensor_bytes_counts_each_storage_once_for_real_and_fake_tensors():
    """Two tensors of one size are two storages, a view is none more; fake tensors (zoexp.memory's
    prediction) have no data pointer to tell them apart, so their storages are known otherwise."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoexp.methods.base import tensor_bytes

    def state():
        a = torch.zeros(4)
        return {"exp_avg": a, "exp_avg_sq": torch.zeros(4), "view": [a.view(2, 2)], "step": (torch.zeros(2),)}

    assert tensor_bytes(state()) == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch deprecates a fake tensor's data pointer
        with FakeTensorMode():
            assert tensor_bytes(state()) == 40
