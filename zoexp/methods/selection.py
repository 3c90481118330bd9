"""Block-coordinate selection rules for FOCUS (paper Section 4, Algorithms 2-6).

A rule picks which k of D blocks are active for the next ``interval`` steps:

- ``cyclic``     Gauss-Seidel (Alg. 2): blocks s*k, ..., s*k + k - 1 (mod D) at the s-th selection.
- ``random``     k distinct blocks, uniformly.
- ``bernoulli``  each block independently with probability k/D (Alg. 3); the count varies, may be 0.
- ``gsd``        greedy Gauss-Southwell-Diagonal (Alg. 4): the k blocks with the largest last observed
                 score; a block never observed scores +inf, so the first D/k selections visit every block.
- ``gsd-bandit`` the GSD bandit (Alg. 5-6): sample k blocks without replacement with inclusion
                 probabilities p; after each interval, exponential weights on the observed scores and a
                 KL projection back onto {q : sum q = k, p_min <= q <= 1}.

Scores are only observed for blocks that were active (a block's score is estimated from the ZO update
that touches it); see ``zoexp.methods.focus``.
"""

from __future__ import annotations

import math

import torch

RULES = ("cyclic", "random", "bernoulli", "gsd", "gsd-bandit")


def kl_projection(w: torch.Tensor, k: float, p_min: float, p_max: float = 1.0) -> torch.Tensor:
    """argmin_q KL(q || w) over {q : sum q = k, p_min <= q_d <= p_max}, for positive weights w.

    The (generalised) KL divergence sum q log(q/w) - q + w is separable, so the stationarity conditions
    give q_d = clip(tau * w_d, p_min, p_max) with one multiplier tau chosen so that sum q = k. The sum is
    nondecreasing in tau: bisection on log tau, then the free entries are rescaled to hit k exactly.
    """
    w = w.to(torch.float64)
    n = w.numel()
    if not (n * p_min <= k + 1e-12 and k <= n * p_max + 1e-12):
        raise ValueError(f"infeasible projection: need {n} x p_min <= k <= {n} x p_max (p_min={p_min}, k={k})")
    if torch.any(w <= 0) or not torch.all(torch.isfinite(w)):
        raise ValueError("kl_projection needs positive finite weights")
    logw = w.log()

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
                  bound: float) -> torch.Tensor:
    """One exponential-weights step of the GSD bandit (Alg. 6), then the KL projection.

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
    w = (logw - logw.max()).exp()
    return kl_projection(w, k, p_min)


class BlockSelector:
    """State and rule for choosing the active blocks; all randomness comes from the generator passed in."""

    def __init__(self, n_blocks: int, k: int, rule: str = "gsd-bandit", p_min: float = 0.01,
                 bandit_lr: float = 1e-4, score_bound: float | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown block selection rule {rule!r}; choose one of {', '.join(RULES)}")
        if n_blocks < 1 or not 1 <= k <= n_blocks:
            raise ValueError(f"need 1 <= active blocks ({k}) <= blocks ({n_blocks})")
        if rule == "gsd-bandit" and not 0 < p_min * n_blocks <= k:
            raise ValueError(f"gsd-bandit needs 0 < p_min x blocks <= k (p_min={p_min}, blocks={n_blocks}, k={k})")
        self.n, self.k, self.rule = n_blocks, k, rule
        self.p_min, self.bandit_lr, self.score_bound = p_min, bandit_lr, score_bound
        self.selections = 0
        self.probs = torch.full((n_blocks,), k / n_blocks, dtype=torch.float64)
        self.last_score = torch.full((n_blocks,), math.inf, dtype=torch.float64)
        self.score_max = 0.0

    @property
    def needs_scores(self) -> bool:
        return self.rule in ("gsd", "gsd-bandit")

    def select(self, generator: torch.Generator) -> list[int]:
        n, k, s = self.n, self.k, self.selections
        self.selections += 1
        if self.rule == "cyclic":
            return sorted({(s * k + j) % n for j in range(k)})
        if self.rule == "random":
            return sorted(int(i) for i in torch.randperm(n, generator=generator)[:k])
        if self.rule == "bernoulli":
            draw = torch.rand(n, generator=generator, dtype=torch.float64)
            return [int(i) for i in torch.nonzero(draw < k / n).flatten()]
        if self.rule == "gsd":
            # largest score first, ties broken by the lower block index
            order = sorted(range(n), key=lambda d: (-float(self.last_score[d]), d))
            return sorted(order[:k])
        return systematic_sample(self.probs, generator)

    def observe(self, scores: dict[int, float]) -> None:
        """Record the GSD scores of the blocks that were active during the last interval."""
        if not scores:
            return
        for d, score in scores.items():
            self.last_score[d] = score
        self.score_max = max(self.score_max, *scores.values())
        if self.rule == "gsd-bandit":
            bound = self.score_bound if self.score_bound else self.score_max
            self.probs = bandit_update(self.probs, scores, self.bandit_lr, self.p_min, self.k, bound)

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
