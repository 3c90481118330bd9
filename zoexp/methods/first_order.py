"""First-order (FO) baselines: full fine-tuning with SGD or AdamW through backward.

The papers compare their forward-only methods with these (FOCUS Tables 1, 2, 4; HZO Tables 2, 6, 7):
the point is memory. A FO step holds, besides the weights, one gradient per trained parameter, the
optimizer's state (SGD momentum: one copy, Adam: two) and the activations kept for backward.

Closure protocol (shared with ZO methods): ``closure()`` runs one forward pass on the whole batch and
returns the loss; a FO method enables grad and calls backward itself. For gradient accumulation over
``accumulation_steps = k`` micro-batches it calls ``closure(part, k)`` for part = 0..k-1: the runner's
closure then runs only that slice of the batch and weights its loss by the slice's share of the batch's
answer tokens, so the k losses -- and gradients -- add up to the whole batch's (one batch per step,
k times less activation memory).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

from zoexp.methods.base import Method, adam_eps, decays, loss_value, tensor_bytes

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_settings(amp: str | None, device: torch.device, param_dtype: torch.dtype) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for ``method.amp`` on ``device``.

    Autocast keeps fp32 master weights and runs matmuls in bf16/fp16. fp16 needs loss scaling (a
    ``GradScaler``) and is only supported on CUDA; bf16 autocast also works on CPU.
    """
    if amp in (None, "none", "fp32", False):
        return None, False
    if amp not in AMP_DTYPES:
        raise ValueError(f"method.amp must be none, bf16 or fp16, not {amp!r}")
    if param_dtype != torch.float32:
        raise ValueError(f"method.amp={amp} autocasts fp32 weights, but the weights are {param_dtype} "
                         f"(run.dtype): use run.dtype=fp32 with method.amp, or method.amp=none")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"method.amp=fp16 (autocast + gradient scaler) needs a CUDA device, the weights are on "
                         f"{device.type}; use method.amp=bf16 or none")
    return AMP_DTYPES[amp], amp == "fp16"


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer layer's activations during backward instead of keeping them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing "
                         "(method.gradient_checkpointing=true)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Transformers also makes the embeddings' output require grad (needed by reentrant checkpointing
    # only); with frozen lower layers (LoRA, block coordinate descent) that would back-propagate
    # through every layer below the trained ones. Non-reentrant checkpointing does not need it.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def is_checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def grad_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the gradients currently held in ``.grad`` of ``params`` (each storage once)."""
    return tensor_bytes([p.grad for p in params if p.grad is not None])


