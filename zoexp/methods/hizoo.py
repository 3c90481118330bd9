"""HiZOO: Hessian-informed zeroth-order optimisation (Zhao et al., 2024; FOCUS paper Section 3.1.2)."""

from __future__ import annotations

import threading

import torch

from zoexp.methods.base import ZOMethod, decay_factor, loss_value

_LOCAL = threading.local()


def scratch(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-thread buffer shaped like ``like`` (one chunk; ``dtype`` default: like's), reused across calls."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    dtype = dtype or like.dtype
    key = (like.device, dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = cache[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
    return buf[: like.numel()]


#: how the diagonal-Hessian EMA uses the estimate (see ``HiZOO``)
HESSIAN_UPDATES = ("printed", "signed", "legacy")
#: the estimate's diagonal: ``hizoo`` D(z² − 1) (FOCUS Eq. 3), ``focus`` D z² (FOCUS Alg. 1 line 17, App. B.1)
HESSIAN_FORMS = ("hizoo", "focus")
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "param": None}


class HessianZO(ZOMethod):
    r"""The part HiZOO and FOCUS share: a ZO step along u = D^{-1/2} z on the parameters that carry a
    diagonal Hessian estimate D (``self.state[p]["hessian"]``), plain z on the others, and D's EMA.

    Which parameters carry a D is the subclass's choice (HiZOO: all; FOCUS: the active blocks), made by
    creating or releasing ``state[p]["hessian"]`` (``add_hessian`` / ``release_hessian``). ``hessian_step``
    is one step over a given set of parameters; the estimator's hyperparameters (α, the clamp, the EMA and
    estimate forms, D's dtype) are read from each parameter's group. See ``HiZOO`` for the maths.
    """

    forward_passes_per_step = 3

    def __init__(self, params, lr: float, eps: float, weight_decay: float, hessian_smooth: float,
                 hessian_min: float | None, hessian_max: float | None, hessian_update: str, hessian_form: str,
                 state_dtype: str, seed: int = 0, noise_threads: int | None = None, chunk: int | None = None,
                 noise: str | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__} needs lr >= 0, eps > 0, weight_decay >= 0 "
                             f"(got {lr}, {eps}, {weight_decay})")
        if not 0 <= hessian_smooth <= 1:
            raise ValueError(f"hessian_smooth (EMA α) must be in [0, 1], got {hessian_smooth}")
        lo = 0.0 if hessian_min is None else float(hessian_min)
        hi = float("inf") if hessian_max is None else float(hessian_max)
        if not (0 <= lo <= 1 <= hi and (hessian_min is None or lo > 0)):
            raise ValueError(f"need 0 < hessian_min <= 1 <= hessian_max (got {hessian_min}, {hessian_max})")
        if hessian_update not in HESSIAN_UPDATES:
            raise ValueError(f"hessian_update must be one of {HESSIAN_UPDATES}, not {hessian_update!r}")
        if hessian_form not in HESSIAN_FORMS:
            raise ValueError(f"hessian_form must be one of {HESSIAN_FORMS}, not {hessian_form!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, not {state_dtype!r}")
        # the clamp's bounds as numbers (none: 0 and inf), so the groups hold what the update uses
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=float(hessian_smooth),
                        hessian_min=lo, hessian_max=hi, hessian_update=hessian_update, hessian_form=hessian_form,
                        state_dtype=state_dtype)
        super().__init__(params, defaults, seed=seed, noise_threads=noise_threads, chunk=chunk, noise=noise)
        self._param_of = {k: p for p, k in self._keys.items()}
        self._group_of = {self._keys[p]: g for g in self.param_groups for p in g["params"]}

    # -- which parameters carry a D ------------------------------------------------------------------
    def add_hessian(self, p: torch.Tensor) -> None:
        """D = 1 for parameter ``p``, in its group's ``state_dtype``."""
        dtype = STATE_DTYPES[self._group_of[self._keys[p]]["state_dtype"]] or p.dtype
        self.state[p]["hessian"] = torch.ones(p.shape, dtype=dtype, device=p.device)

    def release_hessian(self, p: torch.Tensor) -> None:
        self.state.pop(p, None)

    def hessian(self, p: torch.Tensor) -> torch.Tensor:
        """The current diagonal Hessian estimate D = Σ⁻¹ of parameter ``p``."""
        return self.state[p]["hessian"]

    def _d(self, key: int) -> torch.Tensor | None:
        st = self.state.get(self._param_of[key])
        return st["hessian"] if st and "hessian" in st else None

    # -- one step ------------------------------------------------------------------------------------
    def hessian_step(self, closure, items, block_scores: bool = False) -> tuple[float, float, float, float, bool, dict]:
        """One step on ``items`` ((key, parameter) pairs): (L₀, L₊, L₋, g, finite, Σ z² per chunk).

        Three forwards: L₀ = L(θ), then the two-point estimate along u (``ZOMethod.spsa_step``), whose
        restore pass also updates θ and D. With ``block_scores`` the restore pass also returns Σ z² of
        every chunk of a parameter with a D ({(key, chunk start): value}; FOCUS's GSD scores).
        """
        seed = self.step_seed()
        loss0 = loss_value(closure())
        sq: dict[tuple[int, int], float] = {}

        def restore_and_update(grad, loss_plus, loss_minus):
            sq.update(self._restore_and_update(items, seed, grad, loss_plus + loss_minus - 2 * loss0, block_scores))

        loss_plus, loss_minus, grad, ok = self.spsa_step(
            closure, lambda scale: self._perturb(items, seed, scale), restore_and_update, finite_too=(loss0,))
        return loss0, loss_plus, loss_minus, grad, ok, sq

    def record(self, loss0: float, loss_plus: float, loss_minus: float, grad: float) -> None:
        """The step's metrics (``metrics``); the step counter moves on."""
        self._last = {"proj_grad": grad, "loss_0": loss0, "loss_plus": loss_plus, "loss_minus": loss_minus,
                      "curvature": (loss_plus + loss_minus - 2 * loss0) / self.eps**2}
        self.steps_done += 1

    def _perturb(self, items, seed: int, scale: float, sq: dict | None = None) -> None:
        """θ += scale·ε·u: u = D^{-1/2} z where the parameter has a D, else z. With ``sq``, also
        records Σ z² of every chunk ({(key, chunk start): value}; FOCUS's probe)."""
        alpha = scale * self.eps

        def fn(view, z, key, a, b):
            d = self._d(key)
            if d is not None:
                d = d.view(-1)[a:b]
                s = torch.rsqrt(d, out=scratch(view, d.dtype))
                view.addcmul_(z, s, value=alpha)
            else:
                view.add_(z, alpha=alpha)
            if sq is not None:
                sq[(key, a)] = float(z.double().square().sum())

        self.noise.visit(items, seed, fn)

    def _restore_and_update(self, items, seed: int, grad: float, curvature: float, block_scores: bool) -> dict:
        """θ ← a(θ − εu + εu) − η g u with a = 1 − ηλ, then the D update; returns Σ z² per parameter chunk.

        ``curvature`` is the signed ΔL = L₊ + L₋ − 2L₀. D > 0, so every EMA is multiplicative, D ← D·f:
        printed  f = (1 − α) + α|c| w̄           signed  f = |(1 − α) + α c w|       legacy  as signed, c → |c|
        with c = ΔL/2ε², w = z² − 1 (``hizoo``) or z² (``focus``), w̄ = |w|; then the clamp.
        """
        sq: dict[tuple[int, int], float] = {}
        eps = self.eps
        c = curvature / (2 * eps * eps)
        # the estimator's settings of each group, then each parameter's decay factor and step coefficient
        settings = {id(g): (g["hessian_smooth"], abs(c) if g["hessian_update"] == "legacy" else c, g["hessian_update"],
                            g["hessian_form"] == "hizoo", g["hessian_min"], g["hessian_max"]) for g in self.param_groups}
        coef = {}
        for key, p in items:  # lr may be scheduled: read from the group at every step
            g = self._group_of[key]
            a = decay_factor(g["lr"], g["weight_decay"], p)
            coef[key] = (a, a * eps - g["lr"] * grad, *settings[id(g)])

        def fn(view, z, key, start, stop):
            a, k, alpha, c, update, minus_one, lo, hi = coef[key]
            if a != 1.0:
                view.mul_(a)
            d = self._d(key)
            if d is None:
                view.add_(z, alpha=k)
                return
            d = d.view(-1)[start:stop]
            s = torch.rsqrt(d, out=scratch(view, d.dtype))
            view.addcmul_(z, s, value=k)
            if block_scores:
                sq[(key, start)] = float(torch.dot(z, z)) if z.dtype in (torch.float32, torch.float64) else float(z.float().square().sum())
            if alpha == 0.0:
                return
            # D is positive, so the EMA of D·(stuff) is a multiplicative update: D ← D · factor
            zz = torch.mul(z, z, out=s) if z.dtype == d.dtype else s.copy_(z).square_()
            if update == "printed":  # (1 − α) + α |c| |w|
                if minus_one:
                    zz.sub_(1.0).abs_()
                zz.mul_(alpha * abs(c)).add_(1.0 - alpha)
            elif minus_one:  # |(1 − α) + α c (z² − 1)|
                zz.mul_(alpha * c).add_(1.0 - alpha - alpha * c).abs_()
            else:  # |(1 − α) + α c z²|
                zz.mul_(alpha * c).add_(1.0 - alpha).abs_()
            d.mul_(zz)
            if lo > 0 or hi != float("inf"):
                d.clamp_(lo, hi)

        self.noise.visit(items, seed, fn)
        return sq

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype; D stays in its own dtype (state_dtype)
        saved = {}
        ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            st = state_dict.get("state", {}).get(i)
            if isinstance(st, dict) and "hessian" in st:
                saved[p] = st["hessian"]
        super().load_state_dict(state_dict)
        self._group_of = {self._keys[p]: g for g in self.param_groups for p in g["params"]}
        for p, d in saved.items():
            self.state[p]["hessian"] = d.detach().clone().to(p.device)

    def metrics(self) -> dict:
        out = dict(self._last)
        hs = [st["hessian"] for st in self.state.values() if isinstance(st, dict) and "hessian" in st]
        if hs:
            n = sum(h.numel() for h in hs)
            out["hessian_mean"] = sum(float(h.float().sum()) for h in hs) / n
        out["state_bytes"] = self.state_bytes()
        return out


class HiZOO(HessianZO):
    r"""ZO-SGD preconditioned by a diagonal Hessian estimate D = Σ⁻¹ (one tensor per parameter, init 1).

    With z ~ N(0, I) regenerated from the step seed, u = D^{-1/2} z = Σ^{1/2} z and three forward passes:

        g  = (L(θ + εu) − L(θ − εu)) / 2ε,            ΔL = L(θ + εu) + L(θ − εu) − 2 L(θ)   (signed)
        θ ← θ − η (g u + λθ)                           (λ on matrices only)
        Σ̂  = ΔL / 2ε² · D (z² − 1)                     (FOCUS Eq. 3, diagonal; ``hessian_form=hizoo``)
        D ← clamp((1 − α) D + α |Σ̂|, d_min, d_max)     (Eq. 3's EMA; ``hessian_update=printed``, default)

    ``hessian_update`` names the EMA:

    - ``printed``: Eq. 3 as printed, D ← (1 − α) D + α |Σ̂| = (1 − α) D + α |ΔL|/2ε² · D |z² − 1|. Positive
      by construction; biased upward (E|Σ̂_i| is dominated by the other coordinates' curvature).
    - ``signed``: D ← |(1 − α) D + α Σ̂| with the signed ΔL: the EMA of the unbiased estimate
      (E[Σ̂] = diag ∇²L, Ye 2023), the absolute value after (an option: not what Eq. 3 prints).
    - ``legacy``: D ← |(1 − α) D + α |ΔL|/2ε² · D (z² − 1)|, the earlier default of this project: |ΔL|
      inside a signed estimate, neither Eq. 3 nor unbiased (kept to reproduce old rows).

    ``hessian_form=focus`` uses FOCUS Alg. 1 line 17's Σ̂ = Δℓ/2ε² · Σ^{-1/2} z zᵀ Σ^{-1/2}, diagonal D z²
    (no − Σ⁻¹ term). The update uses the D that shaped the perturbation (so E[g u] = Σ ∇L); D is updated
    after θ in the same pass. The clamp keeps Σ positive and bounded (FOCUS App. B.1 clamps the Hessian's
    intermediate results; HiZOO's analysis assumes bounded entries); ``hessian_min/max: null`` disables it.

    Passes over the weights per step: +εu, −2εu, then one fused pass that restores, updates θ and
    updates D (θ ← (1 − ηλ)(θ + εu) − η g u), regenerating z three times, as MeZO does.
    D is kept in ``state_dtype`` (float32 by default, whatever the weights' dtype: in fp16 an EMA
    increment of α = 1e-9 is rounded away and D would never move); ``param`` keeps the parameter's
    dtype (the earlier behaviour). ``state_bytes`` counts D's real bytes.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-9, hessian_min: float | None = 1e-3, hessian_max: float | None = 1e3,
                 hessian_update: str = "printed", hessian_form: str = "hizoo", state_dtype: str = "float32",
                 seed: int = 0, noise_threads: int | None = None, chunk: int | None = None,
                 noise: str | None = None):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=hessian_smooth,
                         hessian_min=hessian_min, hessian_max=hessian_max, hessian_update=hessian_update,
                         hessian_form=hessian_form, state_dtype=state_dtype, seed=seed,
                         noise_threads=noise_threads, chunk=chunk, noise=noise)
        for _, p in self.keyed_params():
            self.add_hessian(p)

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("HiZOO.step needs a closure that returns the loss")
        loss0, loss_plus, loss_minus, grad, _, _ = self.hessian_step(closure, list(self.keyed_params()))
        self.record(loss0, loss_plus, loss_minus, grad)
        return torch.tensor(loss0)
