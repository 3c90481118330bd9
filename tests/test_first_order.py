"""First-order baselines: known updates on a quadratic, exact state bytes, accumulation, amp, checkpointing,
descent on tiny-opt, LOMO = SGD fused into backward, GaLore state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fo_helpers import eval_loss, setup
from toys import Quadratic

from zoexp.methods import LOMO, FirstOrder, GaLore
from zoexp.methods.first_order import amp_settings, is_checkpointing


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- known answers on a quadratic


def test_sgd_step_is_minus_lr_times_gradient_with_decay_on_matrices_only():
    q = Quadratic()
    w0, b0 = q.w.detach().clone(), q.b.detach().clone()
    gw, gb = q.grad()
    opt = FirstOrder(q.groups(), optimizer="sgd", lr=0.1, weight_decay=0.5)
    loss = opt.step(q)
    assert float(loss) == pytest.approx(Quadratic()().item(), rel=1e-6)
    assert torch.allclose(q.w, w0 - 0.1 * (gw + 0.5 * w0), atol=1e-6)
    assert torch.allclose(q.b, b0 - 0.1 * gb, atol=1e-6)
    assert all(p.grad is None for p in q.parameters())  # freed after the step
    assert opt.state_bytes() == 0 and opt.grad_bytes_max == nbytes(q.parameters())


def test_adamw_first_step_moves_each_weight_by_lr_times_the_sign():
    # first Adam step: m̂ = g, v̂ = g², so θ ← θ − η g / (|g| + ε) (decoupled decay: − ηλθ on matrices)
    q = Quadratic()
    w0, b0 = q.w.detach().clone(), q.b.detach().clone()
    gw, gb = q.grad()
    opt = FirstOrder(q.groups(), optimizer="adamw", lr=0.01, eps=1e-8, weight_decay=0.1)
    opt.step(q)
    assert torch.allclose(q.w, w0 * (1 - 0.01 * 0.1) - 0.01 * gw / (gw.abs() + 1e-8), atol=1e-6)
    assert torch.allclose(q.b, b0 - 0.01 * gb / (gb.abs() + 1e-8), atol=1e-6)


@pytest.mark.parametrize("optimizer,kw", [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adamw", {})])
def test_loss_falls_on_a_quadratic(optimizer, kw):
    q = Quadratic()
    opt = FirstOrder(q.groups(), optimizer=optimizer, lr=0.05, **kw)
    start = q().item()
    for _ in range(100):
        opt.step(q)
    assert q().item() < 0.1 * start


@pytest.mark.parametrize("optimizer,kw,copies", [("sgd", {}, 0), ("sgd", {"momentum": 0.9}, 1), ("adamw", {}, 2)])
def test_state_bytes_are_the_sum_of_the_state_tensors(optimizer, kw, copies):
    q = Quadratic()
    opt = FirstOrder(q.groups(), optimizer=optimizer, lr=0.01, **kw)
    opt.step(q)
    tensors = [v for st in opt._inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert opt.state_bytes() == nbytes(tensors)
    # and what that means: SGD none, momentum one copy, Adam two copies + one fp32 step counter per tensor
    params = list(q.parameters())
    steps = 4 * len(params) if optimizer == "adamw" else 0
    assert opt.state_bytes() == copies * nbytes(params) + steps


def test_non_finite_loss_leaves_the_weights_alone():
    q = Quadratic()
    before = [p.detach().clone() for p in q.parameters()]
    opt = FirstOrder(q.groups(), optimizer="sgd", lr=0.1)
    loss = opt.step(lambda: q() * float("nan"))
    assert not math.isfinite(float(loss))
    assert all(torch.equal(p, b) for p, b in zip(q.parameters(), before))


def test_closure_without_graph_is_an_error():
    q = Quadratic()
    opt = FirstOrder(q.groups(), optimizer="sgd", lr=0.1)
    with pytest.raises(RuntimeError, match="no graph"):
        opt.step(lambda: q().detach())


def test_bad_configuration_is_rejected():
    q = Quadratic()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FirstOrder(q.groups(), optimizer="lion")
    with pytest.raises(ValueError, match="accumulation_steps"):
        FirstOrder(q.groups(), accumulation_steps=0)


def test_state_dict_round_trip_continues_identically():
    q1 = Quadratic()
    o1 = FirstOrder(q1.groups(), optimizer="adamw", lr=0.01)
    for _ in range(3):
        o1.step(q1)
    q2 = copy.deepcopy(q1)
    o2 = FirstOrder(q2.groups(), optimizer="adamw", lr=0.5)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as if saved and loaded
    for _ in range(3):
        assert o1.step(q1).item() == o2.step(q2).item()
    assert torch.equal(q1.w, q2.w) and torch.equal(q1.b, q2.b)


# --------------------------------------------------------------------------- mixed precision: what CPU can check


def test_amp_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_settings(None, cpu, torch.float32) == (None, False)
    assert amp_settings("none", cuda, torch.float32) == (None, False)
    assert amp_settings("bf16", cpu, torch.float32) == (torch.bfloat16, False)
    assert amp_settings("bf16", cuda, torch.float32) == (torch.bfloat16, False)
    assert amp_settings("fp16", cuda, torch.float32) == (torch.float16, True)  # fp16 needs a gradient scaler
    with pytest.raises(ValueError, match="needs a CUDA device"):
        amp_settings("fp16", cpu, torch.float32)
    with pytest.raises(ValueError, match="autocasts fp32 weights"):
        amp_settings("bf16", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="none, bf16 or fp16"):
        amp_settings("fp8", cpu, torch.float32)


def test_fp16_amp_on_cpu_is_a_configuration_error():
    q = Quadratic()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        FirstOrder(q.groups(), amp="fp16")


def test_bf16_autocast_runs_matmuls_in_bf16_and_descends(tiny_opt, fixture_data_dir):
    model, opt, closure, _ = setup(tiny_opt, fixture_data_dir, "sgd", ["method.lr=0.05", "method.amp=bf16"])
    seen = []
    fc1 = model.model.decoder.layers[0].fc1
    fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    start = eval_loss(model, closure)
    assert seen == [torch.float32]  # outside the step: no autocast
    opt.step(closure)
    opt.step(closure)
    assert seen[1:] == [torch.bfloat16] * 2 and opt.scaler is None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert eval_loss(model, closure) < start


# --------------------------------------------------------------------------- real closures on tiny models


@pytest.mark.parametrize("method,overrides", [
    ("sgd", ["method.lr=0.05"]),
    ("adam", ["method.lr=1e-3"]),
    ("bcd-sgd", ["method.lr=0.1", "method.interval=1"]),
    ("badam", ["method.lr=1e-3", "method.interval=1"]),
    ("galore", ["method.lr=1e-3", "method.rank=4"]),
    ("lomo", ["method.lr=0.05"]),
])
def test_each_first_order_method_lowers_the_loss_on_tiny_opt(method, overrides, tiny_opt, fixture_data_dir):
    model, opt, closure, counters = setup(tiny_opt, fixture_data_dir, method, overrides)
    start = eval_loss(model, closure)
    for _ in range(3):
        loss = opt.step(closure)
        assert math.isfinite(float(loss))
    assert eval_loss(model, closure) < start
    assert opt.train_mode and opt.forward_passes_per_step == 1
    assert opt.grad_bytes_max > 0


def test_accumulated_gradient_equals_the_full_batch_gradient(tiny_opt, fixture_data_dir):
    full, opt1, closure1, c1 = setup(tiny_opt, fixture_data_dir, "sgd", ["method.lr=0.05"])
    parts, opt4, closure4, c4 = setup(tiny_opt, fixture_data_dir, "sgd",
                                      ["method.lr=0.05", "method.accumulation_steps=4"])
    loss1, loss4 = opt1.step(closure1), opt4.step(closure4)
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-5)
    for (name, a), b in zip(full.named_parameters(), parts.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert c1.forward_passes == c4.forward_passes == 1 and c1.tokens == c4.tokens


def test_more_parts_than_examples_is_an_error(tiny_opt, fixture_data_dir):
    _, opt, closure, _ = setup(tiny_opt, fixture_data_dir, "sgd", ["method.accumulation_steps=5"], n=4)
    with pytest.raises(ValueError, match="must not exceed run.batch_size"):
        opt.step(closure)


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
def test_gradient_checkpointing_gives_the_same_update(fixture, request, fixture_data_dir):
    tiny = request.getfixturevalue(fixture)
    plain, opt1, closure1, _ = setup(tiny, fixture_data_dir, "sgd", ["method.lr=0.05"])
    ckpt, opt2, closure2, _ = setup(tiny, fixture_data_dir, "sgd",
                                    ["method.lr=0.05", "method.gradient_checkpointing=true"])
    assert is_checkpointing(ckpt) and not is_checkpointing(plain)
    assert float(opt1.step(closure1)) == pytest.approx(float(opt2.step(closure2)), rel=1e-6)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- LOMO, GaLore


def test_lomo_is_sgd_fused_into_backward(tiny_opt, fixture_data_dir):
    sgd_model, sgd, sgd_closure, _ = setup(tiny_opt, fixture_data_dir, "sgd", ["method.lr=0.05"])
    lomo_model, lomo, lomo_closure, _ = setup(tiny_opt, fixture_data_dir, "lomo", ["method.lr=0.05"])
    assert isinstance(lomo, LOMO)
    for _ in range(2):
        assert float(sgd.step(sgd_closure)) == pytest.approx(float(lomo.step(lomo_closure)), rel=1e-5)
    for a, b in zip(sgd_model.parameters(), lomo_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # the point of LOMO: never all gradients at once (SGD holds all of them after backward)
    largest = max(nbytes([p]) for p in lomo_model.parameters())
    assert largest <= lomo.grad_bytes_max < sgd.grad_bytes_max == nbytes(sgd_model.parameters())
    assert lomo.state_bytes() == 0


def test_adalomo_on_cpu_says_it_needs_a_gpu():
    q = Quadratic()
    with pytest.raises(ValueError, match="adalomo needs a CUDA device"):
        LOMO(q.groups(), variant="adalomo")


def test_galore_projects_block_matrices_and_counts_the_projectors():
    q = Quadratic(shape=(16, 12))
    opt = GaLore(q.groups(), rank=3, update_proj_gap=10, lr=0.01)
    opt.step(q)
    st_w, st_b = opt._inner.state[q.w], opt._inner.state[q.b]
    assert st_w["exp_avg"].shape == (16, 3) and st_b["exp_avg"].shape == q.b.shape  # projected vs plain
    ortho = st_w["projector"].ortho_matrix
    assert ortho.shape == (3, 12)
    moments = nbytes([st_w["exp_avg"], st_w["exp_avg_sq"], st_b["exp_avg"], st_b["exp_avg_sq"]])
    # the projector is a slice of the SVD factor and keeps the factor's whole storage alive
    assert opt.state_bytes() == moments + ortho.untyped_storage().nbytes()
    assert ortho.untyped_storage().nbytes() == 12 * 12 * 4


def test_adam_on_fp16_weights_gets_an_eps_fp16_can_hold():
    """Adam's 1e-8 is 0 in fp16: an unset eps becomes 1e-4 there (finite steps), 1e-8 elsewhere and for
    BlockCoordinate, whose Adam updates fp32 master copies; a given eps is kept."""
    from zoexp.methods.bcd import BlockCoordinate

    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = FirstOrder([{"params": [w]}], optimizer="adamw", lr=1e-3)
    assert opt.hparams["eps"] == 1e-4
    for _ in range(3):
        opt.step(lambda: (w.float() ** 2).sum())
    assert torch.isfinite(w).all() and (w < 1).all()
    assert FirstOrder([{"params": [torch.nn.Parameter(torch.ones(2))]}]).hparams["eps"] == 1e-8
    assert FirstOrder([{"params": [w]}], eps=1e-6).hparams["eps"] == 1e-6
    assert BlockCoordinate([{"params": [w]}], optimizer="adamw").hparams["eps"] == 1e-8
