"""HZO and LoHO against known answers: low-rank updates, unbiasedness with 1/r, the U/V of a step, exact
restore, determinism, the Z+F partition (only FO blocks backpropagate), FO triggering, state bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import Quadratic, flat

import zoexp.methods.hzo as hzo_module
from zoexp.methods import HZO, LoHO, MeZO
from zoexp.methods.hzo import partition_groups
from zoexp.methods.noise import lowrank_factor, reference_noise
from zoexp.models import param_groups


def _factors(opt: HZO, key: int, p: torch.Tensor, t: int):
    """U_t and V_k of parameter ``key`` from the public definition (not from the optimizer's code path)."""
    m, n = p.shape
    r = min(opt.rank, m, n)
    return (lowrank_factor(m, r, key, opt.u_seed(t), p.dtype), lowrank_factor(n, r, key, opt.v_seed(t), p.dtype), r)


def _pure(q: Quadratic, **kw) -> HZO:
    kw = {"lr": 1e-2, "eps": 1e-3, "rank": 2, "interval": 5, "fo_layers": 0, **kw}
    return HZO(q.groups(), **kw)


# ----------------------------------------------------------------------------- the estimator


def test_updates_of_one_period_have_rank_at_most_r_and_the_next_period_leaves_the_subspace():
    q = Quadratic(shape=(30, 20), n_vec=20, dtype=torch.float64)
    r, nu = 2, 5
    opt = _pure(q, lr=1e-2, eps=1e-4, rank=r, interval=nu)
    w0 = q.w.detach().clone()
    for _ in range(nu):  # steps 0..nu-1: one V period
        opt.step(q)
    s = torch.linalg.svdvals(q.w.detach() - w0)
    assert s[r - 1] / s[0] > 1e-3  # the update uses all r directions ...
    assert s[r] / s[0] < 1e-9      # ... and no more: rank(ΔX) <= r
    for _ in range(nu):  # the next period draws a new V: the accumulated change leaves the subspace
        opt.step(q)
    s = torch.linalg.svdvals(q.w.detach() - w0)
    assert s[2 * r - 1] / s[0] > 1e-3 and s[2 * r] / s[0] < 1e-9


def test_estimate_is_unbiased_with_the_1_over_r_scaling():
    # E[<G, UVᵀ> UVᵀ] = r G for Gaussian U, V: the 1/r makes c·UVᵀ/r unbiased (HZO Eq. 5), with
    # r < min(m, n) (r = n would be a special case: UVᵀ then spans every column direction)
    q = Quadratic(shape=(9, 7), n_vec=4, dtype=torch.float64)
    r = 3
    opt = _pure(q, lr=0.0, eps=1e-6, rank=r, interval=1)
    (key, w), _ = list(opt.keyed_params())
    total = torch.zeros_like(w)
    n = 4000
    for t in range(n):
        opt.step(q)
        u, v, _ = _factors(opt, key, w, t)
        total += opt.metrics()["proj_grad"] * (u @ v.T) / r
    estimate, true = (total / n).flatten(), q.grad()[0].flatten()
    assert torch.nn.functional.cosine_similarity(estimate, true, dim=0).item() > 0.95
    assert 0.85 < (estimate.norm() / true.norm()).item() < 1.15  # without 1/r the ratio would be ~r = 3


@pytest.mark.parametrize("t_check", [0, 1, 4, 5])  # resample steps (0, 5) and steps inside a period
def test_update_uses_exactly_the_u_and_v_of_its_finite_difference(t_check):
    # LOZO's public trainer redraws U after V on resample steps, so its update direction differs from the
    # perturbation it measured. Here: L₊ is exactly L(X + εUVᵀ) and ΔX is exactly −α c UVᵀ / r for the
    # same U, V, regenerated independently from their public definition. lr is the tables' α/r
    # (lr_convention=alpha_over_r): ΔX = −(α/r) c UVᵀ = −lr c UVᵀ.
    q = Quadratic(shape=(12, 9), n_vec=9, dtype=torch.float64)
    lr, eps, r = 1e-2, 1e-3, 3
    opt = _pure(q, lr=lr, eps=eps, rank=r, interval=5)
    for _ in range(t_check):
        opt.step(q)
    (kw, w), (kb, b) = list(opt.keyed_params())
    w0, b0 = w.detach().clone(), b.detach().clone()
    u, v, _ = _factors(opt, kw, w, t_check)
    z = reference_noise(b.shape, kb, opt.step_seed(t_check), dtype=b.dtype)
    q_plus = copy.deepcopy(q)
    with torch.no_grad():
        q_plus.w.add_(eps * u @ v.T)
        q_plus.b.add_(eps * z)
    opt.step(q)
    m = opt.metrics()
    assert m["loss_plus"] == pytest.approx(q_plus().item(), rel=1e-7)  # losses are read in fp32
    c = m["proj_grad"]
    assert torch.allclose(w.detach() - w0, -lr * c * (u @ v.T), atol=1e-12, rtol=1e-9)
    assert torch.allclose(b.detach() - b0, -lr * c * z, atol=1e-12, rtol=1e-9)


def test_every_pass_of_a_step_regenerates_the_same_factors(monkeypatch):
    # structural proof: record each factor drawn; within a step, perturb +, perturb −2, restore+update
    # all draw (U, V) from the same two seeds, and the factors' values agree bit for bit
    seen: list[tuple[int, int, torch.Tensor]] = []
    original = hzo_module.lowrank_factor

    def recording(rows, rank, key, seed, *args, **kw):
        out = original(rows, rank, key, seed, *args, **kw)
        seen.append((key, seed, out.clone()))
        return out

    monkeypatch.setattr(hzo_module, "lowrank_factor", recording)
    q = Quadratic(shape=(6, 5), n_vec=5)
    opt = _pure(q, interval=2)
    for t in range(4):
        seen.clear()
        opt.step(q)
        assert len(seen) == 6  # (U, V) x (perturb +, perturb −2, restore+update)
        u_draws, v_draws = seen[0::2], seen[1::2]
        assert {s for _, s, _ in u_draws} == {opt.u_seed(t)} and {s for _, s, _ in v_draws} == {opt.v_seed(t)}
        assert all(torch.equal(x, u_draws[0][2]) for _, _, x in u_draws)
        assert all(torch.equal(x, v_draws[0][2]) for _, _, x in v_draws)
    assert opt.v_seed(0) == opt.v_seed(1) != opt.v_seed(2)  # V held for nu = 2 steps
    assert opt.u_seed(0) != opt.u_seed(1)


def test_restore_is_bit_exact_when_the_arithmetic_is_exact():
    q = Quadratic(shape=(40, 30), n_vec=30)
    with torch.no_grad():
        for p in q.parameters():
            p.zero_()
    opt = _pure(q, lr=0.0, eps=1.0, rank=4, interval=2)
    for _ in range(4):
        opt.step(q)
    for p in q.parameters():
        assert torch.equal(p.detach(), torch.zeros_like(p))


def test_restore_after_one_step_is_within_rounding():
    q = Quadratic(shape=(64, 32), n_vec=32)
    before = [p.detach().clone() for p in q.parameters()]
    opt = _pure(q, lr=0.0, eps=1e-3, rank=4)
    opt.step(q)
    for p, p0 in zip(q.parameters(), before):
        ulps = (p.detach().view(torch.int32).long() - p0.view(torch.int32).long()).abs()
        assert ulps.max() <= 4


def test_same_seed_same_trajectory_different_seed_different():
    def trajectory(seed, threads):
        q = Quadratic(shape=(16, 10), n_vec=10)
        opt = _pure(q, lr=1e-3, seed=seed, noise_threads=threads, interval=3)
        return [opt.step(q).item() for _ in range(12)], flat(*q.parameters())

    a, wa = trajectory(5, 1)
    b, wb = trajectory(5, 2)
    c, _ = trajectory(6, 1)
    assert a == b and torch.equal(wa, wb)
    assert a != c


def test_loss_falls_on_a_quadratic():
    q = Quadratic(shape=(20, 12), n_vec=12)
    opt = _pure(q, lr=1e-3, rank=2, interval=10)  # lr = α/r: α = 2e-3
    start = q().item()
    for _ in range(400):
        opt.step(q)
    assert q().item() < 0.5 * start


def test_draws_scale_with_r_m_plus_n():
    q = Quadratic(shape=(300, 200), n_vec=7)
    opt = _pure(q, rank=4)
    assert opt.draws_per_step() == 4 * (300 + 200) + 7
    assert opt.state_bytes() == 0  # pure low-rank ZO: nothing kept between steps


def test_weight_decay_only_on_matrices():
    q = Quadratic()
    q.a_w.zero_()
    q.a_b.zero_()  # flat loss: c = 0, only decay acts
    w0, b0 = q.w.detach().clone(), q.b.detach().clone()
    opt = _pure(q, lr=0.1, weight_decay=0.5)
    opt.step(q)
    assert torch.allclose(q.w, w0 * (1 - 0.05), atol=1e-6)
    assert torch.allclose(q.b, b0, atol=1e-6)


def test_loho_without_fo_layers_is_exactly_mezo():
    q1, q2 = Quadratic(), Quadratic()
    a = LoHO(q1.groups(), lr=1e-3, eps=1e-3, fo_layers=0, seed=4)
    b = MeZO(q2.groups(), lr=1e-3, eps=1e-3, seed=4)
    for _ in range(10):
        assert a.step(q1).item() == b.step(q2).item()
    assert torch.equal(flat(*q1.parameters()), flat(*q2.parameters()))


# ----------------------------------------------------------------------------- the hybrid


class Stack(torch.nn.Module):
    """A small model with the four roles (embed, blocks, norm, head) and a regression loss."""

    def __init__(self, n_blocks: int = 4, d: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(3, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n_blocks))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 1)
        self.x = torch.randn(32, 3)
        self.y = torch.randn(32, 1)

    def forward(self):
        h = self.embed(self.x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return ((self.head(self.norm(h)) - self.y) ** 2).mean()

    def groups(self):
        out = [{"params": list(self.embed.parameters()), "role": "embed", "name": "embed", "block": None}]
        out += [{"params": list(b.parameters()), "role": "block", "name": f"layers.{i}", "block": i}
                for i, b in enumerate(self.blocks)]
        out += [{"params": list(self.norm.parameters()), "role": "norm", "name": "norm", "block": None},
                {"params": list(self.head.parameters()), "role": "head", "name": "head", "block": None}]
        return out


def test_partition_z_plus_f_and_f_plus_z():
    groups = Stack().groups()
    roles = [(g["role"], g["block"]) for g in groups]
    zf = partition_groups(groups, 2, "zf")
    assert [r for r, fo in zip(roles, zf) if fo] == [("block", 2), ("block", 3), ("norm", None)]
    fz = partition_groups(groups, 1, "fz")
    assert [r for r, fo in zip(roles, fz) if fo] == [("block", 0)]
    assert [r for r, fo in zip(roles, partition_groups(groups, 1, "zf", ["norm", "head"])) if fo] == \
        [("block", 3), ("norm", None), ("head", None)]
    assert not any(partition_groups(groups, 0, "zf"))
    with pytest.raises(ValueError, match="fo_layers"):
        partition_groups(groups, 5)
    with pytest.raises(ValueError, match="partition"):
        partition_groups(groups, 1, "xy")


def test_fo_head_refused_when_tied(tiny_opt):
    model, _ = tiny_opt
    with pytest.raises(ValueError, match="tied"):
        partition_groups(param_groups(model), 1, "zf", ["head"])


def test_fo_step_only_when_v_is_resampled_and_forward_passes_are_counted():
    m = Stack()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return m()

    opt = HZO(m.groups(), lr=1e-3, rank=2, interval=3, fo_layers=1, fo_optimizer="sgd", fo_lr=1e-2)
    assert opt.forward_passes_per_step == pytest.approx(2 + 1 / 3)
    fo = []
    for _ in range(7):
        calls.clear()
        opt.step(closure)
        fo.append(opt.metrics()["fo_step"])
        assert len(calls) == 2 + fo[-1] and calls[:2] == [False, False] and all(calls[2:])
    assert fo == [1, 0, 0, 1, 0, 0, 1] and opt.fo_steps == 3
    loho = LoHO(Stack().groups(), fo_layers=1)
    assert loho.forward_passes_per_step == 3


def test_fo_step_is_one_optimizer_step_at_the_zo_updated_point():
    m = Stack()
    zo_only = copy.deepcopy(m)  # the same ZO step, FO learning rate 0
    opt = HZO(m.groups(), lr=1e-3, rank=2, interval=2, fo_layers=1, fo_optimizer="sgd", fo_lr=0.1)
    ref = HZO(zo_only.groups(), lr=1e-3, rank=2, interval=2, fo_layers=1, fo_optimizer="sgd", fo_lr=0.0)
    opt.step(m)
    ref.step(zo_only)
    fo_names = {n for n, p in m.named_parameters() if any(p is f for f in opt.fo_params())}
    assert fo_names == {"blocks.3.weight", "blocks.3.bias", "norm.weight", "norm.bias"}
    ref_params = dict(zo_only.named_parameters())
    loss = zo_only()  # the FO gradient at the ZO-updated weights, on the same batch
    grads = dict(zip(sorted(fo_names), torch.autograd.grad(loss, [ref_params[n] for n in sorted(fo_names)])))
    for name, p in m.named_parameters():
        if name in fo_names:
            assert torch.allclose(p, ref_params[name] - 0.1 * grads[name], atol=1e-6)
        else:
            assert torch.equal(p, ref_params[name])


def _lm_closure(model, tok, n: int = 4):
    from zoexp.scoring import Encoder, lm_loss
    from zoexp.tasks import Example

    enc = Encoder(tok, 64)
    batch = [Example(id=i, prompt=f"sentence {i} is rather {'nice' if i % 2 else 'dull'} . It was",
                     candidates=[" terrible", " great"], label=i % 2) for i in range(n)]
    return lambda: lm_loss(model, enc, batch, tok.pad_token_id)


def test_z_plus_f_backpropagates_only_through_fo_blocks(tiny_llama):
    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    groups = param_groups(model)
    opt = HZO(groups, lr=1e-4, rank=2, interval=2, fo_layers=1, partition="zf", fo_lr=1e-3)
    fo = {id(p) for p in opt.fo_params()}
    zo_params = [p for g in groups for p in g["params"] if id(p) not in fo]
    got_grad: list[int] = []
    for i, p in enumerate(zo_params):
        p.register_hook(lambda g, i=i: got_grad.append(i))
    # which module is running when autograd saves a tensor for backward
    layers = model.model.layers
    where = ["embed"]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.append(f"layer{i}"))
        layer.register_forward_hook(lambda *_: where.append("after"))
    saved_in: list[str] = []

    def pack(t):
        saved_in.append(where[-1])
        return t

    fo_before = [p.detach().clone() for p in opt.fo_params()]
    closure = _lm_closure(model, tok)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(3):  # steps 0 and 2 take an FO step
            where[:] = ["embed"]
            opt.step(closure)
    assert opt.fo_steps == 2
    assert not got_grad and all(p.grad is None for p in zo_params)  # ZO params never get .grad
    assert all(p.grad is None for p in opt.fo_params())  # grads freed after the FO step
    assert any(not torch.equal(p.detach(), b) for p, b in zip(opt.fo_params(), fo_before))
    last = f"layer{len(layers) - 1}"
    assert saved_in and set(saved_in) <= {last, "after"}  # nothing stored for ZO blocks or embeddings
    assert all(p.requires_grad for g in groups for p in g["params"])  # flags restored after the step


