"""Optimizers: one ``torch.optim.Optimizer`` per method, param groups = blocks.

Method configs (``conf/method/*.yaml``) name their class with ``_target_``; that is the registry.
"""

from zoexp.methods.base import Method, ZOMethod
from zoexp.methods.bcd import BlockCoordinate
from zoexp.methods.first_order import FirstOrder
from zoexp.methods.focus import FOCUS
from zoexp.methods.galore import GaLore
from zoexp.methods.hizoo import HiZOO
from zoexp.methods.hzo import HZO
from zoexp.methods.loho import LoHO
from zoexp.methods.lomo import LOMO
from zoexp.methods.lora import LoRA, MeZOLoRA
from zoexp.methods.mezo import MeZO

__all__ = ["Method", "ZOMethod", "MeZO", "HiZOO", "FOCUS", "HZO", "LoHO", "FirstOrder", "BlockCoordinate", "LoRA",
           "MeZOLoRA", "GaLore", "LOMO"]


META_KEYS = ("name", "demonstrations")
"""Keys of a method config that describe the run rather than the optimizer's constructor."""


def build_method(method_cfg, model, seed: int = 0):
    """The optimizer a method config describes, bound to ``model``'s param groups (None: no training).

    The class named by ``_target_`` may define ``model_param_groups(model, **kwargs)`` to choose (or
    create, e.g. LoRA adapters) the parameters it trains; by default every block of the model.
    """
    import inspect

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not method_cfg.get("_target_"):
        return None
    node = OmegaConf.to_container(method_cfg, resolve=True)
    for key in META_KEYS:
        node.pop(key, None)
    node["_partial_"] = True
    factory = instantiate(node)
    cls = factory.func
    hook = getattr(cls, "model_param_groups", None)
    if hook is not None:
        groups = hook(model, **factory.keywords)
    else:
        from zoexp.models import param_groups

        groups = param_groups(model)
    if "seed" in inspect.signature(cls).parameters and "seed" not in factory.keywords:
        return factory(groups, seed=seed)
    return factory(groups)


__all__ += ["build_method", "META_KEYS"]
