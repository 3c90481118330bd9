"""LoHO: inter-layer ZO/FO hybrid with full-rank MeZO directions (the LoHO baseline of HZO's tables)."""

from __future__ import annotations

from zoexp.methods.hzo import HZO

#: what this class implements, recorded in every row's hparams (``conf/method/loho.yaml``)
IMPLEMENTS = "inter-layer only: MeZO z on ZO layers + FO (Adam) on the deepest layers every step"


class LoHO(HZO):
    r"""MeZO on the ZO layers and a first-order optimizer (Adam) on the FO layers, every step.

    Each step: the MeZO step on the ZO groups (z regenerated from the step seed),

        g = (L(θ + εz) − L(θ − εz)) / 2ε,      θ_Z ← θ_Z − η (g z + λ θ_Z),

    then one FO step θ_O ← Adam(∇_{θ_O} L) on the same batch with grad enabled for θ_O only
    (three forward passes and one backward through the FO layers). This is HZO (Section 3.4) without
    the low-rank estimator and with the FO step every step instead of every ν steps.

    LoHO (Chen et al., 2025) as its own paper defines it could not be found offline (searched: public
    pages and code); its paper is reported to also train part of each layer first-order (intra-layer).
    That part is not implemented: ``implements`` names exactly what is (it is part of the row's hparams).
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-2, weight_decay: float = 0.0,
                 fo_layers: int = 1, partition: str = "zf", fo_extra: list[str] | None = None,
                 fo_optimizer: str = "adam", fo_lr: float = 1e-4, fo_weight_decay: float = 0.0,
                 fo_kwargs: dict | None = None, implements: str = IMPLEMENTS, seed: int = 0,
                 noise_threads: int | None = None, chunk: int | None = None, noise: str | None = None):
        if implements != IMPLEMENTS:
            raise ValueError(f"LoHO implements only {IMPLEMENTS!r}")
        self.implements = implements
        super().__init__(params, lr=lr, eps=eps, rank=None, interval=1, weight_decay=weight_decay,
                         fo_layers=fo_layers, partition=partition, fo_extra=fo_extra,
                         fo_optimizer=fo_optimizer, fo_lr=fo_lr, fo_weight_decay=fo_weight_decay,
                         fo_every=1, fo_kwargs=fo_kwargs, seed=seed, noise_threads=noise_threads, chunk=chunk, noise=noise)
