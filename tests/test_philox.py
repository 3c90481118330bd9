"""The philox noise backend: known answers, kernel == pure-torch definition bit for bit, and z is N(0, 1).

Statistical tests use fixed seeds, so they are deterministic; their thresholds are the usual
significance levels (a correct generator passes them with the stated probability for a random seed).
"""

from __future__ import annotations

import math

import pytest
import torch

from zoexp.methods import philox
from zoexp.methods.noise import NoiseSource, mix, reference_noise

KERNEL = philox.kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no C kernel here: {philox.failure()}")

# Random123 kat_vectors for Philox4x32-10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_torch(ctr, key, want):
    words = philox.philox4x32_10(tuple(torch.tensor([c]) for c in ctr), key)
    assert tuple(int(w) for w in words) == want


@needs_kernel
@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_kernel(ctr, key, want):
    assert KERNEL.block_words(ctr, key) == want


@needs_kernel
@pytest.mark.parametrize("s,start,n", [
    (0, 0, 0), (1, 0, 1), (2, 0, 63), (3, 1, 64), (4, 63, 65), (5, 100, 1000), (2**63 - 1, 12345, 70_001),
    (mix(7, 3, 1), 0, 300_000), (mix(1, 2, 3), 1 << 32, 129),  # counters beyond 2^32 / 64
])
def test_kernel_is_the_torch_definition_bit_for_bit(s, start, n):
    got = KERNEL.normal_(s, start, torch.empty(n))
    assert torch.equal(got, philox.normal(s, start, n))


def test_any_slice_is_the_same_slice_of_the_whole():
    whole = philox.normal(99, 0, 1000)
    for a, b in ((0, 1000), (1, 2), (63, 130), (500, 1000), (999, 1000)):
        assert torch.equal(philox.normal(99, a, b - a), whole[a:b])
        if KERNEL is not None:
            assert torch.equal(KERNEL.normal_(99, a, torch.empty(b - a)), whole[a:b])


@needs_kernel
def test_fused_axpy_rounds_like_torch_add():
    assert KERNEL.axpy_matches_torch  # checked on load; on a CPU where it is not, add_ is not fused
    p = torch.randn(100_003)
    ref = p.clone().add_(philox.normal(5, 17, p.numel()), alpha=3e-3)
    KERNEL.axpy_ptr(5, 17, p.numel(), 3e-3, p.data_ptr())
    assert torch.equal(p, ref)


def _sample(n: int = 1 << 22) -> torch.Tensor:
    if KERNEL is not None:
        return KERNEL.normal_(mix(2024, 1, 0), 0, torch.empty(n)).double()
    return philox.normal(mix(2024, 1, 0), 0, n).double()


def test_moments_are_standard_normal():
    z = _sample()
    n = z.numel()
    mean, var = z.mean().item(), z.var().item()
    skew = ((z - mean) ** 3).mean().item() / var**1.5
    kurt = ((z - mean) ** 4).mean().item() / var**2
    # 4-sigma bands of the sampling distributions of the moments of N(0, 1)
    assert abs(mean) < 4 / math.sqrt(n)
    assert abs(var - 1) < 4 * math.sqrt(2 / n)
    assert abs(skew) < 4 * math.sqrt(6 / n)
    assert abs(kurt - 3) < 4 * math.sqrt(24 / n)


def test_kolmogorov_smirnov_and_tails():
    z = _sample()
    n = z.numel()
    cdf = torch.special.ndtr(z.sort().values)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.63 / math.sqrt(n)  # KS critical value at the 1% level
    for k, p in ((1, 0.31731), (2, 0.04550), (3, 0.0026998), (4, 6.334e-5)):
        frac = (z.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert z.abs().max().item() < 5.8  # 23-bit uniforms: |z| <= sqrt(-2 ln 2^-24) ~ 5.77


def test_every_position_of_the_block_layout_is_standard_normal():
    z = _sample().view(-1, philox.BLOCK)  # column c = position c in every 64-float block
    m = z.shape[0]
    assert (z.mean(0).abs() < 4.5 / math.sqrt(m)).all()
    assert ((z.var(0) - 1).abs() < 4.5 * math.sqrt(2 / m)).all()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).mean().item() / (a.std().item() * b.std().item())


def test_no_correlation_within_a_chunk():
    z = _sample()
    n = z.numel()
    for lag in (1, 2, 15, 16, 17, 32, 48, 64, 1024):
        assert abs(_corr(z[:-lag], z[lag:])) < 4.5 / math.sqrt(n)
    # the two normals of one Box-Muller pair, and the two pairs of one Philox call
    blocks = z.view(-1, 4, philox.W)
    m = blocks.shape[0] * philox.W
    assert abs(_corr(blocks[:, 0], blocks[:, 1])) < 4.5 / math.sqrt(m)
    assert abs(_corr(blocks[:, 0], blocks[:, 2])) < 4.5 / math.sqrt(m)
    # ... and their squares (Box-Muller pairs share a radius: r^2 cos^2 and r^2 sin^2 are dependent
    # through r only with zero correlation for exact normals)
    assert abs(_corr(blocks[:, 0] ** 2, blocks[:, 1] ** 2)) < 4.5 / math.sqrt(m)


