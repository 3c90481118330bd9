"""The printed algorithms, line by line (tests/reference.py), against the methods on toys with negative
curvature: FOCUS Algorithms 1, 3, 4 and 6; HiZOO Eq. 3; HZO Algorithm 1 (V held ν steps, resample-triggered
FO). Plus: fp16 weights still move D at α = 1e-9; one lr convention in every HZO table config."""

from __future__ import annotations

import copy
import math

import pytest
import reference
import torch
import yaml
from toys import BlockQuadratic, Quadratic, flat

from zoexp.methods import FOCUS, HZO, HiZOO
from zoexp.methods.selection import bandit_update
from zoexp.paths import conf_dir

NEG = [1.0, -1.0, 1.0, 2.0]  # block 1 has negative curvature


# -- HiZOO Eq. 3 ------------------------------------------------------------------------------------------

def _indefinite():
    """L = ½ Σ a_i (θ_i − c_i)² with H = diag(−3, 1, 1, 0.5): one negative eigenvalue."""
    q = Quadratic(shape=(3, 1), n_vec=1)
    q.a_w.copy_(torch.tensor([[-3.0], [1.0], [1.0]]))
    q.a_b.copy_(torch.tensor([0.5]))
    return q


@pytest.mark.parametrize("update", ["printed", "signed", "legacy"])
def test_one_step_estimate_on_an_indefinite_quadratic(update):
    # From D = 1 with α = 1e-4 (fp64 state, no clamp), one step is D' = (1 − α) + α X: recover X.
    # Eq. 3 as printed averages |Σ̂| (positive, biased); the signed EMA averages Σ̂ itself: E = diag H.
    q = _indefinite()
    alpha = 1e-4
    opt = HiZOO(q.groups(), lr=0.0, eps=1e-2, hessian_smooth=alpha, hessian_update=update, state_dtype="float64",
                hessian_min=None, hessian_max=None, noise_threads=1)
    samples = []
    for _ in range(3000):
        for p in q.parameters():
            opt.hessian(p).fill_(1.0)
        opt.step(q)
        samples.append((flat(*(opt.hessian(p) for p in q.parameters())) - (1 - alpha)) / alpha)
    s = torch.stack(samples).double()
    mean, se = s.mean(0), s.std(0) / len(s) ** 0.5
    true = torch.tensor([-3.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    if update == "signed":
        assert torch.all((mean - true).abs() < 4 * se), (mean, true)
    elif update == "printed":
        assert torch.all(mean > 0) and mean[0] > 1.0 and (mean[0] - true[0]).abs() > 10 * se[0], mean
    else:  # |ΔL| inside a signed estimate: the negative eigenvalue comes out positive
        assert mean[0] > 0 and (mean[0] - true[0]).abs() > 10 * se[0], mean


def test_eq3_default_is_printed_and_fp32_state():
    q = Quadratic()
    opt = HiZOO(q.groups())
    group = opt.param_groups[0]  # hyperparameters live in the param groups, as in torch.optim
    assert group["hessian_update"] == "printed" and group["hessian_form"] == "hizoo" and opt.hessian(q.w).dtype == torch.float32
    f = FOCUS(BlockQuadratic().groups())
    assert f.param_groups[0]["hessian_update"] == "printed" and f.param_groups[0]["hessian_form"] == "focus"
    assert f.selector.bandit == "printed" and f.selector.gsd_scores == "probe" and f.selector.bernoulli_probs == "bandit"


@pytest.mark.parametrize("state_dtype,moves", [("float32", True), ("param", False)])
def test_fp16_weights_still_update_d_at_alpha_1e_9(state_dtype, moves):
    q = Quadratic(shape=(20, 10), n_vec=10, dtype=torch.float16)
    opt = HiZOO(q.groups(), lr=1e-4, eps=1e-2, hessian_smooth=1e-9, state_dtype=state_dtype, noise_threads=1)
    for _ in range(20):
        opt.step(q)
    d = flat(*(opt.hessian(p) for p in q.parameters()))
    changed = float((d != 1).float().mean())
    assert (changed > 0.99) if moves else (changed == 0.0), changed
    itemsize = 4 if state_dtype == "float32" else 2
    assert opt.state_bytes() == sum(p.numel() for p in q.parameters()) * itemsize  # counted honestly


def test_fp32_state_survives_a_checkpoint_of_fp16_weights():
    q = Quadratic(dtype=torch.float16)
    opt = HiZOO(q.groups(), hessian_smooth=1e-3)
    opt.step(q)
    opt2 = HiZOO(copy.deepcopy(q).groups(), hessian_smooth=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(st["hessian"].dtype == torch.float32 for st in opt2.state.values())


# -- FOCUS Algorithms 1, 3, 4, 6 --------------------------------------------------------------------------

def test_bandit_update_is_algorithm_6():
    p = torch.tensor([0.5, 0.2, 0.8, 0.5], dtype=torch.float64)   # sums to k = 2
    for scores, penalty in (({1: 3.0, 2: 1.0}, True), ({0: 2.0}, False), ({3: -1.5, 0: 0.5}, True)):
        want = reference.bandit_alg6(p, scores, 0.01, 0.05, 3.0, 2, penalty=penalty)
        got = bandit_update(p, scores, 0.01, 0.05, 2, 3.0, unobserved="shift" if penalty else "zero")
        assert torch.allclose(got, want, atol=1e-9), (got, want)


@pytest.mark.parametrize("rule", ["gsd-bandit", "bernoulli", "gsd"])
def test_focus_matches_algorithm_1_with_its_rule(rule):
    q = BlockQuadratic(n_blocks=4, shape=(4, 3), scales=NEG)
    twin = copy.deepcopy(q)
    hp = dict(lr=1e-2, eps=1e-3, hessian_smooth=0.05, active_blocks=2, interval=3, p_min=0.05, bandit_lr=1e-10)
    opt = FOCUS(q.groups(), rule=rule, seed=7, noise_threads=1, **hp)
    params = list(twin.ordered())
    blocks = [[1 + 2 * b, 2 + 2 * b] for b in range(4)]
    ref = reference.FocusReference(params, blocks, twin, seed=7, lr=hp["lr"], eps=hp["eps"], alpha=hp["hessian_smooth"],
                                   k=2, interval=3, rule=rule, p_min=hp["p_min"], alpha_p=hp["bandit_lr"])
    moved_probs = False
    for t in range(15):
        opt.step(q)
        losses = ref.step(t)
        m = opt.metrics()
        assert opt.active == ref.active, (t, opt.active, ref.active)
        assert (m["loss_0"], m["loss_plus"], m["loss_minus"]) == (losses[0], losses[1], losses[-1]), t
        assert torch.allclose(opt.selector.probs, ref.p, rtol=1e-6, atol=1e-12), (opt.selector.probs, ref.p)
        moved_probs |= not torch.allclose(ref.p, torch.full_like(ref.p, 0.5))
    assert torch.equal(flat(*q.ordered()), flat(*twin.ordered()))  # bit for bit
    for key, d in ref.sigma_inv.items():
        assert torch.equal(opt.hessian(q.ordered()[key]), d)
    if rule != "gsd":
        assert moved_probs  # the bandit distribution moved every iteration
    if rule == "gsd":
        assert opt.forward_passes_per_step == 3 + 2 / 3 and opt.probe_forwards == 2 * 5


def test_focus_row_records_block_activation_and_score_statistics():
    q = BlockQuadratic(n_blocks=4, scales=NEG)
    opt = FOCUS(q.groups(), lr=1e-3, interval=2, rule="cyclic", active_blocks=1)
    for _ in range(16):
        opt.step(q)
    row = opt.row_fields()
    assert row["focus/block_active_frac"] == [0.25] * 4
    assert row["focus/block_score_n"] == [4] * 4
    assert all(isinstance(m, float) and s >= 0 for m, s in zip(row["focus/block_score_mean"], row["focus/block_score_std"]))


# -- HZO Algorithm 1 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nu", [1, 3])
def test_hzo_matches_algorithm_1(nu):
    q = BlockQuadratic(n_blocks=4, shape=(6, 5), scales=NEG)
    twin = copy.deepcopy(q)
    opt = HZO(q.groups(), lr=1e-3, eps=1e-3, rank=2, interval=nu, fo_layers=1, fo_optimizer="sgd", fo_lr=1e-2,
              seed=3, noise_threads=1)
    got = []
    for _ in range(8):
        opt.step(q)
        got.append((opt.metrics()["loss_plus"], opt.metrics()["loss_minus"]))
    fo_keys = [7, 8]  # the deepest block's matrix and bias (Z+F)
    want = reference.hzo_run(list(twin.ordered()), None, twin, 8, seed=3, lr=1e-3, eps=1e-3, rank=2, nu=nu,
                             fo_keys=fo_keys, fo_lr=1e-2, chunk=opt.noise.chunk)
    assert got == want
    assert torch.equal(flat(*q.ordered()), flat(*twin.ordered()))


def test_hzo_same_printed_lr_same_update_whatever_the_rank():
    # lr = α/r: the update of a matrix is −lr · c · UVᵀ for every r; lr_convention=alpha divides by r
    for convention, expect in (("alpha_over_r", 1.0), ("alpha", None)):
        for r in (1, 2, 4):
            q = Quadratic(shape=(8, 6), n_vec=6)
            w0 = q.w.detach().clone()
            opt = HZO(q.groups(), lr=1e-3, eps=1e-3, rank=r, interval=5, fo_layers=0, lr_convention=convention,
                      seed=0, noise_threads=1)
            u, v, _ = opt.factors(opt.key(q.w), q.w, 0)
            opt.step(q)
            c = opt.metrics()["proj_grad"]
            scale = expect if expect is not None else 1.0 / r
            assert torch.allclose(q.w.detach() - w0, -1e-3 * c * scale * (u @ v.T), atol=1e-6)


def _hzo_lrs(profile: dict) -> list:
    out = []
    for part in ("common",):
        out += [v for k, v in (profile.get(part) or {}).items() if k == "method.lr"]
    hzo = (profile.get("methods") or {}).get("hzo") or {}
    out += [hzo["method.lr"]] if "method.lr" in hzo else []
    for var in (profile.get("variants") or {}).values():
        if var and "method.lr" in var:
            out.append(var["method.lr"])
        if var and "method.lr_convention" in var:
            raise AssertionError("a table config overrides the lr convention")
    if "method.lr_convention" in hzo:
        raise AssertionError("a table config overrides the lr convention")
    return [x for v in out for x in (v if isinstance(v, list) else [v])]


def test_every_hzo_table_passes_the_printed_lr_under_one_convention():
    # the paper prints HZO lrs {1e-6, 1e-7} (Table 1), 1e-6 / 2e-7 (Table 5), 1e-7 (Table 8): the paper
    # profiles pass them unchanged, and method.lr means α/r in all of them (conf/method/hzo.yaml)
    printed = {1e-6, 1e-7, 2e-7}
    assert yaml.safe_load((conf_dir() / "method" / "hzo.yaml").read_text())["lr_convention"] == "alpha_over_r"
    seen = 0
    for path in sorted((conf_dir() / "experiment").glob("hzo_table*.yaml")):
        paper = yaml.safe_load(path.read_text())["sweep"]["profiles"]["paper"]
        for lr in _hzo_lrs(paper):
            seen += 1
            assert any(math.isclose(lr, x, rel_tol=1e-9) for x in printed), (path.name, lr)
    assert seen >= 5


def test_block_activation_figure_is_drawn_from_focus_rows(tmp_path):
    from zoexp.figures import draw_blocks

    q = BlockQuadratic(n_blocks=4, scales=NEG)
    opt = FOCUS(q.groups(), lr=1e-3, interval=2, rule="random", active_blocks=1)
    for _ in range(12):
        opt.step(q)
    row = {"status": "ok", "method": "focus", "task": "sst2", "seed": 0, "hparams": {"active_blocks": 1},
           **opt.row_fields()}
    out = draw_blocks({"title": "blocks", "select": {"method": "focus"}}, {}, [row], tmp_path / "fig", "smoke")
    assert [p.suffix for p in out] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in out)
    assert draw_blocks({"title": "none"}, {}, [], tmp_path / "empty", "smoke")  # no rows: says so on the plot
