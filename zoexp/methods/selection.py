"""Block-coordinate selection rules for FOCUS (paper Section 4, Algorithms 2-6).

A rule picks which k of D blocks are active for the next ``interval`` steps:

- ``cyclic``     Gauss-Seidel (Alg. 2): blocks s*k, ..., s*k + k - 1 (mod D) at the s-th selection.
- ``random``     k distinct blocks, uniformly.
- ``bernoulli``  each block independently with probability p_{t,i} (Alg. 3); p_t is the bandit's
                 distribution, updated by Alg. 6 from the active blocks' scores (``bernoulli_probs=bandit``,
                 default), or the fixed k/D (``uniform``, the earlier rule). The count varies and may be 0.
- ``gsd``        greedy Gauss-Southwell-Diagonal (Alg. 4): the k blocks with the largest score S_j. With
                 ``gsd_scores=probe`` (default) FOCUS computes S_j for every block at each selection from
                 one extra two-point probe (``zoexp.methods.focus``) and passes them to ``select``; with
                 ``last`` (the earlier rule) the last interval-mean score seen while a block was active is
                 used, +inf for a block never observed.
- ``gsd-bandit`` the GSD bandit (Alg. 5-6): sample k blocks without replacement with inclusion
                 probabilities p. ``bandit=printed`` (default): Algorithm 6 every iteration, on that
                 iteration's scores of the active blocks; ``bandit=interval-mean`` (the earlier rule):
                 once per interval on interval means with a clipped linear reward (``bandit_update_clipped``).
"""

from __future__ import annotations

import math

import torch

RULES = ("cyclic", "random", "bernoulli", "gsd", "gsd-bandit")


BANDITS = ("printed", "interval-mean")
BANDIT_UNOBSERVED = ("shift", "zero")
GSD_SCORES = ("probe", "last")
BERNOULLI_PROBS = ("bandit", "uniform")


def kl_projection(w: torch.Tensor, k: float, p_min: float, p_max: float = 1.0) -> torch.Tensor:
    """argmin_q KL(q || w) over {q : sum q = k, p_min <= q_d <= p_max}, for positive weights w.

    The (generalised) KL divergence sum q log(q/w) - q + w is separable, so the stationarity conditions
    give q_d = clip(tau * w_d, p_min, p_max) with one multiplier tau chosen so that sum q = k. The sum is
    nondecreasing in tau: bisection on log tau, then the free entries are rescaled to hit k exactly.
    """
    w = w.to(torch.float64)
    if torch.any(w <= 0) or not torch.all(torch.isfinite(w)):
        raise ValueError("kl_projection needs positive finite weights")
    return kl_projection_log(w.log(), k, p_min, p_max)


def kl_projection_log(logw: torch.Tensor, k: float, p_min: float, p_max: float = 1.0) -> torch.Tensor:
    """``kl_projection`` from log-weights (finite), so that weights like exp(1e12) stay representable."""
    logw = logw.to(torch.float64)
    n = logw.numel()
    if not (n * p_min <= k + 1e-12 and k <= n * p_max + 1e-12):
        raise ValueError(f"infeasible projection: need {n} x p_min <= k <= {n} x p_max (p_min={p_min}, k={k})")
    if not torch.all(torch.isfinite(logw)):
        raise ValueError("kl_projection needs finite log-weights")
    logw = logw - logw.max()

    def total(log_tau: float) -> float:
        return float((logw + log_tau).exp().clamp(p_min, p_max).sum())

    lo = math.log(p_min) - float(logw.max()) - 1.0  # every entry at p_min
    hi = math.log(p_max) - float(logw.min()) + 1.0  # every entry at p_max
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < k:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-14:
            break
    q = (logw + 0.5 * (lo + hi)).exp().clamp(p_min, p_max)
    free = (q > p_min) & (q < p_max)
    if free.any():
        rest = k - float(q[~free].sum())
        q[free] = q[free] * (rest / float(q[free].sum()))
        q = q.clamp(p_min, p_max)
    return q


