"""GaLore-AdamW (Zhao et al., 2024) through the published ``galore-torch`` package (FOCUS Table 5)."""

from __future__ import annotations

import logging

import torch

from zoexp.methods.base import tensor_bytes
from zoexp.methods.first_order import FirstOrder


def _galore_adamw():
    # galore_torch imports bitsandbytes (for its 8-bit variant), which logs a warning about an optional
    # CPU kernel package at import; zoexp uses the 32-bit GaLoreAdamW only.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as exc:
        raise ImportError("method=galore needs the galore-torch package: pip install 'zoexp[fo]' "
                          "(or pip install galore-torch)") from exc
    return GaLoreAdamW


class GaLore(FirstOrder):
    r"""Full-parameter training with gradients projected to rank r (GaLore, Algorithm 2).

    For each weight matrix W of a transformer layer with gradient G (m × n), every ``update_proj_gap``
    steps P = the top-r singular vectors of G (the smaller side); in between
    R = Pᵀ G (or G P),  Adam moments on R (r × n instead of m × n),  W ← W − η · scale · P N(R),
    with N the Adam-normalised update. Embeddings, norms, biases and the head get plain AdamW.
    The update is the package's ``GaLoreAdamW``; this class only builds its param groups.
    """

    def __init__(self, params, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", lr: float = 1e-5, **fo_kwargs):
        self.galore = dict(rank=int(rank), update_proj_gap=int(update_proj_gap), scale=float(scale),
                           proj_type=proj_type)
        fo_kwargs.setdefault("eps", 1e-6)  # GaLoreAdamW's (transformers-style AdamW) default
        super().__init__(params, optimizer="adamw", lr=lr, **fo_kwargs)

    def _subgroup(self, group: dict, p: torch.Tensor) -> tuple:
        key = super()._subgroup(group, p)
        if group.get("role") == "block" and p.ndim == 2:
            key += tuple(self.galore.items())
        return key

    def _make_optimizer(self, inner_groups):
        h = self.hparams
        cls = _galore_adamw()
        return cls(inner_groups, lr=self.defaults["lr"], betas=h["betas"], eps=h["eps"], weight_decay=0.0,
                   no_deprecation_warning=True)

    def state_bytes(self) -> int:
        """Adam moments (of the projected gradients) + the projection matrices (the whole storage they
        view: the package keeps a slice of the SVD factor) + gradients held between steps."""
        state = []
        for st in self._inner.state.values():
            st = dict(st)
            projector = st.pop("projector", None)
            state.append(st)
            if projector is not None:
                state.append(projector.ortho_matrix)
        return tensor_bytes(state) + self.held_grad_bytes()
