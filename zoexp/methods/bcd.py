"""Block coordinate descent with a first-order optimizer: BCD-SGD and BAdam (FOCUS Tables 1-2)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from zoexp.methods.base import tensor_bytes
from zoexp.methods.first_order import FirstOrder, enable_gradient_checkpointing

ORDERS = ("ascending", "descending", "random")
EXTRA_ROLES = ("embed", "norm", "head", "other")


class BlockCoordinate(FirstOrder):
    r"""First-order block coordinate descent (BCD-SGD; BAdam, Luo et al. 2024, Algorithm 1).

    The blocks are the transformer layers (param groups with role ``block``), plus the groups whose role
    is listed in ``extra_blocks`` (embed, norm, head); everything else stays frozen. Every ``interval``
    steps the next ``active_blocks`` blocks in ``order`` (ascending, descending, or a fresh random
    permutation per pass) become the active set; for t in the active period of block set π:

        θ_π ← OPT(θ_π, ∇_π L(θ)),   θ_{¬π} fixed

    Only the active blocks have ``requires_grad``, so autograd keeps neither gradients nor activation
    gradients for the others (nor activations below the lowest active block), and the optimizer state
    (momentum, Adam moments) exists only for them and is dropped on every switch (BAdam). With
    half-precision weights (run.dtype=bf16/fp16) the active blocks get an fp32 master copy: gradients
    are upcast into it, the optimizer updates it, and the result is rounded back into the weights.
    """

    fp32_masters = True  # half-precision blocks are updated through fp32 master copies

    def __init__(self, params, optimizer: str = "adamw", interval: int = 50, order: str = "ascending",
                 active_blocks: int = 1, extra_blocks=(), seed: int = 0, **fo_kwargs):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, not {interval}")
        self.interval, self.order, self.seed = int(interval), order, int(seed)
        self.extra_blocks = tuple(extra_blocks)
        super().__init__(params, optimizer=optimizer, **fo_kwargs)
        self.n_blocks = len(self.param_groups)
        if not 1 <= int(active_blocks) <= self.n_blocks:
            raise ValueError(f"active_blocks must be between 1 and the number of blocks ({self.n_blocks}), "
                             f"not {active_blocks}")
        self.k = int(active_blocks)
        self._queue: deque[int] = deque()
        self._passes = 0
        self._masters: dict = {}
        self.active: list[int] = []
        for group in self.param_groups:
            for p in group["params"]:
                p.requires_grad_(False)
        self.switch()

    @classmethod
    def model_param_groups(cls, model, extra_blocks=(), gradient_checkpointing: bool = False, **_):
        """The transformer layers (+ ``extra_blocks`` roles) as blocks; every other parameter is frozen."""
        from zoexp.models import param_groups

        unknown = set(extra_blocks) - set(EXTRA_ROLES)
        if unknown:
            raise ValueError(f"extra_blocks may name {', '.join(EXTRA_ROLES)}, not {sorted(unknown)}")
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        groups = [g for g in param_groups(model) if g["role"] == "block" or g["role"] in extra_blocks]
        owned = {id(p) for g in groups for p in g["params"]}
        for p in model.parameters():
            if id(p) not in owned:
                p.requires_grad_(False)
        return groups

    # ------------------------------------------------------------------ block selection

    def _pass_order(self, n_pass: int) -> list[int]:
        if self.order == "ascending":
            return list(range(self.n_blocks))
        if self.order == "descending":
            return list(range(self.n_blocks - 1, -1, -1))
        return np.random.default_rng([self.seed, n_pass]).permutation(self.n_blocks).tolist()

    def next_blocks(self) -> list[int]:
        """The next ``active_blocks`` distinct blocks of the (endless) sequence of passes."""
        chosen: list[int] = []
        deferred: list[int] = []
        while len(chosen) < self.k:
            if not self._queue:
                self._queue.extend(self._pass_order(self._passes))
                self._passes += 1
            i = self._queue.popleft()
            (deferred if i in chosen else chosen).append(i)
        self._queue.extendleft(reversed(deferred))
        return chosen

    def switch(self) -> None:
        """Freeze the active blocks, drop their state, and activate the next ones."""
        for i in self.active:
            for p in self.param_groups[i]["params"]:
                p.requires_grad_(False)
                p.grad = None
        self._masters = {}
        self.active = self.next_blocks()
        groups = [self.param_groups[i] for i in self.active]
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
                if p.dtype != torch.float32:
                    self._masters[p] = p.detach().float().clone()
        tensors = {p: self._masters.get(p, p) for g in groups for p in g["params"]}
        self._inner = self._build_inner(groups, tensors)  # the old optimizer and its state are dropped here
        self._last = {}

    def before_step(self) -> None:
        if self.steps_done and self.steps_done % self.interval == 0:
            self.switch()

    # ------------------------------------------------------------------ master copies

    def prepare_grads(self) -> None:
        for p, master in self._masters.items():
            if p.grad is not None:
                master.grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def after_update(self) -> None:
        for p, master in self._masters.items():
            p.copy_(master)

    # ------------------------------------------------------------------ accounting

    def state_bytes(self) -> int:
        """Optimizer state of the active blocks + their fp32 master copies + gradients held between steps."""
        return tensor_bytes([dict(self._inner.state), list(self._masters.values())]) + self.held_grad_bytes()

    def metrics(self) -> dict:
        return {**self._last, "active": ",".join(self.param_groups[i]["name"] for i in self.active)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "active": list(self.active), "queue": list(self._queue),
                "passes": self._passes, "masters": [self._masters[p] for g in self.active
                                                    for p in self.param_groups[g]["params"] if p in self._masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        for i in self.active:
            for p in self.param_groups[i]["params"]:
                p.requires_grad_(False)
        self._queue = deque(state_dict["queue"])
        self._passes = int(state_dict["passes"])
        # re-activate exactly the saved blocks, then restore their optimizer state and master copies
        self._queue.extendleft(reversed(state_dict["active"]))
        self.active = []
        self.switch()
        masters = iter(state_dict["masters"])
        for i in self.active:
            for p in self.param_groups[i]["params"]:
                if p in self._masters:
                    self._masters[p].copy_(next(masters))
        super().load_state_dict(state_dict)
