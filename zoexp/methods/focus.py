"""FOCUS: forward-only coordinate updates with second-order information (FOCUS paper, Section 4, Alg. 1)."""

from __future__ import annotations

import math

import torch

from zoexp.methods.base import finite, loss_value, tensor_bytes
from zoexp.methods.hizoo import HessianZO
from zoexp.methods.noise import mix
from zoexp.methods.selection import RULES, BlockSelector

_SELECT = 0x5E1EC7  # domain tag: selection seeds never coincide with perturbation step seeds
_PROBE = 0x9B0BE5  # domain tag of the greedy-GSD probe's z


class FOCUS(HessianZO):
    r"""Block-coordinate HiZOO: k active transformer blocks get the Hessian-preconditioned ZO update,
    the rest stay frozen; embeddings, LM head and any other non-block group (final norm, ...) are
    updated by plain MeZO every step with the same two perturbed losses.

    Param groups with ``role == "block"`` are the blocks. Every ``interval`` steps a rule (``cyclic``,
    ``random``, ``bernoulli``, ``gsd``, ``gsd-bandit``; see ``zoexp.methods.selection``) picks the active
    set A. A block entering A gets D = 1 (Alg. 1 lines 4-5); a block leaving A has its D released, so the
    state is the active blocks' D plus a few length-(number of blocks) vectors. With u = D^{-1/2} z on A
    and u = z on the always-active groups, one step is HiZOO's (three forwards, ΔL, fused restore +
    update + D update) with Alg. 1 line 17's estimate Σ̂ = Δℓ/2μ² · Σ^{-1/2} z zᵀ Σ^{-1/2} (diagonal D z²,
    ``hessian_form=focus``; ``hizoo`` gives HiZOO's D(z² − 1)) and line 18's EMA of |Σ̂|.

    GSD score. With a = D^{-1/2} ∇L restricted to the perturbed coordinates, g ≈ aᵀz, and for every
    coordinate E[g² (z_i² − 1)] = 2 a_i² = 2 ∇_i² / D_i. So

        S_b = g²/2 · Σ_{i∈b} (z_i² − 1)

    is an unbiased estimate of block b's Gauss-Southwell-Diagonal score Σ_{i∈b} ∇_i² / D_i (Nutini et al.
    2017; paper Alg. 4), computed from the z that the update pass regenerates anyway (no extra forward).
    The paper does not say how ∇L_i is estimated; the plug-in Σ ĝ_i²/D_i of the ZO gradient
    ĝ = g D^{1/2} z has expectation ‖a‖² n_b + 2 S_b (n_b = block size), which ranks equal-size blocks
    the same, so the unbiased form is used. Its signal-to-noise ratio is about √(2/n_b) per step.

    Every iteration the active blocks' S_b feed the bandit (Alg. 6, ``bandit=printed``); with
    ``bandit=interval-mean`` (the earlier rule) they are averaged over the interval and passed at the next
    selection. The greedy ``gsd`` rule with ``gsd_scores=probe`` (Alg. 4 needs every block's S_j) spends
    two extra forwards at each selection: every block perturbed by ±ε Σ^{1/2} z (Σ = the block's D while
    it is active, else I, the value it would be re-initialised to) with a probe seed, S_j from the same
    formula; nothing is updated by the probe. ``row_fields`` reports how often each block was active and
    the mean ± std of its observed per-step scores.

    Composition: the Hessian-preconditioned step is ``HessianZO.hessian_step`` (shared with HiZOO), the
    choice of blocks is ``BlockSelector`` (``zoexp.methods.selection``); this class moves the D's between
    blocks and turns each step's Σ z² into block scores.
    """

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-5, hessian_min: float | None = 1e-3, hessian_max: float | None = 1e3,
                 hessian_update: str = "printed", hessian_form: str = "focus", state_dtype: str = "float32",
                 active_blocks: int = 2, interval: int = 10, rule: str = "gsd-bandit", p_min: float = 0.01,
                 bandit_lr: float = 1e-4, score_bound: float | None = None, bandit: str = "printed",
                 bandit_unobserved: str = "shift", bandit_score_power: int = 2, gsd_scores: str = "probe",
                 bernoulli_probs: str = "bandit", mezo_lr: float | None = None, seed: int = 0,
                 noise_threads: int | None = None, chunk: int | None = None, noise: str | None = None):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=hessian_smooth,
                         hessian_min=hessian_min, hessian_max=hessian_max, hessian_update=hessian_update,
                         hessian_form=hessian_form, state_dtype=state_dtype, seed=seed,
                         noise_threads=noise_threads, chunk=chunk, noise=noise)
        if rule not in RULES:
            raise ValueError(f"unknown FOCUS rule {rule!r}; choose one of {', '.join(RULES)}")
        if int(interval) < 1 or int(active_blocks) < 1:
            raise ValueError(f"FOCUS needs interval >= 1 and active_blocks >= 1 (got {interval}, {active_blocks})")
        block_groups = [i for i, g in enumerate(self.param_groups) if g.get("role") == "block"]
        if not block_groups:
            raise ValueError("FOCUS needs param groups with role 'block' (one per transformer layer)")
        if mezo_lr is not None:
            for g in self.param_groups:
                if g.get("role") != "block":
                    g["lr"] = float(mezo_lr)
        self.interval = int(interval)
        self._block_keys = [[self.key(p) for p in self.param_groups[i]["params"]] for i in block_groups]
        self._block_of = {k: b for b, keys in enumerate(self._block_keys) for k in keys}
        self._block_numel = [sum(self._param_of[k].numel() for k in keys) for keys in self._block_keys]
        n = len(block_groups)
        # k is capped at the number of blocks (a tiny model may have fewer layers than k)
        self.selector = BlockSelector(n, min(int(active_blocks), n), rule=rule, p_min=p_min,
                                      bandit_lr=bandit_lr, score_bound=score_bound, bandit=bandit,
                                      bandit_unobserved=bandit_unobserved, bandit_score_power=bandit_score_power,
                                      gsd_scores=gsd_scores, bernoulli_probs=bernoulli_probs)
        self.active: list[int] = []
        self._score_sum = torch.zeros(n, dtype=torch.float64)
        self._score_steps = torch.zeros(n, dtype=torch.float64)
        # statistics for the row: steps each block was active, Σ S, Σ S², count of observed scores
        self._active_steps = torch.zeros(n, dtype=torch.float64)
        self._obs = torch.zeros(3, n, dtype=torch.float64)
        self.probe_forwards = 0

    @property
    def n_blocks(self) -> int:
        return len(self._block_keys)

    @property
    def forward_passes_per_step(self) -> float:
        """Three forwards per step, plus the greedy-GSD probe's two at every selection."""
        return 3 + (2 / self.interval if self.selector.needs_probe else 0)

    def step_items(self) -> list[tuple[int, torch.Tensor]]:
        """(key, parameter) pairs one step perturbs: the active blocks (along D^{-1/2} z), then the
        always-active non-block groups (along z)."""
        active = [(k, self._param_of[k]) for b in self.active for k in self._block_keys[b]]
        return active + list(self.keyed_params(g for g in self.param_groups if g.get("role") != "block"))

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("FOCUS.step needs a closure that returns the loss")
        if self.steps_done % self.interval == 0:
            self.select_blocks(closure)
        # block_scores: the row's per-block score statistics and the bandit's input (one dot product per chunk)
        loss0, loss_plus, loss_minus, grad, ok, sq = self.hessian_step(closure, self.step_items(), block_scores=True)
        if ok:
            self.observe(sq, grad)
        self.record(loss0, loss_plus, loss_minus, grad)
        return torch.tensor(loss0)

    def probe_scores(self, closure) -> dict[int, float]:
        """Alg. 4's S_j for every block from one two-point probe (two forwards; weights restored)."""
        if closure is None:
            raise ValueError("greedy GSD with gsd_scores=probe needs the step's closure")
        seed = mix(self.seed, _PROBE, self.selector.selections)
        items = [(k, self._param_of[k]) for keys in self._block_keys for k in keys]
        # the probe moves every block by ±ε: the same ε as the step's (one ε per method, ZOMethod.eps)
        self._perturb(items, seed, 1.0)
        loss_plus = loss_value(closure())
        self._perturb(items, seed, -2.0)
        loss_minus = loss_value(closure())
        sq: dict[tuple[int, int], float] = {}
        self._perturb(items, seed, 1.0, sq=sq)  # restore, recording Σ z² per chunk
        self.probe_forwards += 2
        g = (loss_plus - loss_minus) / (2 * self.eps)
        if not finite(g):
            return {b: 0.0 for b in range(self.n_blocks)}
        return self._scores_from(sq, g, range(self.n_blocks))

    def _scores_from(self, sq: dict, grad: float, blocks) -> dict[int, float]:
        sums = [0.0] * self.n_blocks
        for (key, _), value in sorted(sq.items()):  # a fixed order: the noise workers fill sq in any order
            b = self._block_of.get(key)
            if b is not None:
                sums[b] += value
        return {b: 0.5 * grad * grad * (sums[b] - self._block_numel[b]) for b in blocks}

    def select_blocks(self, closure=None) -> list[int]:
        """Pick the next active set (the rule's input: see ``BlockSelector``), move the D's."""
        if self.selector.bandit == "interval-mean" or self.selector.gsd_scores == "last":
            seen = self._score_steps > 0
            self.selector.observe({b: float(self._score_sum[b] / self._score_steps[b])
                                   for b in self.active if seen[b]})
        scores = self.probe_scores(closure) if self.selector.needs_probe else None
        gen = torch.Generator().manual_seed(mix(self.seed, _SELECT, self.selector.selections))
        new = self.selector.select(gen, scores)
        for b in set(self.active) - set(new):  # release first: the peak never holds both sets
            for k in self._block_keys[b]:
                self.release_hessian(self._param_of[k])
        for b in new:  # a block entering A gets D = 1 (Alg. 1 lines 4-5); one staying keeps its D
            for k in self._block_keys[b]:
                if self._d(k) is None:
                    self.add_hessian(self._param_of[k])
        self.active = list(new)
        self._score_sum.zero_()
        self._score_steps.zero_()
        return self.active

    def observe(self, block_sq: dict, grad: float) -> None:
        """Turn one step's Σ z² into the active blocks' scores: statistics, and the bandit's input."""
        for b in self.active:
            self._active_steps[b] += 1
        if not self.active:
            return
        scores = self._scores_from(block_sq, grad, self.active)
        for b, s in scores.items():
            self._score_sum[b] += s
            self._score_steps[b] += 1
            self._obs[0, b] += 1
            self._obs[1, b] += s
            self._obs[2, b] += s * s
        self._step_scores = scores
        if self.selector.bandit == "printed":
            self.selector.observe_step(scores)

    def block_scores(self) -> dict[int, float]:
        """Mean GSD score estimate of each active block over the steps it has been active so far."""
        return {b: float(self._score_sum[b] / self._score_steps[b]) for b in self.active if self._score_steps[b] > 0}

    def block_stats(self) -> dict:
        """Per block: fraction of steps active, and mean ± std (count) of its observed per-step scores."""
        steps = max(self.steps_done, 1)
        n, s1, s2 = self._obs
        mean = [float(s1[b] / n[b]) if n[b] else None for b in range(self.n_blocks)]
        std = [math.sqrt(max(float(s2[b] / n[b]) - mean[b] ** 2, 0.0) * n[b] / (n[b] - 1)) if n[b] > 1 else None
               for b in range(self.n_blocks)]
        return {"active_frac": [float(a) / steps for a in self._active_steps], "score_mean": mean,
                "score_std": std, "score_n": [int(x) for x in n]}

    def row_fields(self) -> dict:
        stats = self.block_stats()
        out = {f"focus/block_{k}": v for k, v in stats.items()}
        out["focus/bandit_probs"] = [float(p) for p in self.selector.probs]
        out["focus/probe_forwards"] = self.probe_forwards
        return out

    def state_bytes(self) -> int:
        return super().state_bytes() + tensor_bytes([*self.selector.tensors(), self._score_sum, self._score_steps,
                                                     self._active_steps, self._obs])

    def metrics(self) -> dict:
        out = super().metrics()
        out["active_blocks"] = list(self.active)
        if self.selector.uses_bandit:
            out["bandit_p_max"] = float(self.selector.probs.max())
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["focus"] = {"active": list(self.active), "selector": self.selector.state_dict(),
                       "score_sum": self._score_sum.clone(), "score_steps": self._score_steps.clone(),
                       "active_steps": self._active_steps.clone(), "obs": self._obs.clone(),
                       "probe_forwards": self.probe_forwards}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        focus = state_dict.pop("focus", None)
        super().load_state_dict(state_dict)
        if focus is not None:
            self.active = list(focus["active"])
            self.selector.load_state_dict(focus["selector"])
            self._score_sum = focus["score_sum"].clone()
            self._score_steps = focus["score_steps"].clone()
            if "active_steps" in focus:
                self._active_steps = focus["active_steps"].clone()
                self._obs = focus["obs"].clone()
                self.probe_forwards = int(focus.get("probe_forwards", 0))