def test_f_plus_z_keeps_zo_params_without_grad(tiny_llama):
    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    opt = HZO(param_groups(model), lr=1e-4, rank=2, interval=1, fo_layers=1, partition="fz", fo_lr=1e-3)
    fo = {id(p) for p in opt.fo_params()}
    opt.step(_lm_closure(model, tok))
    assert opt.fo_steps == 1
    assert all(p.grad is None for p in model.parameters() if id(p) not in fo)
    assert {g["block"] for gi, g in enumerate(opt.param_groups) if gi not in opt.zo_group_ids()} == {0}


def test_state_bytes_are_the_fo_optimizer_state_exactly():
    m = Stack()
    opt = HZO(m.groups(), lr=1e-3, rank=2, interval=2, fo_layers=1, fo_optimizer="adam")
    assert opt.state_bytes() == 0  # Adam's state is created at its first step
    opt.step(m)
    n_fo = sum(p.numel() for p in opt.fo_params())
    n_tensors = len(opt.fo_params())
    assert opt.state_bytes() == 2 * 4 * n_fo + 4 * n_tensors  # exp_avg + exp_avg_sq (fp32) + step scalars


def test_state_dict_round_trip_continues_identically():
    m1 = Stack()
    o1 = HZO(m1.groups(), lr=1e-3, rank=2, interval=2, fo_layers=1, seed=3)
    for _ in range(3):
        o1.step(m1)
    m2 = copy.deepcopy(m1)
    o2 = HZO(m2.groups(), lr=1e-3, rank=2, interval=2, fo_layers=1, seed=99)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    for _ in range(4):
        assert o1.step(m1).item() == o2.step(m2).item()
    assert torch.equal(flat(*m1.parameters()), flat(*m2.parameters()))


