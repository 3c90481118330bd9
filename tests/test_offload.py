"""Block offloading on CPU (host-to-host copies, no-op streams -- the CUDA schedule's code path):
losses and weights equal the non-offloaded path, each block crosses the bus once per ZO step, the ring
never holds more than its size, deferred updates land before evaluation, the runner's run.offload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO, compose
from omegaconf import OmegaConf

from zoexp.closure import Counters, make_closure
from zoexp.methods import HZO, MeZO
from zoexp.methods.deferred import DualPerturbation
from zoexp.models import load_model, param_groups
from zoexp.offload import enable_offload
from zoexp.scoring import Encoder, dual_lm_loss, lm_loss, score_candidates
from zoexp.tasks import Example

MODELS = ["tiny_opt", "tiny_llama"]


def _batch(n: int = 6, offset: int = 0) -> list[Example]:
    return [Example(id=i, prompt=f"review {i} : the film was {'wonderful' if i % 2 else 'awful'} overall . It was",
                    candidates=[" terrible", " great"], label=i % 2) for i in range(offset, offset + n)]


def _fresh(request, name):
    model, tok = request.getfixturevalue(name)
    return copy.deepcopy(model), tok


METHODS = {
    "mezo": lambda groups: MeZO(groups, lr=1e-3, eps=1e-3, seed=3),
    "hzo": lambda groups: HZO(groups, lr=1e-3, eps=1e-3, rank=2, interval=2, fo_layers=0, seed=3),
    "hzo-z+f": lambda groups: HZO(groups, lr=1e-3, eps=1e-3, rank=2, interval=2, fo_layers=1,
                                  fo_optimizer="sgd", fo_lr=1e-2, seed=3),
}


class _Still:
    """A stand-in method that perturbs nothing: the dual forward then computes the plain loss twice."""

    def __init__(self, offloader):
        self.offloader, self.param_groups = offloader, []

    def zo_group_ids(self):
        return []


@pytest.mark.parametrize("name", MODELS)
def test_dual_forward_equals_lm_loss_bit_for_bit(name, request):
    model, tok = _fresh(request, name)
    plain = copy.deepcopy(model)
    off = enable_offload(model, None, "cpu", ring=2)
    enc, batch = Encoder(tok, 128), _batch()
    with torch.no_grad():
        expected = lm_loss(plain, enc, batch, tok.pad_token_id)
        loss_plus, loss_minus = dual_lm_loss(model, enc, batch, tok.pad_token_id, DualPerturbation(_Still(off), 0))
        single = lm_loss(model, enc, batch, tok.pad_token_id)  # through the single-pass hooks
    assert torch.equal(loss_plus, expected) and torch.equal(loss_minus, expected) and torch.equal(single, expected)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", MODELS)
def test_offloaded_steps_equal_the_plain_path(name, method, request):
    model, tok = _fresh(request, name)
    plain = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    a, b = METHODS[method](param_groups(plain)), METHODS[method](param_groups(model))
    enable_offload(model, b, "cpu", ring=2)
    enc = Encoder(tok, 128)
    counters = Counters()
    for t in range(4):
        batch = _batch(offset=t)
        a.step(make_closure(plain, enc, batch, tok.pad_token_id, counters))
        b.step(make_closure(model, enc, batch, tok.pad_token_id, counters))
        ma, mb = a.metrics(), b.metrics()
        for key in ("loss_plus", "loss_minus", "fo_loss"):
            assert (key in ma) == (key in mb)
            if key in ma:
                # rounding of the fused vs deferred update compounds over the steps (see
                # _assert_weights_agree); measured up to 4e-6 relative at step 3 with the Philox z
                assert mb[key] == pytest.approx(ma[key], rel=1e-5), (t, key)
    b.flush()
    _assert_weights_agree(plain, model, start)


def _assert_weights_agree(plain, model, start) -> None:
    """The two paths round differently (fused vs deferred update; a tied embedding is toggled around the
    head), so weights differ by ulps, losses by ~1e-7 and the projected gradient c = ΔL/2ε by ~1e-7/ε
    relative: the weights agree to that relative accuracy of the distance they moved."""
    for (n, p), q, p0 in zip(plain.named_parameters(), model.parameters(), start):
        moved = (p.detach() - p0).norm().item()
        err = (p.detach() - q.detach()).norm().item()
        assert moved > 0 and err <= 1e-3 * moved + 1e-6, (n, err, moved)


@pytest.mark.parametrize("name", MODELS)
def test_each_block_crosses_the_bus_once_per_zo_step(name, request):
    model, tok = _fresh(request, name)
    opt = HZO(param_groups(model), lr=1e-4, rank=2, interval=3, fo_layers=1, fo_lr=1e-3)
    off = enable_offload(model, opt, "cpu", ring=3)
    n_off = len(off.order)
    assert n_off == len(off.layers) - 1  # the FO block stays on the device
    enc = Encoder(tok, 128)
    moved = []
    for _ in range(4):
        before = (off.uploads, off.offloads)
        opt.step(make_closure(model, enc, _batch(), tok.pad_token_id, Counters()))
        moved.append((off.uploads - before[0], off.offloads - before[1]))
    # ZO steps: one dual pass (each block up and down once); FO steps (t = 0, 3) add one single pass
    assert moved == [(2 * n_off, 2 * n_off), (n_off, n_off), (n_off, n_off), (2 * n_off, 2 * n_off)]


@pytest.mark.parametrize("ring", [1, 2, 3])
def test_ring_never_holds_more_than_its_size(ring, request):
    model, tok = _fresh(request, "tiny_llama")
    opt = MeZO(param_groups(model), lr=1e-3, eps=1e-3)
    off = enable_offload(model, opt, "cpu", ring=ring)
    assert len(off.slots) == ring
    block = max(b.numel() for b in off._buckets.values())
    assert all(s.numel() == block for s in off.slots)
    slots = [(s.data_ptr(), s.data_ptr() + s.numel() * s.element_size()) for s in off.slots]
    layer_ids = {id(p) for layer in off.layers for p in layer.parameters()}

    def where(layer):
        """The ring slots this layer's parameters live in now, found from their storage addresses alone
        (not from the offloader's own bookkeeping)."""
        return {i for p in layer.parameters() for i, (a, b) in enumerate(slots) if a <= p.data_ptr() < b}

    seen, clashes = [], []

    def check(layer, *_):  # registered after the offloader's hooks: runs with the layer acquired
        resident = {j: where(other) for j, other in enumerate(off.layers) if where(other)}
        assert where(layer), "a layer computes while its parameters are not in a ring slot"
        used = [i for s in resident.values() for i in s]
        clashes.append(len(used) != len(set(used)) or any(len(s) != 1 for s in resident.values()))
        seen.append(len(resident))

    for layer in off.layers:
        layer.register_forward_pre_hook(check)
    enc = Encoder(tok, 128)
    for _ in range(2):
        opt.step(make_closure(model, enc, _batch(), tok.pad_token_id, Counters()))
    with torch.no_grad():
        lm_loss(model, enc, _batch(), tok.pad_token_id)
    assert len(seen) >= 3 * len(off.layers)  # two dual forwards and one single pass, every layer
    assert max(seen) <= ring and not any(clashes)  # never more resident layers than slots, never two in one slot
    assert all(not where(layer) for layer in off.layers)  # between steps every layer points at its host bucket
    info = off.device_bytes()
    resident = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"] if id(p) not in layer_ids)
    assert info["offload/device_param_bytes"] == sum(b - a for a, b in slots) + resident


def test_deferred_update_lands_on_flush_and_before_evaluation(request):
    model, tok = _fresh(request, "tiny_opt")
    plain = copy.deepcopy(model)
    a, b = METHODS["mezo"](param_groups(plain)), METHODS["mezo"](param_groups(model))
    enable_offload(model, b, "cpu", ring=2)
    enc = Encoder(tok, 128)
    for _ in range(2):
        a.step(make_closure(plain, enc, _batch(), tok.pad_token_id, Counters()))
        b.step(make_closure(model, enc, _batch(), tok.pad_token_id, Counters()))
    diff = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), model.parameters()))
    assert diff > 1e-4  # step 1's update is still deferred
    b.flush()
    assert not b._pending
    diff = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), model.parameters()))
    assert diff < 1e-5
    examples = _batch(8)
    s_plain = score_candidates(plain, enc, examples, tok.pad_token_id, batch_size=4)
    s_off = score_candidates(model, enc, examples, tok.pad_token_id, batch_size=4)
    assert torch.allclose(torch.tensor(s_plain), torch.tensor(s_off), atol=1e-4)


