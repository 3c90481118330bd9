"""Slow reference implementations that the optimized methods must reproduce (importable by test modules).

They materialise every z with ``reference_noise`` (the definition, one whole tensor per parameter),
use plain torch ops, no chunk visitor, no worker threads, no fused kernel.
"""

from __future__ import annotations

import torch

from zoexp.methods.base import decays
from zoexp.methods.noise import CHUNK, mix, reference_noise


@torch.no_grad()
def mezo_step(params: list[torch.Tensor], closure, seed: int, t: int, lr: float, eps: float,
              weight_decay: float = 0.0, backend: str | None = None, fused: bool = True,
              chunk: int | None = None) -> tuple[float, float]:
    """MeZO step t (Malladi et al., 2023, Algorithm 1); keys are the positions in ``params``.

    ``fused=True`` restores and updates in one operation exactly as ``zoexp.methods.MeZO`` documents,
    θ ← (1 − ηλ)(θ − εz) + ((1 − ηλ)ε − ηg) z, so the two must agree bit for bit;
    ``fused=False`` is Algorithm 1 literally (restore θ += εz, then θ ← θ − η(g z + λθ)), equal up to
    floating-point rounding.
    """
    step_seed = mix(seed, t)
    zs = [reference_noise(p.shape, k, step_seed, dtype=p.dtype, device=p.device, backend=backend,
                          chunk=chunk or CHUNK)
          for k, p in enumerate(params)]
    for p, z in zip(params, zs):
        p.add_(z, alpha=eps)
    loss_plus = float(closure())
    for p, z in zip(params, zs):
        p.add_(z, alpha=-2 * eps)
    loss_minus = float(closure())
    g = (loss_plus - loss_minus) / (2 * eps)
    for p, z in zip(params, zs):
        wd = weight_decay if weight_decay and decays(p) else 0.0
        if fused:
            if wd:
                a = 1.0 - lr * wd
                p.mul_(a).add_(z, alpha=a * eps - lr * g)
            else:
                p.add_(z, alpha=eps - lr * g)
        else:
            p.add_(z, alpha=eps)
            p.sub_(lr * (g * z + wd * p))
    return loss_plus, loss_minus


@torch.no_grad()
def hizoo_step(params: list[torch.Tensor], hessians: list[torch.Tensor], closure, seed: int, t: int, lr: float,
               eps: float, weight_decay: float = 0.0, hessian_smooth: float = 1e-9, hessian_min: float = 1e-3,
               hessian_max: float = 1e3, abs_estimate: bool = False, backend: str | None = None,
               chunk: int | None = None) -> tuple[float, float, float]:
    """HiZOO step t as ``zoexp.methods.HiZOO`` documents it, on whole tensors; ``hessians`` (D, one per
    parameter, initially ones) are updated in place. u = D^{-1/2} z; three losses L0, L+, L-;
    θ ← (1 − ηλ)(θ − εu) + ((1 − ηλ)ε − ηg) u; D ← clamp(|(1 − α) D + α c D (z² − 1)|) with
    c = |L+ + L- − 2 L0| / 2ε² (``abs_estimate``: (1 − α) D + α c D |z² − 1|)."""
    step_seed = mix(seed, t)
    zs = [reference_noise(p.shape, k, step_seed, dtype=p.dtype, device=p.device, backend=backend,
                          chunk=chunk or CHUNK)
          for k, p in enumerate(params)]
    loss0 = float(closure())
    for p, z, d in zip(params, zs, hessians):
        p.addcmul_(z, torch.rsqrt(d), value=eps)
    loss_plus = float(closure())
    for p, z, d in zip(params, zs, hessians):
        p.addcmul_(z, torch.rsqrt(d), value=-2 * eps)
    loss_minus = float(closure())
    g = (loss_plus - loss_minus) / (2 * eps)
    c = abs(loss_plus + loss_minus - 2 * loss0) / (2 * eps * eps)
    a_ = hessian_smooth
    for p, z, d in zip(params, zs, hessians):
        a = 1.0 - lr * weight_decay if weight_decay and decays(p) else 1.0
        if a != 1.0:
            p.mul_(a)
        p.addcmul_(z, torch.rsqrt(d), value=a * eps - lr * g)
        if a_:
            if abs_estimate:
                factor = (z * z).sub_(1.0).abs_().mul_(a_ * c).add_(1.0 - a_)
            else:
                factor = (z * z).mul_(a_ * c).add_(1.0 - a_ - a_ * c).abs_()
            d.mul_(factor).clamp_(hessian_min, hessian_max)
    return loss0, loss_plus, loss_minus