def test_non_finite_loss_restores_and_skips_the_fo_step():
    m = Stack()
    before = flat(*m.parameters())
    opt = HZO(m.groups(), lr=1e-3, rank=2, interval=1, fo_layers=1)
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert not torch.isfinite(loss) and opt.fo_steps == 0
    assert torch.allclose(flat(*m.parameters()), before, atol=1e-6)


def test_fp16_adam_gets_a_representable_eps(tiny_opt):
    """Adam's default eps (1e-8) is 0 in fp16: the first FO step would divide 0 by 0 (NaN)."""
    model = copy.deepcopy(tiny_opt[0]).half()
    opt = HZO(param_groups(model), fo_layers=1, fo_optimizer="adam")
    assert opt.fo_optimizer.defaults["eps"] == 1e-4 and torch.tensor(1e-4, dtype=torch.float16) > 0
    given = HZO(param_groups(model), fo_layers=1, fo_optimizer="adam", fo_kwargs={"eps": 1e-3})
    assert given.fo_optimizer.defaults["eps"] == 1e-3
    fp32 = HZO(param_groups(copy.deepcopy(tiny_opt[0])), fo_layers=1, fo_optimizer="adam")
    assert fp32.fo_optimizer.defaults["eps"] == 1e-8


# ----------------------------------------------------------------------------- LoHO's intra-layer mode