class FirstOrder(Method):
    r"""Full fine-tuning with a torch optimizer, one backward per step (or per micro-batch).

    ``optimizer=sgd``:   v ← μ v + (g + λθ),  θ ← θ − η v              (``torch.optim.SGD``; μ = 0: plain SGD)
    ``optimizer=adamw``: m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
                         θ ← θ − η (m̂ / (√v̂ + ε) + λθ)               (Loshchilov & Hutter, 2019)

    λ applies to matrices only, never to biases or norm scales (as for the ZO methods). Gradients are
    freed after every step (``set_to_none``), so between steps the method holds only the optimizer
    state; ``grad_bytes_max`` records the gradient bytes held at the end of backward.
    Options: ``accumulation_steps`` (see the module docstring), ``max_grad_norm`` (global clipping),
    ``amp`` (bf16/fp16 autocast, fp16 with a gradient scaler; see ``amp_settings``),
    ``gradient_checkpointing`` (enabled on the model when the method's param groups are built).
    """

    forward_passes_per_step = 1
    train_mode = True
    OPTIMIZERS = ("sgd", "adamw")
    fp32_masters = False  # the inner optimizer updates the parameters themselves

    def __init__(self, params, optimizer: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0,
                 momentum: float = 0.0, betas=(0.9, 0.999), eps: float | None = None, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, amp: str | None = None, gradient_checkpointing: bool = False,
                 foreach: bool | None = None):
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}: optimizer must be one of {', '.join(self.OPTIMIZERS)}, "
                             f"not {optimizer!r}")
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"{type(self).__name__} needs lr, weight_decay, momentum >= 0")
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be >= 1, not {accumulation_steps}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, not {max_grad_norm}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.optimizer_name = optimizer
        # the weights Adam updates: the parameters, or fp32 master copies of them (BlockCoordinate)
        eps = adam_eps(eps, () if self.fp32_masters else (p for g in self.param_groups for p in g["params"]))
        self.hparams = dict(momentum=float(momentum), betas=tuple(float(b) for b in betas), eps=eps,
                            foreach=foreach)
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = max_grad_norm
        self.gradient_checkpointing = bool(gradient_checkpointing)
        first = next(p for g in self.param_groups for p in g["params"])
        self.device = first.device
        self.amp_dtype, needs_scaler = amp_settings(amp, first.device, first.dtype)
        self.scaler = torch.amp.GradScaler(first.device.type) if needs_scaler else None
        self.steps_done = 0
        self.grad_bytes_max = 0
        self._last: dict = {}
        self._inner = self._build_inner(self.param_groups)

    # ------------------------------------------------------------------ param groups and the inner optimizer

    @classmethod
    def model_param_groups(cls, model, gradient_checkpointing: bool = False, **_):
        """Every block of the model (full fine-tuning)."""
        from zoexp.models import param_groups

        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return param_groups(model)

    def _subgroup(self, group: dict, p: torch.Tensor) -> tuple:
        """Settings that split one block's params into inner-optimizer groups (here: weight decay or not)."""
        return (("decay", bool(group["weight_decay"]) and decays(p)),)

    def _inner_groups(self, groups: list[dict], tensors=None) -> list[dict]:
        """One inner group per (outer group, subgroup settings); ``tensors`` maps a param to the tensor the
        inner optimizer updates (itself, or an fp32 master copy)."""
        inner = []
        for index, group in enumerate(groups):
            split: dict[tuple, list] = {}
            for p in group["params"]:
                split.setdefault(self._subgroup(group, p), []).append(p if tensors is None else tensors[p])
            for key, ps in split.items():
                inner.append({"params": ps, "outer": index, **dict(key)})
        return inner

    def _make_optimizer(self, inner_groups: list[dict]) -> torch.optim.Optimizer:
        h = self.hparams
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(inner_groups, lr=self.defaults["lr"], momentum=h["momentum"],
                                   foreach=h["foreach"])
        return torch.optim.AdamW(inner_groups, lr=self.defaults["lr"], betas=h["betas"], eps=h["eps"],
                                 weight_decay=0.0, foreach=h["foreach"])

    def _build_inner(self, groups: list[dict], tensors=None) -> torch.optim.Optimizer:
        self._outer_of_inner = groups
        opt = self._make_optimizer(self._inner_groups(groups, tensors))
        self._sync_hparams(opt)
        return opt

    def _sync_hparams(self, opt: torch.optim.Optimizer) -> None:
        """lr and weight decay live in the outer groups (schedulers and overrides act there)."""
        for inner in opt.param_groups:
            outer = self._outer_of_inner[inner["outer"]]
            inner["lr"] = outer["lr"]
            inner["weight_decay"] = outer["weight_decay"] if inner.get("decay") else 0.0

    # ------------------------------------------------------------------ the step

    def trained_params(self) -> list[torch.Tensor]:
        """Parameters that get gradients in the current step."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, closure) -> torch.Tensor:
        """Loss of the whole batch with gradients accumulated into ``.grad`` (one or more micro-batches)."""
        k = self.accumulation_steps
        total = None
        with torch.enable_grad():
            for part in range(k):
                with self._autocast():
                    loss = closure() if k == 1 else closure(part, k)
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise RuntimeError(f"{type(self).__name__}: the closure's loss has no graph to differentiate "
                                       "(was it computed under torch.no_grad, or with every parameter frozen?)")
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
        return total

    def step(self, closure):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        self.before_step()
        loss = self.forward_backward(closure)
        self.grad_bytes_max = max(self.grad_bytes_max, self.held_grad_bytes())
        if math.isfinite(loss_value(loss)):  # else: no update; the runner stops the run
            self.update()
        self.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss

    def before_step(self) -> None:
        """Hook for subclasses (block switching)."""

    def held_grad_bytes(self) -> int:
        return grad_bytes(p for g in self.param_groups for p in g["params"])

    def update(self) -> None:
        """Clip, then one step of the inner optimizer on the accumulated gradients."""
        opt = self._inner
        self._sync_hparams(opt)
        self.prepare_grads()
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        self._last = {}
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                  self.max_grad_norm)
            self._last["grad_norm"] = float(norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
            self._last["loss_scale"] = float(self.scaler.get_scale())
        else:
            opt.step()
        self.after_update()
        opt.zero_grad(set_to_none=True)

    def prepare_grads(self) -> None:
        """Hook: move gradients to the tensors the inner optimizer updates (master copies)."""

    def after_update(self) -> None:
        """Hook: copy master copies back into the weights."""

    # ------------------------------------------------------------------ accounting

    def state_bytes(self) -> int:
        """Optimizer state (momentum / Adam moments, step counters) plus any gradient held between steps."""
        return tensor_bytes(dict(self._inner.state)) + self.held_grad_bytes()

    def metrics(self) -> dict:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"inner": self._inner.state_dict(), "steps_done": self.steps_done,
                "lr": [g["lr"] for g in self.param_groups],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._inner.load_state_dict(state_dict["inner"])
        self.steps_done = int(state_dict["steps_done"])
        for group, lr in zip(self.param_groups, state_dict["lr"]):
            group["lr"] = lr
        if self.scaler is not None and state_dict.get("scaler"):
            self.scaler.load_state_dict(state_dict["scaler"])
