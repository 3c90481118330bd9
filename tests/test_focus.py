"""FOCUS and its selection rules against known answers: which weights move, restore, state released,
each rule's choices, the bandit's distribution and KL projection, the GSD score estimate."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from toys import BlockQuadratic, Quadratic, flat

from zoexp.methods import FOCUS
from zoexp.methods.selection import BlockSelector, bandit_update_clipped, kl_projection, systematic_sample


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _snapshot(q: BlockQuadratic) -> dict:
    return {"embed": q.embed.detach().clone(), "head": q.head.detach().clone(),
            "blocks": [[p.detach().clone() for p in q.block_params(b)] for b in range(q.n_blocks)]}


# -- the optimizer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["cyclic", "random", "bernoulli", "gsd", "gsd-bandit"])
def test_only_active_blocks_and_embed_head_change(rule):
    q = BlockQuadratic(n_blocks=6)
    opt = FOCUS(q.groups(), lr=1e-2, eps=1e-3, hessian_smooth=1e-2, active_blocks=2, interval=3, rule=rule,
                p_min=0.05, bandit_lr=1e-2, noise_threads=1)
    for _ in range(12):
        before = _snapshot(q)
        opt.step(q)
        after = _snapshot(q)
        active = set(opt.active)
        if rule != "bernoulli":
            assert len(active) == 2
        assert not torch.equal(before["embed"], after["embed"]) and not torch.equal(before["head"], after["head"])
        for b in range(q.n_blocks):
            same = all(torch.equal(x, y) for x, y in zip(before["blocks"][b], after["blocks"][b]))
            if rule == "gsd" and b not in active and opt.steps_done % 3 == 1:
                # the greedy rule's probe perturbs every block at a selection and restores it (within rounding)
                assert all(_ulps(x, y).max() <= 2 for x, y in zip(before["blocks"][b], after["blocks"][b]))
                continue
            assert same == (b not in active), (rule, b, active)


def test_loss_falls_on_a_block_quadratic():
    # the printed Alg. 6 (Score² / p², not scale-free) concentrates p on two blocks within a few intervals
    # here whatever alpha_p; the others keep only p_min, so that run gets the looser bound
    for rule, extra in (("cyclic", {}), ("gsd-bandit", {"bandit": "interval-mean"}), ("gsd-bandit", {}),
                        ("gsd", {})):
        q = BlockQuadratic(n_blocks=6)
        start = q().item()
        opt = FOCUS(q.groups(), lr=1e-2, eps=1e-3, hessian_smooth=1e-3, interval=5, rule=rule, p_min=0.05,
                    **{"bandit_lr": 1e-2, **extra}, noise_threads=1)
        for _ in range(400):
            opt.step(q)
        assert q().item() < (0.5 if rule == "gsd-bandit" and not extra else 0.2) * start, rule


def test_restore_after_three_perturbations_within_rounding():
    q = BlockQuadratic(n_blocks=4, shape=(40, 30), n_vec=50)
    before = flat(*q.ordered())
    opt = FOCUS(q.groups(), lr=0.0, eps=1e-3, hessian_smooth=0.3, interval=1, rule="random")
    for _ in range(3):  # D of the active blocks != 1 after the first step with α = 0.3
        opt.step(q)
    assert _ulps(flat(*q.ordered()), before).max() <= 4  # three steps, at most a few roundings each
    assert (flat(*q.ordered()) - before).mean().abs() < 1e-8


def test_restore_is_bit_exact_when_the_arithmetic_is_exact():
    q = BlockQuadratic(n_blocks=4, shape=(300, 7), n_vec=500)
    with torch.no_grad():
        for p in q.parameters():
            p.zero_()
    # θ = 0, ε = 1, D = 1 then D = 4 (D^{-1/2} = 0.5): every ±εu is exact, so θ must come back bit for bit
    opt = FOCUS(q.groups(), lr=0.0, eps=1.0, hessian_smooth=0.0, interval=3, rule="cyclic", noise_threads=2,
                chunk=1000)
    for t in range(6):
        opt.step(q)
        if t == 0:
            for b in opt.active:
                for p in q.block_params(b):
                    opt.hessian(p).fill_(4.0)
    assert torch.equal(flat(*q.ordered()), torch.zeros_like(flat(*q.ordered())))


def test_hessian_exists_only_for_active_blocks_and_is_released():
    q = BlockQuadratic(n_blocks=5, shape=(6, 4))
    opt = FOCUS(q.groups(), lr=1e-2, hessian_smooth=0.2, active_blocks=2, interval=2, rule="cyclic")
    per_block = sum(p.numel() * 4 for p in q.block_params(0))
    selector = 2 * 5 * 8 + 2 * 5 * 8 + 4 * 5 * 8  # probs, last scores, score sums and counts, row statistics (float64)
    sizes = []
    for _ in range(12):
        opt.step(q)
        held = {p for p in opt.state if "hessian" in opt.state[p]}
        expected = {p for b in opt.active for p in q.block_params(b)}
        assert held == expected
        assert opt.state_bytes() == len(opt.active) * per_block + selector
        assert opt.metrics()["state_bytes"] == opt.state_bytes()
        sizes.append(opt.state_bytes())
    assert max(sizes) == 2 * per_block + selector


def test_hessian_is_reset_only_for_blocks_that_become_active():
    # cyclic, k = 2 of 3, interval 1: {0,1} -> {0,2} -> {1,2}; block 0 stays active across the first change
    q = BlockQuadratic(n_blocks=3)
    opt = FOCUS(q.groups(), lr=1e-3, eps=1e-2, hessian_smooth=0.3, active_blocks=2, interval=1, rule="cyclic")
    opt.step(q)
    assert opt.active == [0, 1]
    d0 = [opt.hessian(p).clone() for p in q.block_params(0)]
    assert not all(torch.equal(d, torch.ones_like(d)) for d in d0)
    opt.select_blocks()  # what the next step does first
    assert opt.active == [0, 2]
    assert all(torch.equal(opt.hessian(p), d) for p, d in zip(q.block_params(0), d0))  # kept
    assert all(torch.equal(opt.hessian(p), torch.ones_like(p)) for p in q.block_params(2))  # fresh
    assert all(p not in opt.state for p in q.block_params(1))  # released


def test_cyclic_visits_blocks_in_order_every_interval():
    q = BlockQuadratic(n_blocks=6)
    opt = FOCUS(q.groups(), lr=1e-3, active_blocks=2, interval=2, rule="cyclic", noise_threads=1)
    seen = []
    for _ in range(8):
        opt.step(q)
        seen.append(tuple(opt.active))
    assert seen == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (0, 1), (0, 1)]


def test_random_rule_is_deterministic_under_a_seed():
    def run(seed):
        q = BlockQuadratic(n_blocks=8)
        opt = FOCUS(q.groups(), lr=1e-3, active_blocks=3, interval=1, rule="random", seed=seed, noise_threads=1)
        picks = []
        for _ in range(10):
            opt.step(q)
            picks.append(tuple(opt.active))
        return picks, flat(*q.ordered())

    a, wa = run(4)
    b, wb = run(4)
    c, _ = run(5)
    assert a == b and torch.equal(wa, wb) and a != c
    assert all(len(set(p)) == 3 for p in a)
    assert len(set(a)) > 3  # not stuck


def test_greedy_gsd_picks_the_largest_scores_and_tries_every_block_first():
    sel = BlockSelector(6, 2, rule="gsd", gsd_scores="last")  # the earlier rule: last interval-mean scores
    gen = torch.Generator().manual_seed(0)
    first = []
    for _ in range(3):  # never-observed blocks score +inf: the first D/k selections visit every block
        first += sel.select(gen)
        sel.observe({b: 1.0 for b in first[-2:]})
    assert sorted(first) == list(range(6))
    sel.observe({0: 1.0, 1: 5.0, 2: 3.0, 3: -1.0, 4: 4.0, 5: 0.5})
    assert sel.select(gen) == [1, 4]
    sel.observe({1: 0.1})  # block 1's fresh score drops below the others' last scores
    assert sel.select(gen) == [2, 4]


def test_bernoulli_includes_each_block_with_probability_k_over_n():
    sel = BlockSelector(10, 3, rule="bernoulli", bernoulli_probs="uniform")
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(10)
    sizes = []
    n = 4000
    for _ in range(n):
        picked = sel.select(gen)
        counts[picked] += 1
        sizes.append(len(picked))
    assert torch.allclose(counts / n, torch.full((10,), 0.3), atol=0.03)
    assert len(set(sizes)) > 3 and abs(sum(sizes) / n - 3) < 0.1


def test_gsd_score_estimates_the_block_gradient_norm():
    # θ fixed (lr = 0), D = 1 (α = 0): the mean score of block b -> Σ_{i∈b} ∇_i² (GSD with unit curvature).
    # Block 3's curvature is 10x, so its gradient dominates and its score is well above the others'.
    q = BlockQuadratic(n_blocks=4, shape=(3, 2), n_vec=3, scales=[1, 1, 1, 10])
    opt = FOCUS(q.groups(), lr=0.0, eps=1e-3, hessian_smooth=0.0, active_blocks=4, interval=10**6, rule="gsd",
                gsd_scores="last", noise_threads=1)
    for _ in range(2000):
        opt.step(q)
    scores = opt.block_scores()
    grads = q.grad()
    true = [float(sum((g * g).sum() for g in grads[1 + 2 * b: 3 + 2 * b])) for b in range(4)]
    assert scores[3] == pytest.approx(true[3], rel=0.25), (scores, true)
    assert all(abs(scores[b] - true[b]) < 0.25 * true[3] for b in range(3)), (scores, true)


def test_gsd_bandit_prefers_the_important_block_on_a_quadratic():
    q = BlockQuadratic(n_blocks=4, shape=(3, 2), n_vec=3, scales=[1, 1, 1, 30])
    opt = FOCUS(q.groups(), lr=0.0, eps=1e-3, hessian_smooth=0.0, active_blocks=1, interval=20,
                rule="gsd-bandit", p_min=0.05, bandit_lr=1e-2, bandit="interval-mean", noise_threads=1)
    for _ in range(1000):
        opt.step(q)
    probs = opt.selector.probs
    assert int(probs.argmax()) == 3 and probs[3] > 0.4, probs  # uniform would be 0.25


def test_state_dict_round_trip_continues_identically():
    q1 = BlockQuadratic(n_blocks=5)
    opt1 = FOCUS(q1.groups(), lr=1e-3, seed=3, hessian_smooth=0.1, interval=3, rule="gsd-bandit", p_min=0.05,
                 bandit_lr=1e-2, noise_threads=1)
    for _ in range(7):
        opt1.step(q1)
    q2 = copy.deepcopy(q1)
    opt2 = FOCUS(q2.groups(), lr=1e-3, seed=99, hessian_smooth=0.1, interval=3, rule="gsd-bandit", p_min=0.05,
                 bandit_lr=1e-2, noise_threads=1)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    assert opt2.active == opt1.active and opt2.state_bytes() == opt1.state_bytes()
    for _ in range(8):
        assert opt1.step(q1).item() == opt2.step(q2).item()
        assert opt1.active == opt2.active
    assert torch.equal(flat(*q1.ordered()), flat(*q2.ordered()))
    assert torch.equal(opt1.selector.probs, opt2.selector.probs)


def test_k_is_capped_and_bad_settings_are_rejected():
    q = Quadratic()  # one block group + a norm group
    opt = FOCUS(q.groups(), active_blocks=2)
    opt.step(q)
    assert opt.active == [0]
    with pytest.raises(ValueError):
        FOCUS(q.groups(), rule="nope")
    with pytest.raises(ValueError):
        FOCUS(BlockQuadratic(n_blocks=6).groups(), active_blocks=1, p_min=0.5)  # 6 x 0.5 > k
    with pytest.raises(ValueError):
        FOCUS([{"params": [torch.nn.Parameter(torch.zeros(3))], "role": "embed"}])  # no blocks


def test_focus_on_a_tiny_llama_touches_only_active_layers(tiny_llama):
    from zoexp.methods import build_method
    from zoexp.models import param_groups

    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "zoexp.methods.FOCUS", "name": "focus", "lr": 1e-3, "active_blocks": 1,
                            "interval": 1, "rule": "random"})
    opt = build_method(cfg, model, seed=0)
    groups = param_groups(model)
    ids = torch.tensor([tok("a fine film , it was great")["input_ids"]])
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    for g in groups:
        changed = any(not torch.equal(before[id(p)], p.detach()) for p in g["params"])
        expected = g["role"] != "block" or g["block"] == opt.active[0]
        assert changed == expected, g["name"]


# -- bandit, projection and sampling ----------------------------------------------------------------

def _brute_force_projection(w: torch.Tensor, k: float, p_min: float, p_max: float = 1.0) -> torch.Tensor:
    """Minimise KL(q || w) over every split of the entries into floor / cap / free, no formula assumed
    beyond: the free entries are proportional to w (stationarity). Exponential in D: small cases only."""
    n = len(w)
    best, best_q = math.inf, None
    for labels in itertools.product((0, 1, 2), repeat=n):  # 0 floor, 1 free, 2 cap
        q = torch.zeros(n, dtype=torch.float64)
        fixed = sum(p_min if lab == 0 else p_max for lab in labels if lab != 1)
        free = [i for i, lab in enumerate(labels) if lab == 1]
        for i, lab in enumerate(labels):
            q[i] = p_min if lab == 0 else p_max if lab == 2 else 0.0
        if free:
            rest = k - fixed
            if rest <= 0:
                continue
            q[free] = w[free] * rest / w[free].sum()
        elif abs(fixed - k) > 1e-9:
            continue
        if torch.any(q < p_min - 1e-12) or torch.any(q > p_max + 1e-12):
            continue
        kl = float((q * (q / w).log() - q + w).sum())
        if kl < best:
            best, best_q = kl, q
    return best_q


def test_kl_projection_matches_brute_force_on_small_cases():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 3 + trial % 3
        w = torch.rand(n, generator=gen, dtype=torch.float64).pow(3) * 5 + 1e-3
        k = float(1 + trial % 2)
        p_min = 0.05 + 0.1 * (trial % 2)
        q = kl_projection(w, k, p_min)
        ref = _brute_force_projection(w, k, p_min)
        assert torch.allclose(q, ref, atol=1e-9), (w, k, q, ref)
        assert abs(float(q.sum()) - k) < 1e-9


def test_kl_projection_matches_a_dense_grid_search():
    # D = 3, k = 1: q lives on a 2-D slice; search it on a fine grid (independent of any KKT reasoning)
    w = torch.tensor([0.02, 0.3, 1.7], dtype=torch.float64)
    p_min = 0.1
    grid = torch.linspace(p_min, 1 - 2 * p_min, 1601, dtype=torch.float64)
    q1, q2 = torch.meshgrid(grid, grid, indexing="ij")
    q3 = 1 - q1 - q2
    ok = q3 >= p_min
    kl = q1 * (q1 / w[0]).log() + q2 * (q2 / w[1]).log() + q3.clamp(min=1e-12) * (q3.clamp(min=1e-12) / w[2]).log()
    kl = torch.where(ok, kl, torch.full_like(kl, math.inf))
    i = int(kl.argmin())
    best = torch.tensor([float(q1.flatten()[i]), float(q2.flatten()[i]), float(q3.flatten()[i])], dtype=torch.float64)
    q = kl_projection(w, 1.0, p_min)
    assert torch.allclose(q, best, atol=1e-3), (q, best)


def test_bandit_distribution_stays_valid_and_rewards_high_scores():
    gen = torch.Generator().manual_seed(3)
    n, k, p_min = 12, 2, 0.02
    probs = torch.full((n,), k / n, dtype=torch.float64)
    for _ in range(300):
        picked = systematic_sample(probs, gen)
        scores = {d: float(torch.rand((), generator=gen)) * (10.0 if d == 7 else 1.0) for d in picked}
        probs = bandit_update_clipped(probs, scores, lr=1e-3, p_min=p_min, k=k, bound=10.0)
        assert abs(float(probs.sum()) - k) < 1e-9
        assert float(probs.min()) >= p_min - 1e-12 and float(probs.max()) <= 1 + 1e-12
    assert int(probs.argmax()) == 7


def test_bandit_step_moves_mass_toward_the_larger_score():
    probs = torch.full((6,), 2 / 6, dtype=torch.float64)
    new = bandit_update_clipped(probs, {1: 5.0, 4: 1.0}, lr=1e-2, p_min=0.01, k=2, bound=5.0)
    assert new[1] > probs[1] and new[1] > new[4]  # the larger score gains the most
    assert all(new[4] > new[d] for d in (0, 2, 3, 5))  # a positive score beats no observation
    assert all(new[d] < probs[d] for d in (0, 2, 3, 5))  # unobserved blocks give up mass
    assert torch.allclose(bandit_update_clipped(probs, {}, lr=1e-2, p_min=0.01, k=2, bound=5.0), probs, atol=1e-12)


def test_systematic_sampling_has_the_requested_inclusion_probabilities():
    q = torch.tensor([0.9, 0.05, 0.3, 0.35, 0.4], dtype=torch.float64)  # sums to 2
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5, dtype=torch.float64)
    n = 5000
    for _ in range(n):
        picked = systematic_sample(q, gen)
        assert len(picked) == 2 and len(set(picked)) == 2
        counts[picked] += 1
    assert torch.allclose(counts / n, q, atol=0.025)


@pytest.mark.slow
def test_focus_on_smollm2_state_is_a_tenth_of_hizoo_and_inactive_layers_stay(data_dir):
    from conftest import compose

    from zoexp.closure import Counters, make_closure
    from zoexp.methods import HiZOO, build_method
    from zoexp.models import load_model, param_groups
    from zoexp.scoring import Encoder
    from zoexp.tasks import Task

    cfg = compose(["model=smollm2-135m", "method=focus", f"data_dir={data_dir}"])
    model, tok = load_model(cfg.model, dtype=torch.float32, device=torch.device("cpu"))
    data = Task.from_config(cfg.task).sample(0, data_dir=str(data_dir), num_train=4, num_dev=0, num_test=0)
    closure = make_closure(model, Encoder(tok, max_length=128), data.train[:4], tok.pad_token_id, Counters())
    hizoo_bytes = HiZOO(param_groups(model)).state_bytes()
    trainable = sum(p.numel() for p in model.parameters())
    assert hizoo_bytes == 4 * trainable  # one fp32 copy of the trainable parameters
    opt = build_method(cfg.method, model, seed=0)
    groups = param_groups(model)
    before = {id(p): p.detach().clone() for g in groups if g["role"] == "block" for p in g["params"]}
    loss = opt.step(closure)
    assert math.isfinite(float(loss)) and len(opt.active) == 2
    assert opt.state_bytes() <= hizoo_bytes / 10
    for g in groups:
        if g["role"] == "block":
            same = all(torch.equal(before[id(p)], p.detach()) for p in g["params"])
            assert same == (g["block"] not in opt.active)
