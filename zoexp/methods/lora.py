"""LoRA (Hu et al., 2021) through the ``peft`` library: first-order (FT-LoRA) and MeZO on the adapters.

Adapters are injected in place into the model the runner holds (``peft.inject_adapter_in_model``, no
``PeftModel`` wrapper), so scoring, evaluation and the block view work unchanged. Each adapted linear
layer computes W x + (α / r) B A x with W frozen, A (r × in) random, B (out × r) zero at the start;
the base weights are never modified (``merge_lora`` folds the adapters into them when wanted).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from zoexp.methods.first_order import FirstOrder, enable_gradient_checkpointing
from zoexp.methods.mezo import MeZO

DEFAULT_TARGETS = ("q_proj", "v_proj")


def _peft():
    # bitsandbytes (imported by peft when installed) logs a warning about an optional CPU kernel package
    # at import; it concerns 4-bit matmuls, which zoexp does not use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA methods need the peft package: pip install 'zoexp[fo]' (or pip install peft)") from exc
    return peft


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16, target_modules=DEFAULT_TARGETS,
                lora_dropout: float = 0.0) -> nn.Module:
    """Add LoRA adapters to ``model`` in place; afterwards only the adapters require grad."""
    peft = _peft()
    if int(r) < 1:
        raise ValueError(f"LoRA rank r must be >= 1, not {r}")
    config = peft.LoraConfig(r=int(r), lora_alpha=alpha, target_modules=list(target_modules),
                             lora_dropout=float(lora_dropout), bias="none")
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_param_groups(model: nn.Module, r: int = 8, alpha: float = 16, target_modules=DEFAULT_TARGETS,
                      lora_dropout: float = 0.0, gradient_checkpointing: bool = False) -> list[dict]:
    """Inject adapters and return them as param groups, one per transformer block."""
    from zoexp.models import param_groups

    inject_lora(model, r=r, alpha=alpha, target_modules=target_modules, lora_dropout=lora_dropout)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    groups = param_groups(model, trainable_only=True)
    if not groups:
        raise ValueError(f"LoRA: no adapter parameters (target_modules={list(target_modules)})")
    return groups


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (α/r) B A) and put the plain layer back."""
    for name, module in lora_modules(model):
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


class LoRA(FirstOrder):
    r"""FT-LoRA: first-order training of the LoRA adapters only (default AdamW, as in MeZO's FT-LoRA).

    Same update rules and options as ``FirstOrder`` on the parameters (A, B) of each adapter; the base
    model is frozen, so gradients and optimizer state exist only for the adapters.
    """

    def __init__(self, params, r: int = 8, alpha: float = 16, target_modules=DEFAULT_TARGETS,
                 lora_dropout: float = 0.0, optimizer: str = "adamw", lr: float = 1e-4, **fo_kwargs):
        super().__init__(params, optimizer=optimizer, lr=lr, **fo_kwargs)
        self.lora = dict(r=r, alpha=alpha, target_modules=list(target_modules), lora_dropout=lora_dropout)

    @classmethod
    def model_param_groups(cls, model, r=8, alpha=16, target_modules=DEFAULT_TARGETS, lora_dropout=0.0,
                           gradient_checkpointing=False, **_):
        return lora_param_groups(model, r, alpha, target_modules, lora_dropout, gradient_checkpointing)


class MeZOLoRA(MeZO):
    r"""MeZO on the LoRA adapters only (MeZO paper, Tables 1/18 "MeZO (LoRA)").

    g = (L(A,B + εz) − L(A,B − εz)) / 2ε,  (A,B) ← (A,B) − η g z, with the base weights frozen and never
    perturbed.
    """

    def __init__(self, params, r: int = 8, alpha: float = 16, target_modules=DEFAULT_TARGETS,
                 lora_dropout: float = 0.0, **mezo_kwargs):
        super().__init__(params, **mezo_kwargs)
        self.lora = dict(r=r, alpha=alpha, target_modules=list(target_modules), lora_dropout=lora_dropout)

    @classmethod
    def model_param_groups(cls, model, r=8, alpha=16, target_modules=DEFAULT_TARGETS, lora_dropout=0.0, **_):
        return lora_param_groups(model, r, alpha, target_modules, lora_dropout)
