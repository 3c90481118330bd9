"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023, Algorithm 1)."""

from __future__ import annotations

import torch

from zoexp.methods.base import ZOMethod, decay_factor


class MeZO(ZOMethod):
    r"""SPSA with the seed trick, in place, no state beyond one seed.

    With z ~ N(0, I) regenerated from the step seed:

        g = (L(θ + εz) − L(θ − εz)) / 2ε,      θ ← θ − η (g z + λ θ)

    (λ only on matrices, not on biases or norm scales). The restore from θ − εz and the update are
    fused into one pass over the weights: θ ← (1 − ηλ)(θ − εz) + ((1 − ηλ)ε − ηg) z, so a step
    regenerates z three times and touches each weight three times. In-place ± perturbation restores
    θ up to floating-point rounding (one ulp in fp32); see docs/numerics.md.

    With an offloader attached (``run.offload=true``) a step is one dual forward through resident
    blocks and the update is deferred to the block's next residency (``ZOMethod.offloaded_zo_step``).
    """

    forward_passes_per_step = 2

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, noise_threads: int | None = None, chunk: int | None = None,
                 noise: str | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"MeZO needs lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         noise_threads=noise_threads, chunk=chunk, noise=noise)

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss")
        seed = self.step_seed()
        loss_plus, loss_minus, grad, _ = self.spsa_step(
            closure, lambda scale: self._perturb(seed, scale), lambda g, *_: self._restore_and_update(seed, g))
        self._last = {"proj_grad": grad, "loss_plus": loss_plus, "loss_minus": loss_minus}
        self.steps_done += 1
        return torch.tensor((loss_plus + loss_minus) / 2)

    # Each pass is one noise call for the whole model (per distinct coefficient), not one per group:
    # the noise workers then share all chunks of the model instead of meeting at a barrier after
    # every block. The per-element arithmetic is the same either way.

    def _perturb(self, seed: int, scale: float) -> None:
        """θ += scale · ε · z."""
        self.noise.add_(list(self.keyed_params()), seed, scale * self.eps)

    def _restore_and_update(self, seed: int, grad: float) -> None:
        """θ ← a(θ − εz) + (aε − ηg) z with a = 1 − ηλ (1 without decay), from θ − εz."""
        entries = []
        for group in self.param_groups:
            lr = group["lr"]
            for k, p in self.keyed_params([group]):
                a = decay_factor(lr, group["weight_decay"], p)
                entries.append((k, p, a, a * self.eps - lr * grad))
        self.add_scaled_z_(entries, seed)

    def draws_per_step(self) -> int:
        """Random numbers one step draws (z over every parameter, regenerated three times)."""
        return sum(p.numel() for _, p in self.keyed_params())

    # per-group operations for offloaded steps (ZOMethod.offloaded_zo_step)

    def perturb_group_(self, group, t, scale) -> None:
        self.noise.add_(self.keyed_params([group]), self.step_seed(t), scale * group["eps"])

    def update_group_(self, group, t, grad, lr, weight_decay) -> None:
        self.add_scaled_z_(((k, p, decay_factor(lr, weight_decay, p), -lr * grad)
                            for k, p in self.keyed_params([group])), self.step_seed(t))
