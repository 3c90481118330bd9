"""The optimized hot path (C kernel, fused add_, worker threads) against the slow reference (tests/reference.py):
same seeds -> the same losses and the same weights, bit for bit, after several steps."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
from toys import Quadratic, flat

from zoexp.closure import Counters, make_closure
from zoexp.methods import MeZO, philox
from zoexp.models import param_groups
from zoexp.scoring import Encoder
from zoexp.tasks import Example


def _params(groups):
    seen, out = set(), []
    for g in groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _run_both(make, steps, backend, threads, chunk=None, **hp):
    """(losses, weights) of MeZO and of the reference on two identical copies of ``make()``."""
    model, closure_of = make()
    twin = copy.deepcopy(model)
    opt = MeZO(param_groups(model) if not isinstance(model, Quadratic) else model.groups(), seed=5,
               noise=backend, noise_threads=threads, chunk=chunk, **hp)
    got = []
    for _ in range(steps):
        opt.step(closure_of(model))
        got.append((opt.metrics()["loss_plus"], opt.metrics()["loss_minus"]))
    params = _params(param_groups(twin) if not isinstance(twin, Quadratic) else twin.groups())
    want = [reference.mezo_step(params, closure_of(twin), 5, t, backend=backend, chunk=chunk, **hp)
            for t in range(steps)]
    return got, want, flat(*_params(opt.param_groups)), flat(*params)


def _quadratic():
    return Quadratic(shape=(300, 70), n_vec=50), lambda m: m


@pytest.mark.parametrize("backend", ["philox", "torch"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_mezo_equals_reference_bit_for_bit_on_a_quadratic(backend, threads, wd):
    got, want, w_got, w_want = _run_both(_quadratic, 6, backend, threads, chunk=1000, lr=1e-3, eps=1e-3,
                                         weight_decay=wd)
    assert got == want
    assert torch.equal(w_got, w_want)


def _tiny_llama():
    from omegaconf import OmegaConf

    from zoexp.models import load_model
    from zoexp.paths import conf_dir

    torch.manual_seed(0)
    model, tok = load_model(OmegaConf.load(conf_dir() / "model" / "tiny-llama.yaml"), "fp32", "cpu")
    batch = [Example(id=str(i), prompt=f"review {i}: a {'fine' if i % 2 else 'dull'} film. It was",
                     candidates=[" terrible", " great"], label=i % 2) for i in range(4)]
    encoder = Encoder(tok)
    return model, lambda m: make_closure(m, encoder, batch, tok.pad_token_id, Counters())


@pytest.mark.parametrize("backend", ["philox", "torch"])
def test_mezo_equals_reference_bit_for_bit_on_a_transformer(backend):
    got, want, w_got, w_want = _run_both(_tiny_llama, 3, backend, 2, lr=1e-2, eps=1e-3, weight_decay=0.01)
    assert got == want
    assert torch.equal(w_got, w_want)


def test_fused_restore_update_is_algorithm_1_up_to_rounding():
    # one step from the same weights: the same losses (the perturbations are identical), and weights
    # that differ only by the rounding of the fused update (a few ulp of O(1) weights)
    q = Quadratic(shape=(300, 70), n_vec=50)
    r = copy.deepcopy(q)
    lq = reference.mezo_step(_params(q.groups()), q, 5, 0, lr=1e-3, eps=1e-3, weight_decay=0.1)
    lr_ = reference.mezo_step(_params(r.groups()), r, 5, 0, lr=1e-3, eps=1e-3, weight_decay=0.1, fused=False)
    assert lq == lr_
    diff = (flat(*q.parameters()) - flat(*r.parameters())).abs().max().item()
    moved = (flat(*q.parameters()) - flat(*Quadratic(shape=(300, 70), n_vec=50).parameters())).abs().max().item()
    assert diff < 1e-5 < moved


@pytest.mark.skipif(philox.kernel() is None, reason="no C kernel here")
def test_kernel_and_pure_torch_philox_give_the_same_trajectory(monkeypatch):
    def run():
        q = Quadratic(shape=(300, 70), n_vec=50)
        opt = MeZO(q.groups(), lr=1e-3, eps=1e-3, seed=3, noise="philox", noise_threads=2, chunk=5000)
        return [opt.step(q).item() for _ in range(4)], flat(*q.parameters())

    losses_kernel, w_kernel = run()
    monkeypatch.setattr(philox, "_kernel", None)
    monkeypatch.setattr(philox, "_failure", "simulated")
    losses_torch, w_torch = run()
    assert losses_kernel == losses_torch and torch.equal(w_kernel, w_torch)


@pytest.mark.parametrize("backend", ["philox", "torch"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("update,form", [("printed", "hizoo"), ("signed", "hizoo"), ("legacy", "hizoo"),
                                         ("printed", "focus")])
def test_hizoo_equals_reference_bit_for_bit_on_a_quadratic(backend, threads, update, form):
    # printed/hizoo is Eq. 3 as printed (the default); legacy is the earlier default (the old reference)
    from zoexp.methods import HiZOO

    hp = dict(lr=1e-3, eps=1e-3, weight_decay=0.1, hessian_smooth=0.3, hessian_min=0.05, hessian_max=20.0,
              hessian_update=update, hessian_form=form)
    q = Quadratic(shape=(300, 70), n_vec=50)
    twin = copy.deepcopy(q)
    opt = HiZOO(q.groups(), seed=5, noise=backend, noise_threads=threads, chunk=1000, **hp)
    params = _params(twin.groups())
    hessians = [torch.ones_like(p, dtype=torch.float32) for p in params]
    for t in range(5):
        opt.step(q)
        m = opt.metrics()
        want = reference.hizoo_step(params, hessians, twin, 5, t, backend=backend, chunk=1000, **hp)
        assert (m["loss_0"], m["loss_plus"], m["loss_minus"]) == want
    assert torch.equal(flat(*_params(opt.param_groups)), flat(*params))
    got_d = [opt.hessian(p) for p in _params(opt.param_groups)]
    assert all(torch.equal(a, b) for a, b in zip(got_d, hessians))
    assert any(not torch.equal(d, torch.ones_like(d)) for d in hessians)  # D moved: the test sees its update
