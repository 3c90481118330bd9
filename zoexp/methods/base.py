"""What every zoexp method shares.

A method is a ``torch.optim.Optimizer`` whose param groups are blocks (see ``zoexp.models.param_groups``:
each group has ``role`` in {embed, block, norm, head, other}, ``name`` and ``block``). ``step(closure)``
receives a closure that runs one forward pass on the current batch and returns the scalar loss, without
backward. Every method states how many forward passes a step costs and exactly how many bytes of state
it holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.optim import Optimizer

from zoexp.methods.noise import NoiseSource, mix


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in nested dicts/lists/tuples (each storage counted once).

    A storage is known by its StorageImpl (``_cdata``, as torch's own ``StorageWeakRef``), not its data
    pointer: fake tensors (zoexp.memory's prediction) have no data, and every one's pointer is 0."""
    seen: set[int] = set()

    def walk(o) -> int:
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            if storage._cdata in seen:
                return 0
            seen.add(storage._cdata)
            return storage.nbytes()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, list | tuple):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj)


def adam_eps(eps: float | None, params: Iterable[torch.Tensor]) -> float:
    """Adam's eps: as given; unset (None), 1e-8, or 1e-4 when a parameter is fp16: 1e-8 is 0 in fp16 and
    a zero second moment then divides by zero (NaN at the first step); 1e-4 is the smallest round eps
    above fp16's normal range."""
    if eps is not None:
        return float(eps)
    return 1e-4 if any(p.dtype == torch.float16 for p in params) else 1e-8


