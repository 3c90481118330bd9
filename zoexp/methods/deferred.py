"""The method side of an offloaded ZO step: the perturbation signs of one dual forward.

``zoexp.offload`` streams the model's layers through a device ring and, during a dual forward, asks
for each part of the model to be moved to a sign of the step's perturbation while it is resident;
``DualPerturbation`` does that with the method's per-group operations (``ZOMethod.perturb_group_``)
and applies the deferred update of the previous step on a group's first visit
(``ZOMethod.apply_pending``). The ring itself imports no method.
"""

from __future__ import annotations

from collections.abc import Iterable


class DualPerturbation:
    """The sign (+1, −1, 0) of each ZO param group during one dual forward, driven part by part.

    ``set(groups, s)`` moves each group from its current sign to ``s`` with one in-place perturbation
    of (s − current)·ε·d_t. The first time a group is touched in the step, its deferred update from
    the previous step is applied first (the group is resident then).
    """

    def __init__(self, method, t: int):
        self.method, self.t = method, t
        self.offloader = method.offloader  # the ring the dual forward runs through
        self.zo = set(method.zo_group_ids())
        self.sign = dict.fromkeys(self.zo, 0)
        self.touched: set[int] = set()

    def set(self, group_ids: Iterable[int], sign: int) -> None:
        for gi in sorted(group_ids):
            if gi not in self.zo:
                continue
            if gi not in self.touched:
                self.method.apply_pending([gi])
                self.touched.add(gi)
            delta = sign - self.sign[gi]
            if delta:
                self.method.perturb_group_(self.method.param_groups[gi], self.t, float(delta))
                self.sign[gi] = sign

    def close(self) -> None:
        """Every ZO group must have been visited and restored (else the forward missed parameters)."""
        missed = sorted(self.zo - self.touched)
        if missed:
            names = [self.method.param_groups[gi].get("name", gi) for gi in missed]
            raise RuntimeError(f"the dual forward never visited param groups {names}")
        if any(self.sign.values()):
            raise RuntimeError("the dual forward left groups perturbed")
