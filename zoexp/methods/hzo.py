"""HZO: low-rank ZO estimator with stable subspace sampling + ZO/FO inter-layer hybrid.

HZO paper (``papers/hzo-paper.txt``) Sections 3.3-3.4, Algorithm 1 and Appendix A.1.
"""

from __future__ import annotations

import torch

from zoexp.methods.base import ZOMethod, adam_eps, decay_factor, finite, loss_value, tensor_bytes
from zoexp.methods.noise import U_TAG, V_TAG, factor_seed, lowrank_factor

FO_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adafactor": torch.optim.Adafactor,
}

PARTITIONS = ("zf", "fz")
#: what ``lr`` means: the tables' α/r (default) or Eq. 5's α
LR_CONVENTIONS = ("alpha_over_r", "alpha")


def partition_groups(groups: list[dict], fo_layers: int, partition: str = "zf",
                     fo_extra: list[str] | None = None) -> list[bool]:
    """Which param groups are trained first-order (True) -- HZO Section 3.4.

    ``zf`` (Z+F, the paper's choice): the deepest ``fo_layers`` transformer blocks are FO, ZO below;
    ``fz`` (F+Z): the shallowest ``fo_layers`` blocks are FO. ``fo_extra`` adds whole roles
    (``norm``, ``head``, ``embed``) to the FO side; default: ``[norm]`` for Z+F (the final norm sits
    between the FO blocks and the head), nothing for F+Z.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, not {partition!r}")
    blocks = sorted({g["block"] for g in groups if g.get("role") == "block"})
    fo_layers = int(fo_layers)
    if fo_layers < 0 or fo_layers > len(blocks):
        raise ValueError(f"fo_layers={fo_layers} must be between 0 and the number of blocks ({len(blocks)})")
    if fo_layers == 0:
        return [False] * len(groups)
    fo_blocks = set(blocks[len(blocks) - fo_layers:] if partition == "zf" else blocks[:fo_layers])
    extra = set(fo_extra if fo_extra is not None else (["norm"] if partition == "zf" else []))
    bad = extra - {"norm", "head", "embed"}
    if bad:
        raise ValueError(f"fo_extra may hold norm, head, embed (got {sorted(bad)})")
    if "head" in extra and not any(g.get("role") == "head" for g in groups):
        raise ValueError("fo_extra=[head] but the head has no group of its own (tied to the input embedding); "
                         "an FO tied head would backpropagate through the embedding and every ZO block")
    return [(g.get("role") == "block" and g["block"] in fo_blocks) or g.get("role") in extra for g in groups]


class HZO(ZOMethod):
    r"""Low-rank ZO (LGE) with stable sampling, hybrid with first-order updates on the deepest blocks.

    For each ZO weight matrix X (m × n, rank r), U ∈ R^{m×r} is drawn every step and V ∈ R^{n×r} every
    ν steps (period k = ⌊t/ν⌋), both regenerated from seeds (``zoexp.methods.noise.lowrank_factor``):

        c = (L(X + εUVᵀ) − L(X − εUVᵀ)) / 2ε,      X ← X − α (c · UVᵀ / r + λ X)          (Eq. 9)

    so the updates of one period stay in the column space of V: their sum has rank ≤ r (App. A.1).
    Vectors (biases, norms) -- and embeddings with ``lowrank_embed=false`` -- use MeZO's z. The
    perturbation is applied in place with ``addmm_``; restore and update are one fused ``addmm_``.

    Hybrid (Section 3.4, Algorithm 1): the FO groups (``partition_groups``) are never perturbed; when
    t mod ``fo_every`` = 0 (default ν: when V is resampled, "resample-triggered FO"), after the ZO
    update one first-order step is taken on them with a torch optimizer on the same batch -- forward
    with grad enabled only for FO parameters, backward, step. With Z+F the ZO blocks and the embedding
    do not require grad during that forward, so autograd stores nothing until the first FO block.

    ``lr`` is the learning rate as the paper's tables print it. ``lr_convention=alpha_over_r`` (default):
    lr = α/r (HZO Table 8 says so; App. A.2 couples γ = α/r, the step of the equivalent ZO-SGD in the
    subspace of V), so a matrix gets X ← X − lr · c · UVᵀ, α = lr · r_ℓ. ``alpha``: lr = α of Eq. 5/
    Alg. 1 line 12, X ← X − lr · c · UVᵀ / r (the earlier convention). Vectors (MeZO's z) and weight decay
    use lr in both. ``fo_lr`` is the FO optimizer's rate (η of Alg. 1 line 16).
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int | None = 2, interval: int = 50,
                 weight_decay: float = 0.0, lowrank_embed: bool = True, fo_layers: int = 1,
                 partition: str = "zf", fo_extra: list[str] | None = None, fo_optimizer: str = "adam",
                 fo_lr: float = 1e-4, fo_weight_decay: float = 0.0, fo_every: int | None = None,
                 fo_kwargs: dict | None = None, lr_convention: str = "alpha_over_r", seed: int = 0,
                 noise_threads: int | None = None, chunk: int | None = None, noise: str | None = None):
        if lr_convention not in LR_CONVENTIONS:
            raise ValueError(f"lr_convention must be one of {LR_CONVENTIONS}, not {lr_convention!r}")
        if lr < 0 or eps <= 0 or weight_decay < 0 or fo_lr < 0:
            raise ValueError(f"HZO needs lr >= 0, eps > 0, weight_decay >= 0, fo_lr >= 0 (got {lr}, {eps}, {weight_decay}, {fo_lr})")
        if rank is not None and int(rank) < 1:
            raise ValueError(f"rank must be >= 1 or null (full-rank MeZO directions), not {rank}")
        if int(interval) < 1:
            raise ValueError(f"interval (nu) must be >= 1, not {interval}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         noise_threads=noise_threads, chunk=chunk, noise=noise)
        self.rank = None if rank is None else int(rank)
        self.lr_convention = lr_convention
        self.interval = int(interval)
        self.lowrank_embed = bool(lowrank_embed)
        self.fo_every = int(fo_every) if fo_every else self.interval
        fo_mask = partition_groups(self.param_groups, fo_layers, partition, fo_extra)
        self.partition = partition
        self._zo_ids = [gi for gi, fo in enumerate(fo_mask) if not fo]
        self._fo_ids = [gi for gi, fo in enumerate(fo_mask) if fo]
        if not self._zo_ids:
            raise ValueError("every group is first-order; HZO needs at least one ZO group")
        self.fo_optimizer = None
        if self._fo_ids:
            for gi in self._fo_ids:  # FO groups carry the FO rate, so lr schedulers scale it too
                self.param_groups[gi].update(lr=fo_lr, weight_decay=fo_weight_decay, fo=True)
            self._build_fo_optimizer(
                [{"params": self.param_groups[gi]["params"], "lr": fo_lr, "weight_decay": fo_weight_decay}
                 for gi in self._fo_ids], fo_optimizer, fo_kwargs)
        self.fo_steps = 0
        self._split_cache: dict[int, tuple[list, list]] = {}

    def _build_fo_optimizer(self, groups: list[dict], fo_optimizer: str, fo_kwargs: dict | None) -> None:
        """``self.fo_optimizer``: the torch optimizer ``fo_optimizer`` over ``groups`` (Adam on fp16 weights
        gets a representable eps: ``zoexp.methods.base.adam_eps``)."""
        if fo_optimizer not in FO_OPTIMIZERS:
            raise ValueError(f"fo_optimizer must be one of {sorted(FO_OPTIMIZERS)}, not {fo_optimizer!r}")
        fo_kwargs = dict(fo_kwargs or {})
        if fo_optimizer in ("adam", "adamw"):  # 1e-8, or 1e-4 for fp16 weights
            fo_kwargs["eps"] = adam_eps(fo_kwargs.get("eps"), [p for g in groups for p in g["params"]])
        self.fo_kwargs = fo_kwargs
        self.fo_optimizer = FO_OPTIMIZERS[fo_optimizer](groups, **fo_kwargs)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def forward_passes_per_step(self) -> float:
        """Two ZO forwards every step plus one FO forward (and its backward) every ``fo_every`` steps."""
        return 2 + (1 / self.fo_every if self.fo_optimizer is not None else 0)

    def zo_group_ids(self) -> list[int]:
        return list(self._zo_ids)

    def fo_params(self) -> list[torch.nn.Parameter]:
        return [p for gi in self._fo_ids for p in self.param_groups[gi]["params"]]

    def u_seed(self, t: int) -> int:
        return factor_seed(self.seed, U_TAG, t)

    def v_seed(self, t: int) -> int:
        return factor_seed(self.seed, V_TAG, t // self.interval)

    def is_lowrank(self, group: dict, p: torch.Tensor) -> bool:
        if self.rank is None or p.ndim < 2:
            return False
        return self.lowrank_embed or group.get("role") != "embed"

    def _split(self, gi: int) -> tuple[list, list]:
        """(low-rank (key, p) pairs, dense (key, p) pairs) of group ``gi``."""
        if gi not in self._split_cache:
            group = self.param_groups[gi]
            pairs = list(self.keyed_params([group]))
            self._split_cache[gi] = ([(k, p) for k, p in pairs if self.is_lowrank(group, p)],
                                     [(k, p) for k, p in pairs if not self.is_lowrank(group, p)])
        return self._split_cache[gi]

    def factors(self, key: int, p: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(U_t, V_k, r) of parameter ``key`` (viewed as m × n) at step t."""
        m = p.shape[0]
        n = p.numel() // m
        r = min(self.rank, m, n)
        chunk = self.noise.chunk
        u = lowrank_factor(m, r, key, self.u_seed(t), p.dtype, p.device, chunk, self.noise.backend)
        v = lowrank_factor(n, r, key, self.v_seed(t), p.dtype, p.device, chunk, self.noise.backend)
        return u, v, r

    def draws_per_step(self) -> int:
        """Random numbers one step draws for its ZO groups: r(m+n) per matrix, numel per dense tensor."""
        total = 0
        for gi in self._zo_ids:
            lowrank, dense = self._split(gi)
            for _, p in lowrank:
                m = p.shape[0]
                n = p.numel() // m
                total += min(self.rank, m, n) * (m + n)
            total += sum(p.numel() for _, p in dense)
        return total

    # ------------------------------------------------------------------ per-group operations

    def perturb_group_(self, group: dict, t: int, scale: float) -> None:
        """X += scale·ε·U_t V_kᵀ for matrices, θ += scale·ε·z_t for dense tensors."""
        gi = self._group_index(group)
        lowrank, dense = self._split(gi)
        eps = group["eps"]
        for key, p in lowrank:
            u, v, _ = self.factors(key, p, t)
            p.view(p.shape[0], -1).addmm_(u, v.T, alpha=scale * eps)
        if dense:
            self.noise.add_(dense, self.step_seed(t), scale * eps)

    def update_group_(self, group: dict, t: int, grad: float, lr: float, weight_decay: float) -> None:
        """X ← (1 − αλ) X − α c U Vᵀ / r from unperturbed weights (offloaded, deferred update)."""
        self._restore_and_update(group, t, 0.0, grad, lr, weight_decay)

    def _restore_and_update(self, group: dict, t: int, eps: float, grad: float, lr: float, wd: float) -> None:
        """From X − εUVᵀ (eps > 0) or X (eps = 0): X ← (1 − lr λ)X − α(c/r)UVᵀ in one addmm_ per matrix
        (α/r = lr with ``lr_convention=alpha_over_r``, lr/r with ``alpha``)."""
        gi = self._group_index(group)
        lowrank, dense = self._split(gi)
        per_r = self.lr_convention == "alpha"
        for key, p in lowrank:
            u, v, r = self.factors(key, p, t)
            a = decay_factor(lr, wd, p)
            step = lr * grad / r if per_r else lr * grad
            p.view(p.shape[0], -1).addmm_(u, v.T, beta=a, alpha=a * eps - step)
        entries = []
        for k, p in dense:
            a = decay_factor(lr, wd, p)
            entries.append((k, p, a, a * eps - lr * grad))
        self.add_scaled_z_(entries, self.step_seed(t))

    def _group_index(self, group: dict) -> int:
        for gi, g in enumerate(self.param_groups):
            if g is group:
                return gi
        raise KeyError("group not in this optimizer")

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("HZO.step needs a closure that returns the loss")
        t = self.steps_done
        zo_groups = [self.param_groups[gi] for gi in self._zo_ids]

        def perturb(scale):
            for group in zo_groups:
                self.perturb_group_(group, t, scale)

        def restore_and_update(grad, *_):
            for group in zo_groups:
                self._restore_and_update(group, t, group["eps"], grad, group["lr"], group["weight_decay"])

        loss_plus, loss_minus, grad, ok = self.spsa_step(closure, perturb, restore_and_update)
        fo_loss = None
        if ok and self.fo_optimizer is not None and t % self.fo_every == 0:
            fo_loss = self._fo_step(closure)
        self._last = {"proj_grad": grad, "loss_plus": loss_plus, "loss_minus": loss_minus,
                      "resampled": int(t % self.interval == 0), "fo_step": int(fo_loss is not None),
                      "fo_steps": self.fo_steps}
        if fo_loss is not None:
            self._last["fo_loss"] = fo_loss
        self.steps_done += 1
        return torch.tensor((loss_plus + loss_minus) / 2)

    def _sync_fo_lr(self) -> None:
        """The FO optimizer's rates follow the FO groups' ``lr``, so lr schedules apply to them too."""
        for fo_group, gi in zip(self.fo_optimizer.param_groups, self._fo_ids):
            fo_group["lr"] = self.param_groups[gi]["lr"]

    def _fo_step(self, closure) -> float:
        """One first-order step on the FO groups: grad enabled for FO parameters only, during this step."""
        if self.offloader is not None:
            # the FO forward must see step t's deferred ZO update: device groups now, offloaded
            # layers by the offloader's hooks when each becomes resident during this forward
            self.apply_pending([gi for gi in self._zo_ids if self.offloader.group_layer.get(gi) is None])
        self._sync_fo_lr()
        fo = {id(p) for p in self.fo_params()}
        flags = [(p, p.requires_grad) for g in self.param_groups for p in g["params"]]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in fo)
            # run.accumulation_steps = k: the FO gradient of the whole batch from k micro-batches
            parts = int(getattr(closure, "accumulation_steps", 1) or 1)
            value = 0.0
            with torch.enable_grad():
                for part in range(parts):
                    loss = closure() if parts == 1 else closure(part, parts)
                    loss.backward()
                    value += loss_value(loss)
            if finite(value):
                self.fo_optimizer.step()
        finally:
            self.fo_optimizer.zero_grad(set_to_none=True)
            for p, flag in flags:
                p.requires_grad_(flag)
            if self.offloader is not None:
                self.offloader.synchronize()
        self.fo_steps += 1
        return value

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> int:
        """FO optimizer state (e.g. Adam moments of the FO blocks); ZO factors are regenerated, not kept."""
        own = tensor_bytes(dict(self.state))
        return own + (tensor_bytes(dict(self.fo_optimizer.state)) if self.fo_optimizer is not None else 0)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"]["fo_steps"] = self.fo_steps
        if self.fo_optimizer is not None:
            sd["fo"] = self.fo_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        fo = state_dict.pop("fo", None)
        super().load_state_dict(state_dict)
        self.fo_steps = int(state_dict.get("zo", {}).get("fo_steps", 0))
        if fo is not None and self.fo_optimizer is not None:
            self.fo_optimizer.load_state_dict(fo)