def _intra_mask(opt: LoHO, key: int, p: torch.Tensor) -> torch.Tensor:
    """The ZO mask of a matrix from its public definition: uniform draws from the (seed, "M", key) stream."""
    from zoexp.methods.loho import MASK_TAG
    from zoexp.methods.noise import mix

    g = torch.Generator().manual_seed(mix(opt.seed, MASK_TAG, key) & ((1 << 63) - 1))
    return torch.rand(p.shape, generator=g) < opt.zo_ratio


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_loho_intra_step_matches_a_line_by_line_reference(wd):
    m, ref = Stack().double(), Stack().double()  # float64: the finite difference does not amplify rounding
    m.x, m.y, ref.x, ref.y = m.x.double(), m.y.double(), ref.x.double(), ref.y.double()
    opt = LoHO(m.groups(), lr=1e-2, eps=1e-3, weight_decay=wd, fo_layers=2, fo_optimizer="sgd", fo_lr=0.1,
               hybrid="intra", zo_ratio=0.5, seed=5)
    # reference (LoHO's text): in blocks 2, 3 each matrix is split by M; M = 1 entries and all else MeZO
    params = dict(ref.named_parameters())
    keyed = {name: key for (name, _), (key, _) in zip(m.named_parameters(), opt.keyed_params())}
    fo_mats = {"blocks.2.weight", "blocks.3.weight"}
    masks = {n: _intra_mask(opt, keyed[n], params[n]) for n in fo_mats}
    assert {n for n, p in m.named_parameters() if any(p is f for f in opt.fo_params())} == fo_mats
    for mask in masks.values():
        assert 0.3 < mask.float().mean().item() < 0.7
    with torch.no_grad():
        theta = {n: p.clone() for n, p in params.items()}
        d = {}
        for n, p in params.items():
            z = reference_noise(p.shape, keyed[n], opt.step_seed(0), dtype=p.dtype)
            d[n] = z * masks[n] if n in masks else z
        for n, p in params.items():
            p.copy_(theta[n] + 1e-3 * d[n])
        lp = ref().float().item()  # the optimizer reads losses as float32 (zoexp.methods.base.loss_value)
        for n, p in params.items():
            p.copy_(theta[n] - 1e-3 * d[n])
        lm = ref().float().item()
        g = (lp - lm) / 2e-3
        for n, p in params.items():
            decay = wd if p.ndim >= 2 else 0.0
            if n in masks:
                p.copy_(torch.where(masks[n], theta[n] - 1e-2 * (g * d[n] + decay * theta[n]), theta[n]))
            else:
                p.copy_(theta[n] - 1e-2 * (g * d[n] + decay * theta[n]))
    grads = torch.autograd.grad(ref(), [params[n] for n in sorted(fo_mats)])
    with torch.no_grad():
        for n, grad in zip(sorted(fo_mats), grads):
            params[n].sub_(0.1 * grad * ~masks[n])
    opt.step(m)
    for n, p in m.named_parameters():
        assert torch.allclose(p, params[n], rtol=0, atol=1e-12), (n, (p - params[n]).abs().max().item())
    assert opt.metrics()["fo_step"] == 1 and opt.forward_passes_per_step == 3


