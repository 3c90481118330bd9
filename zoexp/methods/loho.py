"""LoHO: the ZO/FO hybrid with full-rank MeZO directions (the LoHO baseline of HZO's tables).

LoHO is Chen, Huang & Wen, "Towards Efficient Low-Order Hybrid Optimizer for Language Model Fine-Tuning"
(AAAI 2025; code github.com/Chan-1996/LoHO). Its abstract names two modes, both here (``hybrid``):

- inter-layer: "the FO optimizer in deep layers and the ZO optimizer in shallow ones";
- intra-layer: "updates a proportion of parameters in a layer by the ZO optimizer, and the rest by the
  FO optimizer".
"""

from __future__ import annotations

import torch

from zoexp.methods.base import decay_factor, tensor_bytes
from zoexp.methods.hzo import HZO, partition_groups
from zoexp.methods.noise import mix

HYBRIDS = ("inter", "intra")
MASK_TAG = 0x4D  # ord("M"): the seed stream of the intra-layer masks


class LoHO(HZO):
    r"""MeZO on the ZO parameters and a first-order optimizer (Adam) on the FO parameters, every step.

    Each step: the MeZO step on the ZO parameters (z regenerated from the step seed),

        g = (L(θ + εz) − L(θ − εz)) / 2ε,      θ_Z ← θ_Z − η (g z + λ θ_Z),

    then one FO step θ_F ← Adam(∇_{θ_F} L) on the same batch, with grad enabled only for θ_F (three
    forward passes and one backward through the FO blocks). ``hybrid`` says which parameters are F:

    - ``inter`` (default): the deepest ``fo_layers`` blocks (and ``fo_extra``, default the final norm)
      whole. This is HZO (Section 3.4) without the low-rank estimator and with the FO step every step.
    - ``intra``: in each of the deepest ``fo_layers`` blocks, every weight matrix is split entry-wise by a
      fixed random mask M (drawn once from the seed): a fraction ``zo_ratio`` of its entries (M = 1) is
      ZO, the rest FO. ZO perturbs and updates with z ⊙ M; the FO gradient is taken on (1 − M) only
      (masked before the optimizer step, so Adam's moments stay zero on the ZO entries). The blocks'
      vectors (norms, biases) and everything outside them are ZO; ``fo_extra`` is refused.

    The HZO paper does not say which mode (nor how many FO layers) its LoHO rows ran; ``inter`` is the
    default: it is the split HZO's own hybrid shares, and what the earlier LoHO rows ran. LoHO's released code keeps its FO entries as
    a sparse delta with sparse kernels (spops), so its Adam state is (1 − zo_ratio) of the matrices';
    here the FO matrices are dense tensors with dense Adam state, which costs more memory, not other
    numbers. In that code, the ZO mask lookup misses (the masked modules are renamed), so its ZO part also
    perturbs the FO entries; here the two sets are disjoint, as the paper's text says.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-2, weight_decay: float = 0.0,
                 fo_layers: int = 1, partition: str = "zf", fo_extra: list[str] | None = None,
                 fo_optimizer: str = "adam", fo_lr: float = 1e-4, fo_weight_decay: float = 0.0,
                 fo_kwargs: dict | None = None, hybrid: str = "inter", zo_ratio: float = 0.5, seed: int = 0,
                 noise_threads: int | None = None, chunk: int | None = None, noise: str | None = None):
        if hybrid not in HYBRIDS:
            raise ValueError(f"LoHO hybrid must be one of {HYBRIDS}, not {hybrid!r}")
        if not 0.0 <= zo_ratio <= 1.0:
            raise ValueError(f"LoHO zo_ratio (the ZO share of each FO-block matrix) must be in [0, 1], not {zo_ratio}")
        self.hybrid = hybrid
        self.zo_ratio = float(zo_ratio)
        inter = hybrid == "inter"
        super().__init__(params, lr=lr, eps=eps, rank=None, interval=1, weight_decay=weight_decay,
                         fo_layers=fo_layers if inter else 0, partition=partition, fo_extra=fo_extra,
                         fo_optimizer=fo_optimizer, fo_lr=fo_lr, fo_weight_decay=fo_weight_decay,
                         fo_every=1, fo_kwargs=fo_kwargs, seed=seed, noise_threads=noise_threads, chunk=chunk,
                         noise=noise)
        self._masks: dict[int, torch.Tensor] = {}  # key -> bool ZO mask (intra): True = ZO entry
        self._mask_fo: list[tuple[torch.Tensor, torch.Tensor]] = []  # (FO matrix, its ZO mask)
        self._masked_cache: dict[int, tuple[list, list]] = {}
        if not inter:
            self._build_intra(fo_layers, partition, fo_extra, fo_optimizer, fo_lr, fo_weight_decay, fo_kwargs)

    # ------------------------------------------------------------------ intra-layer set-up

    def _build_intra(self, fo_layers, partition, fo_extra, fo_optimizer, fo_lr, fo_weight_decay, fo_kwargs) -> None:
        if fo_extra:
            raise ValueError("LoHO fo_extra (whole roles trained FO) is for hybrid=inter; with hybrid=intra only "
                             "the FO blocks' matrices are split")
        if fo_weight_decay:
            raise ValueError("LoHO hybrid=intra needs fo_weight_decay=0: the FO optimizer's decay would also move "
                             "the ZO entries of the shared matrices")
        fo_blocks = partition_groups(self.param_groups, fo_layers, partition, fo_extra=[])
        self._intra_ids = [gi for gi, fo in enumerate(fo_blocks) if fo]
        for gi in self._intra_ids:
            for key, p in self.keyed_params([self.param_groups[gi]]):
                if p.ndim >= 2:
                    g = torch.Generator().manual_seed(mix(self.seed, MASK_TAG, key) & ((1 << 63) - 1))
                    mask = (torch.rand(p.shape, generator=g) < self.zo_ratio).to(p.device)
                    self._masks[key] = mask
                    self._mask_fo.append((p, mask))
        if not self._mask_fo:
            return  # fo_layers = 0: MeZO on everything
        self._build_fo_optimizer([{"params": [p for p, _ in self._mask_fo], "lr": fo_lr, "weight_decay": 0.0}],
                                 fo_optimizer, fo_kwargs)
        self._fo_lr = float(fo_lr)
        self.fo_optimizer.register_step_pre_hook(self._mask_fo_grads)

    def _mask_fo_grads(self, *_) -> None:
        """The FO gradient on the FO entries only: zero on the ZO entries (M = 1)."""
        for p, mask in self._mask_fo:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)

    def fo_params(self) -> list[torch.nn.Parameter]:
        if self.hybrid == "inter":
            return super().fo_params()
        return [p for p, _ in self._mask_fo]

    def _sync_fo_lr(self) -> None:
        """Intra: the FO rate follows the FO blocks' lr schedule (their ``lr`` is the ZO rate)."""
        if self.hybrid == "inter":
            return super()._sync_fo_lr()
        group = self.param_groups[self._intra_ids[0]]
        scale = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        for fo_group in self.fo_optimizer.param_groups:
            fo_group["lr"] = self._fo_lr * scale

    def supports_offload(self) -> bool:
        return self.hybrid == "inter" and super().supports_offload()

    # ------------------------------------------------------------------ masked ZO operations

    def _masked(self, gi: int) -> tuple[list, list]:
        """(masked (key, p) pairs, the other (key, p) pairs) of group ``gi`` (the masks are fixed: cached)."""
        if gi not in self._masked_cache:
            _, dense = self._split(gi)
            self._masked_cache[gi] = ([(k, p) for k, p in dense if k in self._masks],
                                      [(k, p) for k, p in dense if k not in self._masks])
        return self._masked_cache[gi]

    def perturb_group_(self, group: dict, t: int, scale: float) -> None:
        """θ += scale·ε·z, with z ⊙ M on the FO blocks' matrices (intra)."""
        if not self._masks:
            return super().perturb_group_(group, t, scale)
        masked, rest = self._masked(self._group_index(group))
        alpha = scale * group["eps"]
        if rest:
            self.noise.add_(rest, self.step_seed(t), alpha)
        if masked:
            self.noise.visit(masked, self.step_seed(t),
                             lambda view, z, key, a, b: view.add_(z * self._masks[key].view(-1)[a:b], alpha=alpha))

    def _restore_and_update(self, group: dict, t: int, eps: float, grad: float, lr: float, wd: float) -> None:
        """From θ − εz (eps > 0) or θ: θ ← aθ − lr g z on the ZO entries (a = 1 − lr λ); FO entries kept."""
        if not self._masks:
            return super()._restore_and_update(group, t, eps, grad, lr, wd)
        masked, rest = self._masked(self._group_index(group))
        decay = {k: decay_factor(lr, wd, p) for k, p in masked + rest}
        self.add_scaled_z_([(k, p, decay[k], decay[k] * eps - lr * grad) for k, p in rest], self.step_seed(t))
        if masked:
            def update(view, z, key, a, b):
                m = self._masks[key].view(-1)[a:b]
                if decay[key] != 1.0:
                    view.copy_(torch.where(m, view * decay[key], view))
                view.add_(z * m, alpha=decay[key] * eps - lr * grad)

            self.noise.visit(masked, self.step_seed(t), update)

    # ------------------------------------------------------------------ bookkeeping

    def state_bytes(self) -> int:
        """The FO optimizer's state plus the intra-layer masks (one byte per FO-block matrix entry)."""
        return super().state_bytes() + tensor_bytes(list(self._masks.values()))