def test_no_correlation_across_chunks_keys_and_seeds():
    n = 1 << 18
    gen = (lambda s: KERNEL.normal_(s, 0, torch.empty(n)).double()) if KERNEL else (
        lambda s: philox.normal(s, 0, n).double())
    base = gen(mix(5, 0, 0))
    for other in (mix(5, 0, 1), mix(5, 1, 0), mix(6, 0, 0), mix(5, 0, 0) + 1, mix(5, 0, 0) ^ (1 << 40)):
        assert abs(_corr(base, gen(other))) < 4.5 / math.sqrt(n)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_visit_matches_the_definition_in_every_dtype(dtype, threads):
    params = [torch.zeros(2500, dtype=dtype), torch.zeros(30, 70, dtype=dtype), torch.zeros(5, dtype=dtype)]
    seen = {}
    NoiseSource(chunk=1000, threads=threads, backend="philox").visit(
        list(enumerate(params)), 11, lambda view, z, key, a, b: seen.__setitem__((key, a), z.clone()))
    for key, p in enumerate(params):
        for c, a in enumerate(range(0, p.numel(), 1000)):
            want = philox.normal(mix(11, key, c), 0, min(1000, p.numel() - a)).to(dtype)
            assert torch.equal(seen[(key, a)], want)


def test_without_kernel_philox_falls_back_to_the_same_numbers_and_auto_to_torch(monkeypatch):
    want = philox.normal(mix(3, 4, 0), 0, 500)
    monkeypatch.setattr(philox, "_kernel", None)
    monkeypatch.setattr(philox, "_failure", "simulated: no compiler")
    assert NoiseSource(backend="philox").implementation("cpu") == "philox-torch"
    assert NoiseSource(backend="auto").implementation("cpu") == "torch"
    p = torch.zeros(500)
    NoiseSource(backend="philox", threads=2, chunk=200).add_([(4, p)], 3, 1.0)
    assert torch.equal(p[:200], want[:200])
    assert torch.equal(p, reference_noise((500,), 4, 3, chunk=200, backend="philox"))
    q = torch.zeros(500)
    NoiseSource(backend="auto", chunk=200).add_([(4, q)], 3, 1.0)
    assert torch.equal(q, reference_noise((500,), 4, 3, chunk=200, backend="torch"))


def test_backend_from_environment_and_validation(monkeypatch):
    monkeypatch.setenv("ZOEXP_NOISE", "torch")
    assert NoiseSource().backend == "torch" and NoiseSource().implementation() == "torch"
    assert NoiseSource(backend="philox").backend == "philox"
    with pytest.raises(ValueError, match="noise backend"):
        NoiseSource(backend="fast")


@needs_kernel
def test_build_is_cached():
    assert philox.build() == KERNEL.path


@needs_kernel
@pytest.mark.parametrize("job", [128, 256, 1 << 18])
def test_fused_add_and_scale_add_equal_torch_ops_whatever_the_job_split(job):
    params = [torch.randn(2500), torch.randn(30, 70), torch.randn(5)]
    src = NoiseSource(chunk=1000, threads=3, backend="philox")
    src.FUSED_JOB = job  # several kernel jobs per seeded chunk
    added, scaled = [p.clone() for p in params], [p.clone() for p in params]
    src.add_(list(enumerate(added)), 9, -3e-3)
    src.scale_add_(list(enumerate(scaled)), 9, 0.999, 2e-3)
    for key, p in enumerate(params):
        z = reference_noise(p.shape, key, 9, chunk=1000, backend="philox")
        assert torch.equal(added[key], p.clone().add_(z, alpha=-3e-3))
        assert torch.equal(scaled[key], p.clone().mul_(0.999).add_(z, alpha=2e-3))


@pytest.mark.parametrize("backend", ["torch", "philox"])
def test_scale_add_on_the_visit_path(backend):
    p = torch.randn(40, 30, dtype=torch.bfloat16)  # not float32: never fused
    want = p.clone().mul_(0.5).add_(reference_noise(p.shape, 2, 4, dtype=torch.bfloat16, backend=backend), alpha=0.25)
    NoiseSource(backend=backend, threads=2).scale_add_([(2, p)], 4, 0.5, 0.25)
    assert torch.equal(p, want)