def test_loho_intra_keeps_the_two_sets_of_entries_apart():
    base = Stack()
    zo_only, fo_only = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(eps=1e-3, fo_layers=1, fo_optimizer="adam", hybrid="intra", zo_ratio=0.3, seed=2)
    a = LoHO(zo_only.groups(), lr=1e-2, fo_lr=0.0, **kw)
    b = LoHO(fo_only.groups(), lr=0.0, fo_lr=1e-2, **kw)
    for _ in range(3):
        a.step(zo_only)
        b.step(fo_only)
    w0, wa, wb = base.blocks[3].weight, zo_only.blocks[3].weight, fo_only.blocks[3].weight
    mask = _intra_mask(a, a.key(wa), wa)
    assert torch.equal(wa[~mask], w0[~mask]) and not torch.equal(wa[mask], w0[mask])  # ZO: M = 1 only
    # FO: M = 0 only (with lr 0 the ZO entries come back from their perturbation within rounding)
    assert (wb - w0)[mask].abs().max() < 1e-6 and (wb - w0)[~mask].abs().min() > 1e-3
    moments = b.fo_optimizer.state[wb]
    assert not moments["exp_avg"][mask].any() and not moments["exp_avg_sq"][mask].any()
    assert torch.allclose(fo_only.blocks[2].weight, base.blocks[2].weight, atol=1e-6)  # lr 0: the ZO blocks stay
    # the masks are the seed's: a second optimizer draws the same; state bytes count them
    assert torch.equal(LoHO(copy.deepcopy(base).groups(), **kw)._masks[a.key(wa)], mask)
    assert b.state_bytes() == 2 * wb.numel() * 4 + 4 + wb.numel()  # Adam moments + step + one mask byte/entry