def test_state_dict_carries_the_deferred_update(request):
    model, tok = _fresh(request, "tiny_opt")
    opt = METHODS["hzo"](param_groups(model))
    enable_offload(model, opt, "cpu", ring=2)
    opt.step(make_closure(model, Encoder(tok, 128), _batch(), tok.pad_token_id, Counters()))
    state = opt.state_dict()
    assert state["zo"]["pending"] and len(state["zo"]["pending"]) == len(opt.param_groups)
    other = METHODS["hzo"](param_groups(copy.deepcopy(model)))
    other.load_state_dict(state)
    assert other._pending == opt._pending


def test_f_plus_z_and_non_zo_methods_are_refused(request):
    model, _ = _fresh(request, "tiny_llama")
    fz = HZO(param_groups(model), fo_layers=1, partition="fz")
    with pytest.raises(ValueError, match="Z\\+F"):
        enable_offload(model, fz, "cpu")
    fo_embed = HZO(param_groups(model), fo_layers=1, fo_extra=["embed"])
    with pytest.raises(ValueError, match="Z\\+F"):
        enable_offload(model, fo_embed, "cpu")
    with pytest.raises(ValueError, match="does not support offloading"):
        enable_offload(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu")


def test_runner_offload_matches_the_plain_run(tmp_path, fixture_data_dir):
    from zoexp.runner import run

    rows = []
    for offload in (False, True):
        cfg = compose(["model=tiny-opt", "method=hzo", "method.lr=1e-3", "method.interval=2", "run.steps=4",
                       "run.eval_every=4", "run.batch_size=4", "task.num_train=16", "task.num_dev=8",
                       "task.num_test=8", "run.progress=false", f"run.offload={str(offload).lower()}",
                       "run.offload_ring=2", "run.loss=lm",
                       f"data_dir={fixture_data_dir}", f"results_dir={tmp_path}"])
        torch.manual_seed(0)
        rows.append(run(cfg, run_dir=tmp_path / f"run{int(offload)}"))
    plain, off = rows
    assert plain["status"] == off["status"] == "ok"
    assert off["forward_passes"] == plain["forward_passes"]
    for a, b in zip(plain["curve"], off["curve"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert off["test/acc"] == plain["test/acc"] and off["dev/acc"] == plain["dev/acc"]
    assert off["offload/ring"] == 2 and off["offload/offloaded_layers"] == 3
    assert off["offload/device_param_bytes"] < off["model_params"] * 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mezo", "hzo-z+f"])
def test_offloaded_steps_equal_the_plain_path_on_smollm2(method):
    """The real model (LLaMA family, tied embedding, 30 layers): 2 offloaded steps equal the plain path."""
    model, tok = load_model(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml"), "fp32", "cpu")
    plain = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    make = {"mezo": lambda g: MeZO(g, lr=1e-5, eps=1e-3, seed=3),
            "hzo-z+f": lambda g: HZO(g, lr=1e-5, eps=1e-3, rank=2, interval=2, fo_layers=1, fo_lr=1e-4, seed=3)}
    a, b = make[method](param_groups(plain)), make[method](param_groups(model))
    off = enable_offload(model, b, "cpu", ring=3)
    enc = Encoder(tok, 256)
    for t in range(2):
        batch = _batch(8, offset=t)
        la = a.step(make_closure(plain, enc, batch, tok.pad_token_id, Counters())).item()
        lb = b.step(make_closure(model, enc, batch, tok.pad_token_id, Counters())).item()
        assert lb == pytest.approx(la, rel=1e-5)
    b.flush()
    _assert_weights_agree(plain, model, start)
    assert off.max_in_ring <= 3
