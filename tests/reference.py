"""Slow reference implementations that the optimized methods must reproduce (importable by test modules).

They materialise every z with ``reference_noise`` (the definition, one whole tensor per parameter),
use plain torch ops, no chunk visitor, no worker threads, no fused kernel.
"""

from __future__ import annotations

import math

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
               eps: float, weight_decay: float = 0.0, hessian_smooth: float = 1e-9, hessian_min: float | None = 1e-3,
               hessian_max: float | None = 1e3, hessian_update: str = "printed", hessian_form: str = "hizoo",
               backend: str | None = None, chunk: int | None = None) -> tuple[float, float, float]:
    """HiZOO step t on whole tensors, line by line from FOCUS Sec. 3.1.2 (Eq. 2-3); ``hessians`` (D = Σ⁻¹,
    one per parameter, initially ones, fp32 or fp64) are updated in place.

    Σ^{1/2} = D^{-1/2}; three losses L0 = L(θ), L+ = L(θ + μΣ^{1/2}z), L- = L(θ − μΣ^{1/2}z);
    g = (L+ − L-)/2μ; θ ← (1 − ηλ)(θ − μΣ^{1/2}z) + ((1 − ηλ)μ − ηg) Σ^{1/2}z (the fused restore + update);
    ΔL = L+ + L- − 2 L0 (signed); Σ̂ = ΔL/2μ² · (Σ^{-1/2} z zᵀ Σ^{-1/2} − Σ⁻¹), whose diagonal is
    ΔL/2μ² · D (z² − 1) (``hessian_form="focus"``: FOCUS Alg. 1 line 17, ΔL/2μ² · D z²); then

    - ``printed`` (Eq. 3):  Σ⁻¹ ← (1 − α) Σ⁻¹ + α |Σ̂|
    - ``signed``:           Σ⁻¹ ← |(1 − α) Σ⁻¹ + α Σ̂|
    - ``legacy`` (the project's earlier default, the old reference): Σ⁻¹ ← |(1 − α) Σ⁻¹ + α |ΔL|/2μ² D (z² − 1)|

    and the clamp to [hessian_min, hessian_max] (None: none). D is written as D · factor with the same
    floating-point operations as the optimized kernel, so that the two agree bit for bit.
    """
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
    delta = loss_plus + loss_minus - 2 * loss0
    c = delta / (2 * eps * eps)
    if hessian_update == "legacy":
        c = abs(c)
    a_ = hessian_smooth
    for p, z, d in zip(params, zs, hessians):
        a = 1.0 - lr * weight_decay if weight_decay and decays(p) else 1.0
        if a != 1.0:
            p.mul_(a)
        p.addcmul_(z, torch.rsqrt(d), value=a * eps - lr * g)
        if not a_:
            continue
        w = z.to(d.dtype) * z.to(d.dtype)            # diag of Σ^{-1/2} z zᵀ Σ^{-1/2} is D · z²
        if hessian_update == "printed":
            if hessian_form == "hizoo":
                w = (w - 1.0).abs()                  # |D (z² − 1)| / D
            factor = w * (a_ * abs(c)) + (1.0 - a_)  # ((1 − α) D + α |Σ̂|) / D
        elif hessian_form == "hizoo":
            factor = (w * (a_ * c) + (1.0 - a_ - a_ * c)).abs()  # |(1 − α) D + α c D (z² − 1)| / D
        else:
            factor = (w * (a_ * c) + (1.0 - a_)).abs()           # |(1 − α) D + α c D z²| / D
        d.mul_(factor)
        if hessian_min is not None or hessian_max is not None:
            d.clamp_(hessian_min if hessian_min is not None else 0.0,
                     hessian_max if hessian_max is not None else float("inf"))
    return loss0, loss_plus, loss_minus


# ---------------------------------------------------------------------------------------------------------
# FOCUS (Algorithms 1, 3, 4, 6) and HZO (Algorithm 1), line by line from the printed pseudocode.

def kl_project(w: torch.Tensor, k: float, p_min: float) -> torch.Tensor:
    """argmin_{q in P} KL(q || w), P = {sum q = k, p_min <= q <= 1} (Alg. 6 line 11): q = clip(τw, p_min, 1),
    τ by plain bisection in the linear domain (an implementation independent of zoexp's)."""
    w = w.to(torch.float64)
    lo, hi = 0.0, 1.0
    while float((hi * w).clamp(p_min, 1.0).sum()) < k:
        hi *= 2.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if float((mid * w).clamp(p_min, 1.0).sum()) < k:
            lo = mid
        else:
            hi = mid
    return (0.5 * (lo + hi) * w).clamp(p_min, 1.0)


def bandit_alg6(p: torch.Tensor, S: dict[int, float], alpha_p: float, p_min: float, s_upper: float, k: float,
                penalty: bool = True) -> torch.Tensor:
    """Algorithm 6 (UPDATEBANDITDISTRIBUTION), lines 3-12."""
    D = p.numel()
    w = torch.zeros(D, dtype=torch.float64)
    for d in range(D):                                                     # 3
        if d in S:                                                         # 4
            loss = -(S[d] ** 2) / float(p[d]) ** 2 + s_upper ** 2 / p_min ** 2   # 5
        else:                                                              # 6
            loss = s_upper ** 2 / p_min ** 2 if penalty else 0.0           # 7
        w[d] = float(p[d]) * math.exp(-alpha_p * loss / float(p[d]))       # 9
    return kl_project(w, k, p_min)                                         # 11