def decays(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices only, never to biases or norm scales (as in MeZO)."""
    return p.ndim >= 2


def decay_factor(lr: float, weight_decay: float, p: torch.Tensor) -> float:
    """The factor a = 1 − ηλ that decoupled weight decay multiplies ``p`` by in one step; 1.0 for a
    bias or norm scale (``decays``) or without decay. Every ZO update writes θ ← a θ − η g d."""
    return 1.0 - lr * weight_decay if weight_decay and decays(p) else 1.0


class Method(Optimizer):
    """Base class: bookkeeping every method shares (state bytes, forward-pass count, step counter)."""

    #: forward passes one ``step`` costs (the physical floor of a ZO step)
    forward_passes_per_step: int = 1
    #: whether the runner should put the model in train mode (dropout) during steps
    train_mode: bool = False
    #: most gradient bytes held at once during a step so far (0 for forward-only methods); first-order
    #: methods update it, since their gradients exist only inside ``step``
    grad_bytes_max: int = 0

    def state_bytes(self) -> int:
        """Exact bytes of the tensors this method holds between steps."""
        return tensor_bytes(dict(self.state))

    def metrics(self) -> dict:
        """Per-step scalars the runner may log (projected gradient, active blocks, ...)."""
        return {}

    def row_fields(self) -> dict:
        """End-of-run fields for the result row (e.g. FOCUS's per-block activation and score statistics)."""
        return {}

    def flush(self) -> None:
        """Apply any deferred update so that the model holds the current weights.

        Offloaded ZO steps defer step t's update until each block is next resident (``zoexp.offload``);
        the runner calls this before every evaluation and at the end of training. No-op by default.
        """


class ZOMethod(Method):
    """Shared machinery of zeroth-order methods: step seeds and regenerable Gaussian directions.

    The seed of step t is ``mix(seed, t)``; z of parameter ``key`` is regenerated from it (see
    ``zoexp.methods.noise``). Keys are the parameters' positions across all param groups, fixed at
    construction, so a subset of parameters sees the same z as it would inside the full set.
    """

    def __init__(self, params, defaults: dict, seed: int = 0, noise_threads: int | None = None,
                 chunk: int | None = None, noise: str | None = None):
        super().__init__(params, defaults)
        if "eps" in defaults and len({g["eps"] for g in self.param_groups}) > 1:
            raise ValueError("a ZO step has one perturbation size: every param group needs the same eps "
                             f"(got {sorted({g['eps'] for g in self.param_groups})})")
        self.seed = int(seed)
        self.steps_done = 0
        # noise: the z backend (auto | philox | torch; None = $ZOEXP_NOISE or auto), see zoexp.methods.noise
        self.noise = NoiseSource(threads=noise_threads, backend=noise, **({"chunk": chunk} if chunk else {}))
        self._keys = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._keys.setdefault(p, len(self._keys))
        self._last: dict = {}
        # offloading (zoexp.offload): the block offloader, and step t's update per group index,
        # deferred until the group is next resident: {group index: (t, grad, lr, weight_decay)}
        self.offloader = None
        self._pending: dict[int, tuple[int, float, float, float]] = {}

    def key(self, p: torch.Tensor) -> int:
        return self._keys[p]

    def step_seed(self, t: int | None = None) -> int:
        return mix(self.seed, self.steps_done if t is None else t)

    def keyed_params(self, groups: Iterable[dict] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(key, parameter) pairs of these groups (all by default); the key seeds the parameter's z."""
        for group in self.param_groups if groups is None else groups:
            for p in group["params"]:
                yield self._keys[p], p

    @property
    def eps(self) -> float:
        """ε of the two-point estimate (the same in every perturbed group, checked at construction)."""
        return self.param_groups[self.zo_group_ids()[0]]["eps"]

    def metrics(self) -> dict:
        return dict(self._last)

    # ----------------------------------------------------------------- per-group operations
    # A ZO method that supports offloading implements these two; the offloaded step (below) and
    # ``zoexp.offload`` call them one block at a time while the block is resident.

    def zo_group_ids(self) -> list[int]:
        """Indices of the param groups this method perturbs (all by default; hybrids exclude FO groups)."""
        return list(range(len(self.param_groups)))

    def perturb_group_(self, group: dict, t: int, scale: float) -> None:
        """θ_g += scale · ε · d_t (d_t: step t's direction restricted to the group)."""
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def update_group_(self, group: dict, t: int, grad: float, lr: float, weight_decay: float) -> None:
        """θ_g ← θ_g − lr (grad · d_t + λ θ_g), from unperturbed weights."""
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def add_scaled_z_(self, entries, seed: int) -> None:
        """θ ← a θ + α z for each (key, p, a, α) in ``entries``: the fused form of every ZO update and
        restore (a = ``decay_factor``). Entries sharing (a, α) go to the noise source in one call, so the
        noise workers share the chunks of the whole set instead of meeting after every group."""
        buckets: dict[tuple[float, float], list] = {}
        for key, p, a, alpha in entries:
            buckets.setdefault((a, alpha), []).append((key, p))
        for (a, alpha), pairs in buckets.items():
            if a == 1.0:
                self.noise.add_(pairs, seed, alpha)
            else:
                self.noise.scale_add_(pairs, seed, a, alpha)

    # ----------------------------------------------------------------- the two-point step

    def spsa_step(self, closure, perturb, restore_and_update, finite_too: tuple[float, ...] = ()
                  ) -> tuple[float, float, float, bool]:
        """One two-point SPSA estimate, (loss+, loss−, projected grad g, finite):

            θ += ε d;  L₊ = L(θ);  θ −= 2ε d;  L₋ = L(θ);  g = (L₊ − L₋) / 2ε

        then ``restore_and_update(g, L₊, L₋)`` takes θ − εd to the updated θ in one pass; when a loss
        (or a value in ``finite_too``) is not finite, θ is only restored (the runner stops the run).
        ``perturb(s)`` moves θ by s·ε·d. With an offloader attached the step is one dual forward
        instead (``offloaded_zo_step``), and the update is deferred.
        """
        if self.offloader is not None:
            return self.offloaded_zo_step(closure)
        perturb(1.0)
        loss_plus = loss_value(closure())
        perturb(-2.0)
        loss_minus = loss_value(closure())
        grad = (loss_plus - loss_minus) / (2 * self.eps)
        ok = finite(loss_plus, loss_minus, *finite_too)
        if ok:
            restore_and_update(grad, loss_plus, loss_minus)
        else:
            perturb(1.0)
        return loss_plus, loss_minus, grad, ok

    # ----------------------------------------------------------------- offloading

    def supports_offload(self) -> bool:
        """Whether this method implements the per-group operations an offloaded step needs."""
        return type(self).perturb_group_ is not ZOMethod.perturb_group_

    def attach_offloader(self, offloader) -> None:
        """Run steps through ``offloader``'s dual forward (``zoexp.offload.enable_offload`` calls this)."""
        self.offloader = offloader
        offloader.on_resident = self.apply_pending

    @torch.no_grad()
    def apply_pending(self, group_ids) -> bool:
        """Apply the deferred update of these groups (they must be resident); True if any was applied."""
        applied = False
        for gi in group_ids:
            record = self._pending.pop(gi, None)
            if record is not None:
                self.update_group_(self.param_groups[gi], *record)
                applied = True
        return applied

    @torch.no_grad()
    def flush(self) -> None:
        if not self._pending:
            return
        if self.offloader is None:
            self.apply_pending(list(self._pending))
        else:
            self.offloader.visit_groups(list(self._pending), self.apply_pending)

    def offloaded_zo_step(self, closure) -> tuple[float, float, float, bool]:
        """Step t's (loss+, loss−, projected grad, finite) from one dual forward through the offloader.

        Each block, while resident, first receives step t−1's deferred update, then is perturbed +ε
        for the + stream, −ε for the − stream and restored (``zoexp.scoring.dual_lm_loss``); step t's
        update is deferred in turn (ZO2's lazy update), so every block crosses the bus once per step.
        """
        from zoexp.methods.deferred import DualPerturbation

        dual = getattr(closure, "dual", None)
        if dual is None:
            raise TypeError("an offloaded ZO step needs the runner's loss closure (with a .dual method)")
        t = self.steps_done
        perturbation = DualPerturbation(self, t)
        loss_plus, loss_minus = (loss_value(v) for v in dual(perturbation))
        perturbation.close()
        grad = (loss_plus - loss_minus) / (2 * self.eps)
        ok = finite(loss_plus, loss_minus)
        if ok:
            self._pending = {gi: (t, grad, self.param_groups[gi]["lr"], self.param_groups[gi]["weight_decay"])
                             for gi in self.zo_group_ids()}
        return loss_plus, loss_minus, grad, ok

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = {"seed": self.seed, "steps_done": self.steps_done,
                    "pending": {int(k): list(v) for k, v in self._pending.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint from before a hyperparameter moved into the groups
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        if zo is not None:
            self.seed, self.steps_done = int(zo["seed"]), int(zo["steps_done"])
            self._pending = {int(k): (int(v[0]), *map(float, v[1:])) for k, v in zo.get("pending", {}).items()}


def loss_value(loss) -> float:
    value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    return value


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
