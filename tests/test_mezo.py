"""MeZO against known answers: restore after ±ε, unbiasedness, descent on a quadratic, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import Quadratic, flat

from zoexp.methods import MeZO
from zoexp.methods.noise import reference_noise


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place (same sign assumed for nonzero differences)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def test_restore_after_one_step_is_within_rounding_fp32():
    # lr = 0: a step is +εz, −2εz, +εz. In-place floating-point arithmetic is not exactly reversible
    # (rounding θ+εz drops low bits of θ that no later operation can recover), so the weights come back
    # to within the three roundings -- at most 2 ulp, typically 0 or 1 -- and never drift systematically.
    q = Quadratic(shape=(64, 32), n_vec=32)
    before = [p.detach().clone() for p in q.parameters()]
    opt = MeZO(q.groups(), lr=0.0, eps=1e-3)
    opt.step(q)
    for p, p0 in zip(q.parameters(), before):
        ulps = _ulps(p.detach(), p0)
        assert ulps.max() <= 2
        assert (p.detach() - p0).mean().abs() < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_restore_is_bit_exact_when_the_arithmetic_is_exact(dtype):
    # θ = 0 and ε a power of two: θ + εz, then − 2εz, then + εz are all exact in any dtype, so the
    # weights must come back bit for bit -- which holds only if exactly the same z is regenerated,
    # with the right signs and scales, in every pass and every worker thread.
    q = Quadratic(shape=(300, 70), n_vec=50, dtype=dtype)
    with torch.no_grad():
        for p in q.parameters():
            p.zero_()
    opt = MeZO(q.groups(), lr=0.0, eps=1.0, noise_threads=2, chunk=1000)  # εz exact, no subnormals
    for _ in range(3):
        opt.step(q)
    for p in q.parameters():
        assert torch.equal(p.detach(), torch.zeros_like(p))


def test_step_moves_along_minus_g_z():
    q = Quadratic()
    q0 = copy.deepcopy(q)
    opt = MeZO(q.groups(), lr=1e-2, eps=1e-3)
    seed = opt.step_seed()
    opt.step(q)
    g = opt.metrics()["proj_grad"]
    for (key, p), p0 in zip(opt.keyed_params(), q0.parameters()):
        z = reference_noise(p.shape, key, seed)
        assert torch.allclose(p.detach(), p0.detach() - 1e-2 * g * z, atol=1e-5)


def test_projected_gradient_matches_directional_derivative():
    q = Quadratic()
    opt = MeZO(q.groups(), lr=0.0, eps=1e-4)
    seed = opt.step_seed()
    opt.step(q)
    z = flat(*(reference_noise(p.shape, k, seed) for k, p in opt.keyed_params()))
    true = torch.dot(flat(*q.grad()), z).item()
    assert opt.metrics()["proj_grad"] == pytest.approx(true, rel=1e-2, abs=1e-2)


def test_estimate_is_unbiased_on_a_quadratic():
    q = Quadratic(shape=(5, 4), n_vec=4)
    opt = MeZO(q.groups(), lr=0.0, eps=1e-3)
    total = torch.zeros(24)
    n = 3000
    for _ in range(n):
        seed = opt.step_seed()
        opt.step(q)
        z = flat(*(reference_noise(p.shape, k, seed) for k, p in opt.keyed_params()))
        total += opt.metrics()["proj_grad"] * z
    estimate, true = total / n, flat(*q.grad())
    cosine = torch.nn.functional.cosine_similarity(estimate, true, dim=0).item()
    assert cosine > 0.9


def test_loss_falls_on_a_quadratic():
    q = Quadratic()
    opt = MeZO(q.groups(), lr=2e-3, eps=1e-3)
    start = q().item()
    for _ in range(400):
        opt.step(q)
    assert q().item() < 0.5 * start


def test_weight_decay_only_on_matrices():
    q = Quadratic()
    q.a_w.zero_()
    q.a_b.zero_()  # flat loss: g = 0, only decay acts
    w0, b0 = q.w.detach().clone(), q.b.detach().clone()
    opt = MeZO(q.groups(), lr=0.1, eps=1e-3, weight_decay=0.5)
    opt.step(q)
    assert torch.allclose(q.w, w0 * (1 - 0.05), atol=1e-6)
    assert torch.allclose(q.b, b0, atol=1e-6)


def test_same_seed_same_trajectory_different_seed_different():
    def trajectory(seed, threads):
        q = Quadratic()
        opt = MeZO(q.groups(), lr=1e-3, eps=1e-3, seed=seed, noise_threads=threads)
        return [opt.step(q).item() for _ in range(20)], flat(*q.parameters())

    a_losses, a_w = trajectory(7, 1)
    b_losses, b_w = trajectory(7, 2)  # worker threads must not change the numbers
    c_losses, _ = trajectory(8, 1)
    assert a_losses == b_losses and torch.equal(a_w, b_w)
    assert a_losses != c_losses


def test_non_finite_loss_restores_and_reports():
    q = Quadratic()
    before = flat(*q.parameters())
    opt = MeZO(q.groups(), lr=1e-3, eps=1e-3)
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert not torch.isfinite(loss)
    assert torch.allclose(flat(*q.parameters()), before, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps_run_and_descend(dtype):
    q = Quadratic(dtype=dtype)
    opt = MeZO(q.groups(), lr=2e-3, eps=1e-2)
    start = q().float().item()
    for _ in range(300):
        opt.step(q)
    assert q.w.dtype == dtype and q().float().item() < start


def test_state_dict_round_trip_continues_identically():
    q1 = Quadratic()
    opt1 = MeZO(q1.groups(), lr=1e-3, seed=3)
    for _ in range(5):
        opt1.step(q1)
    q2 = copy.deepcopy(q1)
    opt2 = MeZO(q2.groups(), lr=1e-3, seed=99)
    opt2.load_state_dict(opt1.state_dict())
    for _ in range(5):
        assert opt1.step(q1).item() == opt2.step(q2).item()
    assert torch.equal(flat(*q1.parameters()), flat(*q2.parameters()))