class FocusReference:
    """FOCUS Algorithm 1 with the rules of Algorithms 3 (Bernoulli on p_t), 4 (GSD on a probe) and 5-6 (bandit).

    ``params``: every trainable tensor in key order; ``blocks``: for each block the keys of its tensors;
    the other keys are the embeddings/head, updated by MeZO's z (Sec. 4.1). Randomness: z from
    ``reference_noise`` with the step seed mix(seed, t); the selection draws from
    torch.Generator(mix(seed, SELECT, s)); the greedy rule's probe z from mix(seed, PROBE, s) -- the
    seeds zoexp uses, so the trajectories can be compared.
    """

    SELECT, PROBE = 0x5E1EC7, 0x9B0BE5

    def __init__(self, params, blocks, closure, seed, lr, eps, alpha, k, interval, rule, p_min=0.01,
                 alpha_p=1e-4, hessian_min=1e-3, hessian_max=1e3):
        self.params, self.blocks, self.closure = params, blocks, closure
        self.seed, self.lr, self.mu, self.alpha, self.k, self.interval, self.rule = seed, lr, eps, alpha, k, interval, rule
        self.p_min, self.alpha_p, self.lo, self.hi = p_min, alpha_p, hessian_min, hessian_max
        self.D = len(blocks)
        self.p = torch.full((self.D,), k / self.D, dtype=torch.float64)
        self.s_upper = 0.0
        self.active: list[int] = []
        self.sigma_inv: dict[int, torch.Tensor] = {}   # key -> Σ⁻¹ of the active blocks' tensors
        self.selections = 0
        block_keys = {key for keys in blocks for key in keys}
        self.plain = [key for key in range(len(params)) if key not in block_keys]

    def _z(self, key, seed):
        p = self.params[key]
        return reference_noise(p.shape, key, seed, dtype=p.dtype)

    def _gsd_probe(self) -> dict[int, float]:
        """Alg. 4 lines 2-5: S_j = Σ_{i∈j} |∇L_i|²/(Σ_j)_i for every block, each ∇L_i/Σ_i estimated from one
        two-point probe over all blocks (Σ = the block's Σ if it is active, else I)."""
        seed = mix(self.seed, self.PROBE, self.selections)
        keys = [key for keys in self.blocks for key in keys]
        zs = {key: self._z(key, seed) for key in keys}
        scale = {key: torch.rsqrt(self.sigma_inv[key]) for key in keys if key in self.sigma_inv}

        def perturb(mu_i):
            for key in keys:
                if key in scale:
                    self.params[key].addcmul_(zs[key], scale[key], value=mu_i)
                else:
                    self.params[key].add_(zs[key], alpha=mu_i)

        perturb(self.mu)
        lp = float(self.closure())
        perturb(-2 * self.mu)
        lm = float(self.closure())
        perturb(self.mu)
        g = (lp - lm) / (2 * self.mu)
        return {j: 0.5 * g * g * sum(float((zs[key].double() ** 2 - 1).sum()) for key in self.blocks[j])
                for j in range(self.D)}

    def select(self):
        """Line 3 (and 4-6: a newly selected block gets Σ = I; a block that leaves drops its Σ)."""
        gen = torch.Generator().manual_seed(mix(self.seed, self.SELECT, self.selections))
        if self.rule == "bernoulli":                                   # Alg. 3
            draw = torch.rand(self.D, generator=gen, dtype=torch.float64)
            new = [i for i in range(self.D) if draw[i] < self.p[i]]
        elif self.rule == "gsd":                                       # Alg. 4
            S = self._gsd_probe()
            new = sorted(sorted(range(self.D), key=lambda j: (-S[j], j))[: self.k])
        else:                                                          # Alg. 5: sample S_t according to p_t
            from zoexp.methods.selection import systematic_sample
            new = systematic_sample(self.p, gen)
        self.selections += 1
        for b in self.active:
            if b not in new:
                for key in self.blocks[b]:
                    self.sigma_inv.pop(key)
        for b in new:
            if b not in self.active:
                for key in self.blocks[b]:
                    self.sigma_inv[key] = torch.ones(self.params[key].shape, dtype=torch.float32)  # 5
        self.active = new

    @torch.no_grad()
    def step(self, t: int):
        if t % self.interval == 0:
            self.select()
        s = mix(self.seed, t)                                          # 8
        keys = [key for b in self.active for key in self.blocks[b]] + self.plain   # 7: others frozen
        zs = {key: self._z(key, s) for key in keys}                    # 11
        root = {key: torch.rsqrt(self.sigma_inv[key]) for key in keys if key in self.sigma_inv}   # Σ^{1/2}
        losses = {}
        for mu_i in (0.0, self.mu, -2 * self.mu):                      # 9
            for key in keys:                                           # 10
                if key in root:                                        # 12
                    self.params[key].addcmul_(zs[key], root[key], value=mu_i)
                else:
                    self.params[key].add_(zs[key], alpha=mu_i)
            losses[math.copysign(1, mu_i) if mu_i else 0] = float(self.closure())   # 14
        g = (losses[1] - losses[-1]) / (2 * self.mu)                   # 16 (projected_grad = g Σ^{1/2})
        dl = losses[1] + losses[-1] - 2 * losses[0]
        for key in keys:                                               # 19-23 (fused with the restore)
            if key in root:
                self.params[key].addcmul_(zs[key], root[key], value=self.mu - self.lr * g)
            else:
                self.params[key].add_(zs[key], alpha=self.mu - self.lr * g)
        for key in root:                                               # 17-18
            d = self.sigma_inv[key]
            zz = zs[key] * zs[key]                                     # Σ̂ = Δℓ/2μ² Σ^{-1/2} z zᵀ Σ^{-1/2}: D z²
            d.mul_(zz * (self.alpha * abs(dl / (2 * self.mu * self.mu))) + (1.0 - self.alpha))
            d.clamp_(self.lo, self.hi)                                 # App. B.1's clamp
        if self.rule in ("gsd-bandit", "bernoulli") and self.active:   # Alg. 6, every iteration
            S = {b: 0.5 * g * g * sum(float((zs[key].double() ** 2 - 1).sum()) for key in self.blocks[b])
                 for b in self.active}
            self.s_upper = max(self.s_upper, *(abs(v) for v in S.values()))
            self.p = bandit_alg6(self.p, S, self.alpha_p, self.p_min, self.s_upper, self.k)
        return losses


