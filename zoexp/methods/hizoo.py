"""HiZOO: Hessian-informed zeroth-order optimisation (Zhao et al., 2024; FOCUS paper Section 3.1.2)."""

from __future__ import annotations

import threading

import torch

from zoexp.methods.base import ZOMethod, decays, finite, loss_value

_LOCAL = threading.local()


def scratch(like: torch.Tensor) -> torch.Tensor:
    """A per-thread buffer shaped like ``like`` (one chunk), reused across calls: no allocation per chunk."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    key = (like.device, like.dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = cache[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()]


class HiZOO(ZOMethod):
    r"""ZO-SGD preconditioned by a diagonal Hessian estimate D = Σ⁻¹ (one tensor per parameter, init 1).

    With z ~ N(0, I) regenerated from the step seed, u = D^{-1/2} z and three forward passes:

        g  = (L(θ + εu) − L(θ − εu)) / 2ε,            ΔL = L(θ + εu) + L(θ − εu) − 2 L(θ)
        θ ← θ − η (g u + λθ)                           (λ on matrices only)
        Ĥ  = |ΔL| / 2ε² · D (z² − 1)                   (Ye 2023 / paper Eq. 3, diagonal: E[Ĥ] = diag ∇²L)
        D ← clamp(|(1 − α) D + α Ĥ|, d_min, d_max)

    The update uses the D that shaped the perturbation (so E[g u] = Σ ∇L). ``abs_estimate=True`` takes
    the absolute value of Ĥ inside the EMA, D ← (1 − α) D + α |Ĥ|, exactly as Eq. 3 is printed; that
    estimate is biased upward by a factor growing with the number of perturbed coordinates (|Ĥ_i| is
    dominated by the other coordinates' curvature), while the default averages the signed, unbiased Ĥ
    and takes the absolute value after. The clamp keeps Σ
    positive and bounded (the assumption of the convergence analysis; the public HiZOO code has no
    lower bound and a default α of 0, which silently reduces it to MeZO).

    Passes over the weights per step: +εu, −2εu, then one fused pass that restores, updates θ and
    updates D (θ ← (1 − ηλ)(θ + εu) − η g u), regenerating z three times, as MeZO does.
    D has the parameter's dtype, so the state is one copy of the trainable parameters. In fp32 an EMA
    increment below ~6e-8 relative is rounded away (α = 1e-9 only moves D when |Ĥ| is large).
    """

    forward_passes_per_step = 3

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-9, hessian_min: float = 1e-3, hessian_max: float = 1e3,
                 abs_estimate: bool = False, seed: int = 0, noise_threads: int | None = None,
                 chunk: int | None = None, noise: str | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__} needs lr >= 0, eps > 0, weight_decay >= 0 "
                             f"(got {lr}, {eps}, {weight_decay})")
        if not 0 <= hessian_smooth <= 1:
            raise ValueError(f"hessian_smooth (EMA α) must be in [0, 1], got {hessian_smooth}")
        if not 0 < hessian_min <= 1 <= hessian_max:
            raise ValueError(f"need 0 < hessian_min <= 1 <= hessian_max (got {hessian_min}, {hessian_max})")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         noise_threads=noise_threads, chunk=chunk, noise=noise)
        self.eps = float(eps)
        self.hessian_smooth = float(hessian_smooth)
        self.hessian_min, self.hessian_max = float(hessian_min), float(hessian_max)
        self.abs_estimate = bool(abs_estimate)
        self._param_of = {k: p for p, k in self._keys.items()}
        self._init_hessians()

    # -- which parameters carry a Hessian (all of them here; FOCUS: the active blocks) ---------------
    def _init_hessians(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["hessian"] = torch.ones_like(p, memory_format=torch.contiguous_format)

    def hessian_items(self) -> list[tuple[int, torch.Tensor]]:
        """(key, parameter) pairs perturbed along D^{-1/2} z."""
        return [(k, p) for k, p in self.items() if "hessian" in self.state.get(p, {})]

    def plain_items(self) -> list[tuple[int, torch.Tensor]]:
        """(key, parameter) pairs perturbed along z with no preconditioner (MeZO); none for HiZOO."""
        return []

    def hessian(self, p: torch.Tensor) -> torch.Tensor:
        """The current diagonal Hessian estimate D = Σ⁻¹ of parameter ``p``."""
        return self.state[p]["hessian"]

    # -- one step ------------------------------------------------------------------------------------
    def _before_step(self) -> None:
        pass

    def _after_step(self, block_sq: dict[int, float], grad: float) -> None:
        pass

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        self._before_step()
        seed, eps = self.step_seed(), self.eps
        items = self.hessian_items() + self.plain_items()
        loss0 = loss_value(closure())
        self._perturb(items, seed, eps)
        loss_plus = loss_value(closure())
        self._perturb(items, seed, -2 * eps)
        loss_minus = loss_value(closure())
        grad = (loss_plus - loss_minus) / (2 * eps)
        curvature = (loss_plus + loss_minus - 2 * loss0)
        if finite(loss0, loss_plus, loss_minus):
            block_sq = self._restore_and_update(items, seed, grad, curvature)
            self._after_step(block_sq, grad)
        else:  # restore only; the runner stops the run on a non-finite loss
            self._perturb(items, seed, eps)
        self._last = {"proj_grad": grad, "loss_0": loss0, "loss_plus": loss_plus, "loss_minus": loss_minus,
                      "curvature": curvature / eps**2}
        self.steps_done += 1
        return torch.tensor(loss0)

    def _perturb(self, items, seed: int, scale: float) -> None:
        state = self.state

        def fn(view, z, key, a, b):
            st = state.get(self._param_of[key])
            if st and "hessian" in st:
                s = torch.rsqrt(st["hessian"].view(-1)[a:b], out=scratch(view))
                view.addcmul_(z, s, value=scale)
            else:
                view.add_(z, alpha=scale)

        self.noise.visit(items, seed, fn)

    def _restore_and_update(self, items, seed: int, grad: float, curvature: float) -> dict:
        """θ ← a(θ − εu + εu) − η g u with a = 1 − ηλ, then the D update; returns Σ z² per parameter chunk."""
        eps, alpha = self.eps, self.hessian_smooth
        c = abs(curvature) / (2 * eps * eps)
        lo, hi, abs_estimate = self.hessian_min, self.hessian_max, self.abs_estimate
        want_sq = self._wants_block_scores()
        sq: dict[tuple[int, int], float] = {}
        coef = {}
        group_of = {self._keys[p]: g for g in self.param_groups for p in g["params"]}  # lr may be scheduled
        for key, p in items:
            lr, wd = group_of[key]["lr"], group_of[key]["weight_decay"]
            a = 1.0 - lr * wd if wd and decays(p) else 1.0
            coef[key] = (a, a * eps - lr * grad)
        state = self.state

        def fn(view, z, key, start, stop):
            a, k = coef[key]
            st = state.get(self._param_of[key])
            if a != 1.0:
                view.mul_(a)
            if not (st and "hessian" in st):
                view.add_(z, alpha=k)
                return
            d = st["hessian"].view(-1)[start:stop]
            s = torch.rsqrt(d, out=scratch(view))
            view.addcmul_(z, s, value=k)
            if want_sq:
                sq[(key, start)] = float(torch.dot(z, z)) if z.dtype in (torch.float32, torch.float64) else float(z.float().square().sum())
            if alpha == 0.0:
                return
            # D is positive, so the EMA of D·(stuff) is a multiplicative update: D ← D · factor
            zz = torch.mul(z, z, out=s)
            if abs_estimate:  # (1 − α) + α c |z² − 1|
                zz.sub_(1.0).abs_().mul_(alpha * c).add_(1.0 - alpha)
            else:  # |(1 − α) + α c (z² − 1)|
                zz.mul_(alpha * c).add_(1.0 - alpha - alpha * c).abs_()
            d.mul_(zz).clamp_(lo, hi)

        self.noise.visit(items, seed, fn)
        return sq

    def _wants_block_scores(self) -> bool:
        return False

    def metrics(self) -> dict:
        out = dict(self._last)
        hs = [st["hessian"] for st in self.state.values() if isinstance(st, dict) and "hessian" in st]
        if hs:
            n = sum(h.numel() for h in hs)
            out["hessian_mean"] = sum(float(h.float().sum()) for h in hs) / n
        out["state_bytes"] = self.state_bytes()
        return out
