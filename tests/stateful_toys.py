"""A test-only first-order method with tensor state (for checkpoint round trips and gradient all-reduce).

Usable from a method config: ``_target_: stateful_toys.ToyAdam`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import torch

from zoexp.methods.base import Method


class ToyAdam(Method):
    """Adam through the zoexp method interface: the closure's loss is backpropagated here.

    Its state has what real methods' states have: per-parameter tensors (moments), a step counter, and
    extra non-tensor bookkeeping returned by ``state_dict()`` (a tuple, int-keyed dict, a float history).
    """

    forward_passes_per_step = 1

    @classmethod
    def model_param_groups(cls, model, **kwargs):
        """The transformer blocks and final norm; the (tied) embeddings are frozen, as a LoRA-like method
        would (keeps the test cheap: no 49k-row embedding gradient and moments)."""
        from zoexp.models import param_groups

        groups = param_groups(model)
        for group in groups:
            if group["role"] in ("embed", "head"):
                for p in group["params"]:
                    p.requires_grad_(False)
        return [g for g in groups if g["role"] not in ("embed", "head")]

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, seed: int = 0, **_ignored):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.history: list[float] = []
        self.visits = {0: "start"}

    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        with torch.no_grad():
            for group in self.param_groups:
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = float(state["step"])
                    state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
                    p.grad = None
        value = float(loss.detach())
        self.history.append(value)
        self.visits[len(self.history)] = f"step {len(self.history)}"
        return loss.detach()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["toy"] = {"history": list(self.history), "visits": dict(self.visits), "pair": (1, 2.5)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        toy = state_dict.pop("toy")
        super().load_state_dict(state_dict)
        assert toy["pair"] == (1, 2.5) and isinstance(toy["pair"], tuple)
        self.history, self.visits = list(toy["history"]), dict(toy["visits"])