@torch.no_grad()
def hzo_run(params, roles, closure, steps: int, seed: int, lr: float, eps: float, rank: int, nu: int,
            fo_keys: list[int], fo_lr: float, chunk: int | None = None) -> list[tuple[float, float]]:
    """HZO Algorithm 1 (resample-triggered FO) for ``steps`` steps, with V held ν steps.

    ``params`` in key order; matrices (2-D, not FO) get U (m×r, fresh every step) and V (n×r, sampled when
    t mod ν = 0 and held in between); vectors get MeZO's z. Line 12's α c UVᵀ/r uses α = lr · r (the tables'
    lr is α/r). FO layers (``fo_keys``) are never perturbed; at t mod ν = 0, after the ZO update, one
    forward + backward with grad only on them and X ← X − η g (lines 14-17).
    """
    from zoexp.methods.noise import U_TAG, V_TAG, factor_seed, lowrank_factor

    V: dict[int, torch.Tensor] = {}
    out = []
    zo = [key for key in range(len(params)) if key not in fo_keys]
    for t in range(steps):                                                         # 1
        U, r = {}, {}
        for key in zo:                                                             # 2
            p = params[key]
            if p.ndim < 2:
                continue
            m, n = p.shape[0], p.numel() // p.shape[0]
            r[key] = min(rank, m, n)
            U[key] = lowrank_factor(m, r[key], key, factor_seed(seed, U_TAG, t), p.dtype, chunk=chunk or CHUNK)  # 3
            if t % nu == 0:                                                        # 4
                V[key] = lowrank_factor(n, r[key], key, factor_seed(seed, V_TAG, t // nu), p.dtype,
                                        chunk=chunk or CHUNK)                      # 5
        zs = {key: reference_noise(params[key].shape, key, mix(seed, t), dtype=params[key].dtype, chunk=chunk or CHUNK)
              for key in zo if key not in U}

        def perturb(scale, U=U, zs=zs):                                            # PERTURBZ
            for key in zo:
                if key in U:
                    params[key].view(params[key].shape[0], -1).addmm_(U[key], V[key].T, alpha=scale * eps)
                else:
                    params[key].add_(zs[key], alpha=scale * eps)

        perturb(+1.0)                                                              # 6
        f_plus = float(closure())                                                  # 7
        perturb(-2.0)                                                              # 8
        f_minus = float(closure())                                                 # 9
        c = (f_plus - f_minus) / (2 * eps)                                         # 11
        for key in zo:                                                             # 10 + 12, fused
            if key in U:
                alpha = lr * r[key]
                params[key].view(params[key].shape[0], -1).addmm_(U[key], V[key].T, alpha=eps - alpha * c / r[key])
            else:
                params[key].add_(zs[key], alpha=eps - lr * c)
        out.append((f_plus, f_minus))
        if t % nu == 0 and fo_keys:                                                # 13
            fo = [params[key] for key in fo_keys]
            with torch.enable_grad():                                              # 14: FO-BACKWARD
                for p in params:
                    p.requires_grad_(False)
                for p in fo:
                    p.requires_grad_(True)
                grads = torch.autograd.grad(closure(), fo)
                for p in params:
                    p.requires_grad_(True)
            for p, g in zip(fo, grads):                                            # 15-16
                p.add_(g, alpha=-fo_lr)
    return out
