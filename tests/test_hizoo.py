"""HiZOO against known answers: Hessian estimate on a separable quadratic, preconditioned direction,
restore after the three perturbations, clamping, state size, MeZO as the α = 0, D = 1 special case."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import Quadratic, flat

from zoexp.methods import HiZOO, MeZO
from zoexp.methods.noise import reference_noise


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _hessian(opt, q) -> torch.Tensor:
    return flat(*(opt.hessian(p) for p in q.parameters()))


def _rel_err(opt, q) -> float:
    true = flat(q.a_w, q.a_b)
    return ((_hessian(opt, q) - true).abs() / true).mean().item()


def test_hessian_estimate_moves_to_the_true_diagonal_and_loss_falls():
    # separable quadratic: ∇²L = diag(a) exactly; D starts at 1, a is in [0.5, 4.5]
    # (the signed EMA: Eq. 3's |Σ̂| is biased upward, see test_printed_eq3_estimate_is_biased_upward...)
    q = Quadratic(shape=(2, 2), n_vec=2)
    opt = HiZOO(q.groups(), lr=1e-2, eps=1e-3, hessian_smooth=2e-3, hessian_update="signed", noise_threads=1)
    start_err, start_loss = _rel_err(opt, q), q().item()
    errors = []
    for i in range(3000):
        opt.step(q)
        if i % 1000 == 999:
            errors.append(_rel_err(opt, q))
    assert start_err > 0.4
    assert max(errors) < 0.5 * start_err, (start_err, errors)
    assert q().item() < 1e-3 * start_loss


@pytest.mark.parametrize("update", ["printed", "signed", "legacy"])
def test_one_step_hessian_update_matches_the_formula(update):
    # Σ̂ = ΔL/(2ε²) · D (z² − 1) with the signed ΔL, the z of this step and the old D; then
    # printed (Eq. 3): (1 − α) D + α |Σ̂|; signed: |(1 − α) D + α Σ̂|; legacy: |(1 − α) D + α |ΔL|/(2ε²) D (z² − 1)|
    q = Quadratic(shape=(5, 4), n_vec=3)
    with torch.no_grad():
        q.a_w[:2].mul_(-1.0)  # indefinite, so ΔL takes both signs
    opt = HiZOO(q.groups(), lr=1e-2, eps=1e-2, hessian_smooth=0.05, hessian_min=0.5, hessian_max=2.0,
                hessian_update=update)
    for p in q.parameters():
        opt.hessian(p).uniform_(0.6, 1.5)
    for _ in range(3):
        d0 = [opt.hessian(p).clone() for p in q.parameters()]
        seed = opt.step_seed()
        opt.step(q)
        m = opt.metrics()
        c = (m["loss_plus"] + m["loss_minus"] - 2 * m["loss_0"]) / (2 * 1e-2**2)
        for (key, p), d in zip(opt.keyed_params(), d0):
            z = reference_noise(p.shape, key, seed)
            est = c * d * (z * z - 1)
            expected = {"printed": (1 - 0.05) * d + 0.05 * est.abs(), "signed": ((1 - 0.05) * d + 0.05 * est).abs(),
                        "legacy": ((1 - 0.05) * d + 0.05 * abs(c) * d * (z * z - 1)).abs()}[update].clamp(0.5, 2.0)
            assert torch.allclose(opt.hessian(p), expected, rtol=1e-5)


def test_one_step_hessian_estimate_is_unbiased():
    # The signed variant on an INDEFINITE quadratic (a convex one has ΔL > 0 always, so |ΔL| = ΔL and the
    # test could not tell the signed estimate from |ΔL|'s): from D = 1 with α = 1e-3, one step gives
    # D' = (1 − α) + α Ĥ: recover Ĥ; its mean over seeds is diag(a), negative entries included
    # (Ĥ is heavy-tailed: the tolerance is 4 standard errors)
    q = Quadratic(shape=(3, 1), n_vec=1)
    with torch.no_grad():
        q.a_w[0].mul_(-1.0)
    opt = HiZOO(q.groups(), lr=0.0, eps=1e-2, hessian_smooth=1e-3, hessian_update="signed", state_dtype="float64",
                hessian_min=None, hessian_max=None, noise_threads=1)
    samples = []
    for _ in range(2000):
        for p in q.parameters():
            opt.hessian(p).fill_(1.0)
        opt.step(q)
        samples.append((_hessian(opt, q) - 0.999) / 1e-3)
    s = torch.stack(samples)
    true = flat(q.a_w, q.a_b).double()
    assert true.min() < 0
    err = (s.mean(0) - true).abs()
    assert torch.all(err < 4 * s.std(0) / len(s) ** 0.5), (s.mean(0), true)


def test_printed_eq3_estimate_is_biased_upward_but_positive_and_bounded():
    # Eq. 3 as printed (the default) averages |Σ̂|: E|Σ̂| > E[Σ̂] = a, so D overshoots the true diagonal
    q = Quadratic(shape=(3, 1), n_vec=1)
    opt = HiZOO(q.groups(), lr=0.0, eps=1e-2, hessian_smooth=2e-3, hessian_max=50.0,
                noise_threads=1)
    for _ in range(2500):
        opt.step(q)
    d, true = _hessian(opt, q), flat(q.a_w, q.a_b)
    assert torch.all(d > 0) and torch.all(d <= 50.0)
    assert d.mean() > 1.3 * true.mean()


def test_preconditioned_direction_is_sigma_times_gradient():
    # D fixed at the true diagonal (α = 0): E[g u] = Σ ∇L = D⁻¹ ∇L, here θ − c (a Newton step)
    q = Quadratic(shape=(3, 2), n_vec=2)
    opt = HiZOO(q.groups(), lr=0.0, eps=1e-4, hessian_smooth=0.0, noise_threads=1)
    for p, a in zip(q.parameters(), (q.a_w, q.a_b)):
        opt.hessian(p).copy_(a)
    total, n = torch.zeros(8), 3000
    for _ in range(n):
        seed = opt.step_seed()
        opt.step(q)
        u = flat(*(reference_noise(p.shape, k, seed) / opt.hessian(p).sqrt() for k, p in opt.keyed_params()))
        total += opt.metrics()["proj_grad"] * u
    newton = flat(q.w - q.c_w, q.b - q.c_b)
    cosine = torch.nn.functional.cosine_similarity(total / n, newton, dim=0).item()
    assert cosine > 0.9


def test_step_moves_along_minus_g_u_with_the_old_hessian():
    q = Quadratic()
    q0 = copy.deepcopy(q)
    opt = HiZOO(q.groups(), lr=1e-2, eps=1e-3, hessian_smooth=0.5)
    for p in q.parameters():
        opt.hessian(p).fill_(4.0)
    seed = opt.step_seed()
    opt.step(q)
    g = opt.metrics()["proj_grad"]
    for (key, p), p0 in zip(opt.keyed_params(), q0.parameters()):
        u = reference_noise(p.shape, key, seed) / 2.0  # D^{-1/2} z with the D used for the perturbation
        assert torch.allclose(p.detach(), p0.detach() - 1e-2 * g * u, atol=1e-5)
        assert not torch.equal(opt.hessian(p), torch.full_like(p, 4.0))  # and D moved afterwards


def test_restore_after_three_perturbations_within_rounding():
    q = Quadratic(shape=(64, 32), n_vec=32)
    before = [p.detach().clone() for p in q.parameters()]
    opt = HiZOO(q.groups(), lr=0.0, eps=1e-3, hessian_smooth=0.1)
    for p in q.parameters():
        opt.hessian(p).uniform_(0.5, 2.0)
    opt.step(q)
    for p, p0 in zip(q.parameters(), before):
        assert _ulps(p.detach(), p0).max() <= 3
    assert (flat(*q.parameters()) - flat(*before)).mean().abs() < 1e-8  # no systematic drift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_exact_when_the_arithmetic_is_exact(dtype):
    # θ = 0, ε = 1, D = 4 (so D^{-1/2} = 0.5): every ±εD^{-1/2}z is exact; needs identical z each pass
    q = Quadratic(shape=(300, 70), n_vec=50, dtype=dtype)
    with torch.no_grad():
        for p in q.parameters():
            p.zero_()
    opt = HiZOO(q.groups(), lr=0.0, eps=1.0, hessian_smooth=0.0, noise_threads=2, chunk=1000)
    for p in q.parameters():
        opt.hessian(p).fill_(4.0)
    for _ in range(3):
        opt.step(q)
    for p in q.parameters():
        assert torch.equal(p.detach(), torch.zeros_like(p))


def test_hessian_is_clamped_even_for_huge_or_negative_curvature():
    q = Quadratic(shape=(4, 3), n_vec=3)
    q.a_w.mul_(1e3)
    for sign in (1.0, -1.0):  # convex, then concave (ΔL < 0): D stays positive and within the bounds
        opt = HiZOO(q.groups(), lr=0.0, eps=1e-2, hessian_smooth=0.5, hessian_min=0.1, hessian_max=10.0)
        hit_max = False
        for _ in range(10):
            opt.step(lambda sign=sign: sign * q())
            d = _hessian(opt, q)
            assert torch.all(torch.isfinite(d)) and d.min() >= 0.1 and d.max() <= 10.0
            hit_max |= bool(d.max() == 10.0)
        assert hit_max


def test_state_is_one_tensor_per_parameter_and_bytes_are_exact():
    q = Quadratic(shape=(8, 6), n_vec=6)
    opt = HiZOO(q.groups())
    assert opt.forward_passes_per_step == 3
    assert len(opt.state) == 2 and all(st["hessian"].shape == p.shape for p, st in opt.state.items())
    assert opt.state_bytes() == sum(p.numel() * p.element_size() for p in q.parameters())
    opt.step(q)
    m = opt.metrics()
    assert {"proj_grad", "loss_0", "loss_plus", "loss_minus", "hessian_mean", "state_bytes"} <= set(m)


def test_alpha_zero_unit_hessian_is_mezo():
    # D = 1 and α = 0: the perturbation and update are MeZO's (same keys, same step seeds)
    q1, q2 = Quadratic(), Quadratic()
    hi = HiZOO(q1.groups(), lr=1e-2, eps=1e-3, hessian_smooth=0.0, seed=5)
    me = MeZO(q2.groups(), lr=1e-2, eps=1e-3, seed=5)
    for _ in range(3):
        hi.step(q1)
        me.step(q2)
        assert hi.metrics()["proj_grad"] == me.metrics()["proj_grad"]
    # equal up to the rounding of a fused multiply-add (addcmul vs add)
    assert torch.allclose(flat(*q1.parameters()), flat(*q2.parameters()), atol=1e-6)


def test_weight_decay_only_on_matrices():
    q = Quadratic()
    q.a_w.zero_()
    q.a_b.zero_()  # flat loss: g = 0, only decay acts
    w0, b0 = q.w.detach().clone(), q.b.detach().clone()
    opt = HiZOO(q.groups(), lr=0.1, eps=1e-3, weight_decay=0.5)
    opt.step(q)
    assert torch.allclose(q.w, w0 * (1 - 0.05), atol=1e-6)
    assert torch.allclose(q.b, b0, atol=1e-6)


def test_non_finite_loss_restores_and_keeps_the_hessian():
    q = Quadratic()
    before = flat(*q.parameters())
    opt = HiZOO(q.groups(), lr=1e-3, eps=1e-3, hessian_smooth=0.5)
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert not torch.isfinite(loss)
    assert torch.allclose(flat(*q.parameters()), before, atol=1e-6)
    assert torch.equal(_hessian(opt, q), torch.ones(54))


def test_bad_hyperparameters_are_rejected():
    q = Quadratic()
    for kw in ({"hessian_smooth": 2.0}, {"hessian_min": 0.0}, {"hessian_max": 0.5}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            HiZOO(q.groups(), **kw)


def test_state_dict_round_trip_continues_identically():
    q1 = Quadratic()
    opt1 = HiZOO(q1.groups(), lr=1e-3, seed=3, hessian_smooth=0.1)
    for _ in range(5):
        opt1.step(q1)
    q2 = copy.deepcopy(q1)
    opt2 = HiZOO(q2.groups(), lr=1e-3, seed=99, hessian_smooth=0.1)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as a saved checkpoint would be
    assert torch.equal(_hessian(opt1, q1), _hessian(opt2, q2))
    for _ in range(5):
        assert opt1.step(q1).item() == opt2.step(q2).item()
    assert torch.equal(flat(*q1.parameters()), flat(*q2.parameters()))