def systematic_sample(q: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Sample round(sum q) distinct indices, index d included with probability exactly q_d (q_d <= 1).

    Systematic (Madow) sampling on a random order: lay the q_d end to end on [0, k), draw u ~ U[0, 1),
    take the entries covering u, u + 1, ..., u + k - 1. An entry with q_d <= 1 covers at most one point.
    """
    n = q.numel()
    k = int(round(float(q.sum())))
    order = torch.randperm(n, generator=generator)
    cum = torch.cumsum(q.to(torch.float64)[order], 0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    points = torch.arange(k, dtype=torch.float64) + u
    idx = torch.searchsorted(cum, points, right=True).clamp(max=n - 1)
    return sorted(int(order[i]) for i in idx)


def bandit_update(probs: torch.Tensor, scores: dict[int, float], lr: float, p_min: float, k: float,
                  bound: float, unobserved: str = "shift", power: int = 2) -> torch.Tensor:
    """Algorithm 6 (FOCUS Appendix B.2) as printed: one exponential-weights step, then the KL projection.

    For d in S_t (observed):  l_d = -Score_d^power / p_d^2 + S_upper^2 / p_min^2   (line 5; power 2 as printed)
    otherwise:                l_d = S_upper^2 / p_min^2 (``unobserved=shift``, line 7) or 0 (``zero``,
                              line 7's "or 0 if no penalty")
    w_d = p_d exp(-alpha_p l_d / p_d) (line 9), p_{t+1} = argmin_{q in P} KL(q || w) (line 11), with
    P = {q : sum q = k, p_min <= q <= 1} (the upper bound 1 makes p inclusion probabilities; it binds only
    when an entry would exceed 1). Computed in log space: w = exp(log p - alpha_p l / p).
    """
    if unobserved not in BANDIT_UNOBSERVED:
        raise ValueError(f"unobserved must be one of {BANDIT_UNOBSERVED}, not {unobserved!r}")
    p = probs.to(torch.float64)
    shift = bound * bound / (p_min * p_min)
    loss = torch.full_like(p, shift if unobserved == "shift" else 0.0)
    for d, score in scores.items():
        loss[d] = -float(score) ** power / float(p[d]) ** 2 + shift
    logw = p.log() - lr * loss / p
    return kl_projection_log(logw, k, p_min)


def bandit_update_clipped(probs: torch.Tensor, scores: dict[int, float], lr: float, p_min: float, k: float,
                          bound: float) -> torch.Tensor:
    """The earlier rule (``bandit=interval-mean``), not Algorithm 6: one step per interval on mean scores.

    For an observed block d, the bandit loss is l_d = -r_d / p_d^2 with r_d = clip(score_d / bound, 0, 1)
    (a larger GSD score is a better arm; p_d^2 is the importance weighting of the variance objective
    sum_d ||g_d||^2 / p_d whose minimiser is p_d ~ ||g_d||, paper Eq. 15). Weights w_d = p_d exp(-lr l_d / p_d);
    unobserved blocks keep w_d = p_d (the paper's "0 if no penalty" option for non-evaluated blocks).
    """
    logw = probs.to(torch.float64).log().clone()
    for d, score in scores.items():
        p = float(probs[d])
        r = min(max(score / bound, 0.0), 1.0) if bound > 0 else 0.0
        logw[d] += lr * r / p**3
    return kl_projection_log(logw, k, p_min)


class BlockSelector:
    """State and rule for choosing the active blocks; all randomness comes from the generator passed in.

    ``bandit``: ``printed`` (Alg. 6 every iteration, ``observe_step``) or ``interval-mean`` (the earlier
    rule: ``observe`` at each selection with interval means). The bandit distribution p drives
    ``gsd-bandit`` and, with ``bernoulli_probs=bandit``, ``bernoulli``. ``gsd_scores``: ``probe`` (scores of
    every block passed to ``select``) or ``last``.
    """

    def __init__(self, n_blocks: int, k: int, rule: str = "gsd-bandit", p_min: float = 0.01,
                 bandit_lr: float = 1e-4, score_bound: float | None = None, bandit: str = "printed",
                 bandit_unobserved: str = "shift", bandit_score_power: int = 2, gsd_scores: str = "probe",
                 bernoulli_probs: str = "bandit"):
        if rule not in RULES:
            raise ValueError(f"unknown block selection rule {rule!r}; choose one of {', '.join(RULES)}")
        if n_blocks < 1 or not 1 <= k <= n_blocks:
            raise ValueError(f"need 1 <= active blocks ({k}) <= blocks ({n_blocks})")
        for name, value, allowed in (("bandit", bandit, BANDITS), ("bandit_unobserved", bandit_unobserved,
                                     BANDIT_UNOBSERVED), ("gsd_scores", gsd_scores, GSD_SCORES),
                                     ("bernoulli_probs", bernoulli_probs, BERNOULLI_PROBS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if int(bandit_score_power) not in (1, 2):
            raise ValueError(f"bandit_score_power must be 1 or 2, not {bandit_score_power}")
        self.n, self.k, self.rule = n_blocks, k, rule
        self.bandit, self.bandit_unobserved = bandit, bandit_unobserved
        self.bandit_score_power = int(bandit_score_power)
        self.gsd_scores, self.bernoulli_probs = gsd_scores, bernoulli_probs
        if self.uses_bandit and not 0 < p_min * n_blocks <= k:
            raise ValueError(f"the bandit needs 0 < p_min x blocks <= k (p_min={p_min}, blocks={n_blocks}, k={k})")
        self.p_min, self.bandit_lr, self.score_bound = p_min, bandit_lr, score_bound
        self.selections = 0
        self.probs = torch.full((n_blocks,), k / n_blocks, dtype=torch.float64)
        self.last_score = torch.full((n_blocks,), math.inf, dtype=torch.float64)
        self.score_max = 0.0

    @property
    def uses_bandit(self) -> bool:
        """Whether the bandit distribution p is maintained (gsd-bandit, bernoulli with bandit p_t)."""
        return self.rule == "gsd-bandit" or (self.rule == "bernoulli" and self.bernoulli_probs == "bandit")

    @property
    def needs_scores(self) -> bool:
        return self.rule == "gsd" or self.uses_bandit

    @property
    def needs_probe(self) -> bool:
        """Whether ``select`` needs every block's score (greedy GSD as Alg. 4 prints it)."""
        return self.rule == "gsd" and self.gsd_scores == "probe"

    def select(self, generator: torch.Generator, scores: dict[int, float] | None = None) -> list[int]:
        n, k, s = self.n, self.k, self.selections
        self.selections += 1
        if self.rule == "cyclic":
            return sorted({(s * k + j) % n for j in range(k)})
        if self.rule == "random":
            return sorted(int(i) for i in torch.randperm(n, generator=generator)[:k])
        if self.rule == "bernoulli":
            draw = torch.rand(n, generator=generator, dtype=torch.float64)
            p = self.probs if self.bernoulli_probs == "bandit" else torch.full_like(draw, k / n)
            return [int(i) for i in torch.nonzero(draw < p).flatten()]
        if self.rule == "gsd":
            if self.gsd_scores == "probe":
                if scores is None or len(scores) != n:
                    raise ValueError("gsd with gsd_scores=probe needs the score of every block at selection")
                ranked = torch.tensor([float(scores[d]) for d in range(n)], dtype=torch.float64)
                self.last_score = ranked
            else:
                ranked = self.last_score
            # largest score first, ties broken by the lower block index
            order = sorted(range(n), key=lambda d: (-float(ranked[d]), d))
            return sorted(order[:k])
        return systematic_sample(self.probs, generator)

    def _bound(self) -> float:
        return self.score_bound if self.score_bound else self.score_max

    def observe_step(self, scores: dict[int, float]) -> None:
        """Algorithm 6 on one iteration's scores of the active blocks (``bandit=printed``)."""
        if not scores:
            return
        self.score_max = max(self.score_max, *(abs(v) for v in scores.values()))
        if self.uses_bandit and self.bandit == "printed":
            self.probs = bandit_update(self.probs, scores, self.bandit_lr, self.p_min, self.k, self._bound(),
                                       self.bandit_unobserved, self.bandit_score_power)

    def observe(self, scores: dict[int, float]) -> None:
        """The interval-mean GSD scores of the blocks that were active during the last interval."""
        if not scores:
            return
        for d, score in scores.items():
            self.last_score[d] = score
        if self.uses_bandit and self.bandit == "interval-mean":
            self.score_max = max(self.score_max, *scores.values())
            self.probs = bandit_update_clipped(self.probs, scores, self.bandit_lr, self.p_min, self.k, self._bound())

    def tensors(self) -> list[torch.Tensor]:
        return [self.probs, self.last_score]

    def state_dict(self) -> dict:
        return {"selections": self.selections, "probs": self.probs.clone(),
                "last_score": self.last_score.clone(), "score_max": self.score_max}

    def load_state_dict(self, state: dict) -> None:
        self.selections = int(state["selections"])
        self.probs = state["probs"].clone().to(torch.float64)
        self.last_score = state["last_score"].clone().to(torch.float64)
        self.score_max = float(state["score_max"])
