"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023, Algorithm 1)."""

from __future__ import annotations

import torch

from zoexp.methods.base import ZOMethod, decays, finite, loss_value


class MeZO(ZOMethod):
    r"""SPSA with the seed trick, in place, no state beyond one seed.

    With z ~ N(0, I) regenerated from the step seed:

        g = (L(θ + εz) − L(θ − εz)) / 2ε,      θ ← θ − η (g z + λ θ)

    (λ only on matrices, not on biases or norm scales). The restore from θ − εz and the update are
    fused into one pass over the weights: θ ← (1 − ηλ)(θ − εz) + ((1 − ηλ)ε − ηg) z, so a step
    regenerates z three times and touches each weight three times. In-place ± perturbation restores
    θ up to floating-point rounding (one ulp in fp32); see README "Numerics".
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
        for group in self.param_groups:
            self.noise.add_(self.items([group]), seed, group["eps"])
        loss_plus = loss_value(closure())
        for group in self.param_groups:
            self.noise.add_(self.items([group]), seed, -2 * group["eps"])
        loss_minus = loss_value(closure())
        eps0 = self.param_groups[0]["eps"]
        grad = (loss_plus - loss_minus) / (2 * eps0)
        ok = finite(loss_plus, loss_minus)
        for group in self.param_groups:
            eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
            if not ok:  # restore only; the runner stops the run on a non-finite loss
                self.noise.add_(self.items([group]), seed, eps)
                continue
            self._restore_and_update(group, seed, eps, lr, wd, grad)
        self._last = {"proj_grad": grad, "loss_plus": loss_plus, "loss_minus": loss_minus}
        self.steps_done += 1
        return torch.tensor((loss_plus + loss_minus) / 2)

    def _restore_and_update(self, group, seed, eps, lr, wd, grad) -> None:
        decay = [(k, p) for k, p in self.items([group]) if wd and decays(p)]
        plain = [(k, p) for k, p in self.items([group]) if not (wd and decays(p))]
        if plain:
            self.noise.add_(plain, seed, eps - lr * grad)
        if decay:
            a = 1.0 - lr * wd
            coef = a * eps - lr * grad
            self.noise.visit(decay, seed, lambda view, z, *_: view.mul_(a).add_(z, alpha=coef))
