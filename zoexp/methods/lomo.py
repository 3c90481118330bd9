"""LOMO and AdaLomo (Lv et al., 2023) through the published ``lomo-optim`` package (FOCUS Table 5)."""

from __future__ import annotations

import torch
from torch import nn

from zoexp.methods.base import Method, loss_value, tensor_bytes
from zoexp.methods.first_order import enable_gradient_checkpointing

VARIANTS = ("lomo", "adalomo")


def _lomo_classes():
    try:
        from lomo_optim import AdaLomo, Lomo
    except ImportError as exc:
        raise ImportError("method=lomo needs the lomo-optim package: pip install 'zoexp[fo]' "
                          "(or pip install lomo-optim)") from exc
    return Lomo, AdaLomo


class _Holder(nn.Module):
    """The trained parameters as one module: the package wants a model and updates every parameter it
    sees; this hands it exactly the method's param groups (the same tensors, not copies)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)


class LOMO(Method):
    r"""LOw-Memory Optimization: the SGD update is fused into backward, θ_i ← θ_i − η (g_i + λθ_i) as soon as
    g_i is known, and g_i is freed at once, so at most a few gradients exist at any time (LOMO,
    Section 3.2). ``variant=adalomo`` uses AdaLomo (Adafactor-style factored second moments, grouped
    update normalisation); the package allocates AdaLomo's state with ``.cuda()``, so it needs a GPU.

    One forward and one backward per step; with ``clip_grad_norm`` the package runs a first backward
    for the global norm and a second for the update (as in LOMO). Gradient accumulation is impossible by
    construction (gradients are consumed during backward).
    """

    forward_passes_per_step = 1
    train_mode = True

    def __init__(self, params, lr: float = 1e-3, variant: str = "lomo", weight_decay: float = 0.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 loss_scale: float = 2**10, gradient_checkpointing: bool = False):
        if variant not in VARIANTS:
            raise ValueError(f"method.variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        trained = [p for g in self.param_groups for p in g["params"]]
        if variant == "adalomo" and any(p.device.type != "cuda" for p in trained):
            raise ValueError("method.variant=adalomo needs a CUDA device: lomo-optim's AdaLomo allocates its "
                             "state with .cuda() (the weights are on "
                             f"{trained[0].device.type}); use variant=lomo on CPU")
        self.variant, self.clip_grad_norm = variant, clip_grad_norm
        self.steps_done = 0
        self.grad_bytes_max = 0
        self._holder = _Holder(trained)
        # Registered before the package's hooks, so it runs first: at that moment the gradients waiting
        # in .grad plus the one just computed are exactly what the package is about to consume.
        for p in trained:
            p.register_hook(self._observe)
        Lomo, AdaLomo = _lomo_classes()
        if variant == "lomo":
            self._lomo = Lomo(self._holder, lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                              weight_decay=weight_decay)
        else:
            self._lomo = AdaLomo(self._holder, lr=lr, loss_scale=loss_scale, clip_grad_norm=clip_grad_norm,
                                 clip_grad_value=clip_grad_value, weight_decay=weight_decay)
        package_func = self._lomo.grad_func

        def last(x):  # the package calls grad_func once more after backward for the last gradient
            self._observe(None)
            return package_func(x)

        self._lomo.grad_func = last

    @classmethod
    def model_param_groups(cls, model, gradient_checkpointing: bool = False, **_):
        from zoexp.models import param_groups

        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return param_groups(model)

    def _observe(self, incoming):
        held = tensor_bytes([p.grad for p in self._holder.parameters() if p.grad is not None])
        if isinstance(incoming, torch.Tensor):
            held += incoming.untyped_storage().nbytes()
        self.grad_bytes_max = max(self.grad_bytes_max, held)
        return None

    def step(self, closure):
        if closure is None:
            raise ValueError("LOMO.step needs a closure that returns the loss")
        with torch.enable_grad():
            loss = closure()
            if not loss.requires_grad:
                raise RuntimeError("LOMO: the closure's loss has no graph to differentiate")
            if torch.isfinite(loss.detach()).item():  # else: no backward, no update; the runner stops
                lr = self.param_groups[0]["lr"]
                self._lomo.weight_decay = self.param_groups[0]["weight_decay"]
                self._lomo.do_weight_decay = self._lomo.weight_decay > 0
                if self.clip_grad_norm:
                    self._lomo.grad_norm(loss)
                self._lomo.fused_backward(loss, lr)
        self.steps_done += 1
        return torch.tensor(loss_value(loss))

    def state_bytes(self) -> int:
        """AdaLomo's factored second moments (LOMO has none) + gradients held between steps (none)."""
        state = [getattr(self._lomo, k, {}) for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")]
        held = [p.grad for p in self._holder.parameters() if p.grad is not None]
        return tensor_bytes([state, held])
