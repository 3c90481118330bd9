"""Regenerable directions: chunking, threads and subsets never change z."""

from __future__ import annotations

import torch

from zoexp.methods.noise import NoiseSource, mix, reference_noise


def test_visit_sees_the_reference_noise_whatever_the_threads():
    params = [torch.zeros(2500), torch.zeros(30, 70), torch.zeros(5)]
    for threads in (1, 3):
        src = NoiseSource(chunk=1000, threads=threads)
        for p in params:
            p.zero_()
        src.add_(list(enumerate(params)), seed=11, alpha=1.0)
        for key, p in enumerate(params):
            assert torch.equal(p, reference_noise(p.shape, key, 11, chunk=1000))


def test_z_of_a_parameter_does_not_depend_on_the_others():
    a, b = torch.zeros(100), torch.zeros(100)
    NoiseSource(chunk=64).add_([(5, a)], seed=3, alpha=1.0)
    NoiseSource(chunk=64).add_([(4, torch.zeros(10)), (5, b)], seed=3, alpha=1.0)
    assert torch.equal(a, b)


def test_seeds_are_well_spread():
    seeds = {mix(s, k, c) for s in range(20) for k in range(20) for c in range(5)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)


def test_noise_is_standard_normal():
    z = reference_noise((200_000,), key=1, seed=2)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