def test_loho_intra_restores_exactly_when_it_does_not_learn():
    m = Stack()
    before = flat(*m.parameters()).clone()
    opt = LoHO(m.groups(), lr=0.0, eps=0.5, fo_layers=2, fo_lr=0.0, fo_optimizer="sgd", hybrid="intra", seed=1)
    for _ in range(3):
        opt.step(m)
    assert torch.allclose(flat(*m.parameters()), before, atol=1e-6)


def test_loho_intra_refusals_and_its_checkpoint():
    with pytest.raises(ValueError, match="hybrid"):
        LoHO(Stack().groups(), hybrid="both")
    with pytest.raises(ValueError, match="zo_ratio"):
        LoHO(Stack().groups(), hybrid="intra", zo_ratio=1.5)
    with pytest.raises(ValueError, match="fo_weight_decay=0"):
        LoHO(Stack().groups(), hybrid="intra", fo_weight_decay=0.1)
    with pytest.raises(ValueError, match="fo_extra"):
        LoHO(Stack().groups(), hybrid="intra", fo_extra=["norm"])
    assert LoHO(Stack().groups(), hybrid="inter").supports_offload()
    assert not LoHO(Stack().groups(), hybrid="intra").supports_offload()
    m1 = Stack()
    a = LoHO(m1.groups(), lr=1e-2, fo_lr=1e-2, fo_layers=1, hybrid="intra", seed=3)
    for _ in range(2):
        a.step(m1)
    m2 = copy.deepcopy(m1)
    b = LoHO(m2.groups(), lr=1e-2, fo_lr=1e-2, fo_layers=1, hybrid="intra", seed=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(2):
        assert a.step(m1).item() == b.step(m2).item()
    assert torch.equal(flat(*m1.parameters()), flat(*m2.parameters()))
