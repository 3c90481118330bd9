"""FOCUS: forward-only coordinate updates with second-order information (FOCUS paper, Section 4, Alg. 1)."""

from __future__ import annotations

import torch

from zoexp.methods.base import tensor_bytes
from zoexp.methods.hizoo import HiZOO
from zoexp.methods.noise import mix
from zoexp.methods.selection import RULES, BlockSelector

_SELECT = 0x5E1EC7  # domain tag: selection seeds never coincide with perturbation step seeds


class FOCUS(HiZOO):
    r"""Block-coordinate HiZOO: k active transformer blocks get the Hessian-preconditioned ZO update,
    the rest stay frozen; embeddings, LM head and any other non-block group (final norm, ...) are
    updated by plain MeZO every step with the same two perturbed losses.

    Param groups with ``role == "block"`` are the blocks. Every ``interval`` steps a rule (``cyclic``,
    ``random``, ``bernoulli``, ``gsd``, ``gsd-bandit``; see ``zoexp.methods.selection``) picks the active
    set A. A block entering A gets D = 1; a block leaving A has its D released, so the state is
    the active blocks' D plus two length-(number of blocks) vectors. With u = D^{-1/2} z on A and u = z on
    the always-active groups, one step is HiZOO's (three forwards, ΔL, fused restore + update + D update).

    GSD score. With a = D^{-1/2} ∇L restricted to the perturbed coordinates, g ≈ aᵀz, and for every
    coordinate E[g² (z_i² − 1)] = 2 a_i² = 2 ∇_i² / D_i. So

        S_b = g²/2 · Σ_{i∈b} (z_i² − 1)

    is an unbiased estimate of block b's Gauss-Southwell-Diagonal score Σ_{i∈b} ∇_i² / D_i (Nutini et al.
    2017; paper Alg. 4), computed from the z that the update pass regenerates anyway (no extra forward).
    It equals ½ Σ ĝ_i²/D_i − ½ g² n_b with ĝ = g D^{1/2} z the unbiased ZO gradient: the naive plug-in
    Σ ĝ_i²/D_i alone has expectation ‖a‖² n_b + 2 S_b (n_b = block size), dominated by the first term. Scores are
    averaged over the steps a block stays active and passed to the rule at the next selection.
    """

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-5, hessian_min: float = 1e-3, hessian_max: float = 1e3,
                 abs_estimate: bool = False, active_blocks: int = 2, interval: int = 10,
                 rule: str = "gsd-bandit", p_min: float = 0.01, bandit_lr: float = 1e-4,
                 score_bound: float | None = None, mezo_lr: float | None = None, seed: int = 0,
                 noise_threads: int | None = None, chunk: int | None = None, noise: str | None = None):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=hessian_smooth,
                         hessian_min=hessian_min, hessian_max=hessian_max, abs_estimate=abs_estimate,
                         seed=seed, noise_threads=noise_threads, chunk=chunk, noise=noise)
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
                                      bandit_lr=bandit_lr, score_bound=score_bound)
        self.active: list[int] = []
        self._score_sum = torch.zeros(n, dtype=torch.float64)
        self._score_steps = torch.zeros(n, dtype=torch.float64)

    @property
    def n_blocks(self) -> int:
        return len(self._block_keys)

    def _init_hessians(self) -> None:  # D exists only for active blocks, created at selection
        pass

    def plain_items(self) -> list[tuple[int, torch.Tensor]]:
        return list(self.items(g for g in self.param_groups if g.get("role") != "block"))

    def hessian_items(self) -> list[tuple[int, torch.Tensor]]:
        return [(k, self._param_of[k]) for b in self.active for k in self._block_keys[b]]

    def _wants_block_scores(self) -> bool:
        return self.selector.needs_scores

    def _before_step(self) -> None:
        if self.steps_done % self.interval == 0:
            self.select_blocks()

    def select_blocks(self) -> list[int]:
        """Pass the last interval's mean scores to the rule, pick the next active set, move the D's."""
        seen = self._score_steps > 0
        self.selector.observe({b: float(self._score_sum[b] / self._score_steps[b])
                               for b in self.active if seen[b]})
        gen = torch.Generator().manual_seed(mix(self.seed, _SELECT, self.selector.selections))
        new = self.selector.select(gen)
        for b in set(self.active) - set(new):  # release first: the peak never holds both sets
            for k in self._block_keys[b]:
                self.state.pop(self._param_of[k], None)
        for b in new:
            for k in self._block_keys[b]:
                p = self._param_of[k]
                if "hessian" not in self.state.get(p, {}):
                    self.state[p]["hessian"] = torch.ones_like(p, memory_format=torch.contiguous_format)
        self.active = list(new)
        self._score_sum.zero_()
        self._score_steps.zero_()
        return self.active

    def _after_step(self, block_sq: dict, grad: float) -> None:
        if not block_sq:
            return
        sums = [0.0] * self.n_blocks
        for (key, _), value in block_sq.items():
            sums[self._block_of[key]] += value
        for b in self.active:
            self._score_sum[b] += 0.5 * grad * grad * (sums[b] - self._block_numel[b])
            self._score_steps[b] += 1

    def block_scores(self) -> dict[int, float]:
        """Mean GSD score estimate of each active block over the steps it has been active so far."""
        return {b: float(self._score_sum[b] / self._score_steps[b]) for b in self.active if self._score_steps[b] > 0}

    def state_bytes(self) -> int:
        return super().state_bytes() + tensor_bytes([*self.selector.tensors(), self._score_sum, self._score_steps])

    def metrics(self) -> dict:
        out = super().metrics()
        out["active_blocks"] = list(self.active)
        if self.selector.rule == "gsd-bandit":
            out["bandit_p_max"] = float(self.selector.probs.max())
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["focus"] = {"active": list(self.active), "selector": self.selector.state_dict(),
                       "score_sum": self._score_sum.clone(), "score_steps": self._score_steps.clone()}
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
