"""Bit-level fingerprints of the ZO methods' trajectories, for refactoring a method without changing it.

    python tests/fingerprints.py > before.json     # on the old code
    python tests/fingerprints.py > after.json      # on the new code; then: diff before.json after.json

Each entry runs one method configuration for a few steps on the tiny OPT / LLaMA models (plain and
offloaded where the method supports it) and hashes, in order, every step's returned loss and metrics,
the final weights and the optimizer's ``state_dict`` tensors. Equal hashes on one machine mean the two
versions of the code compute the same bits. The hashes depend on the machine (SIMD width, BLAS), so they
are compared before/after on one machine, never stored in a test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zoexp.closure import Counters, make_closure  # noqa: E402
from zoexp.methods import FOCUS, HZO, HiZOO, LoHO, MeZO, build_method  # noqa: E402
from zoexp.models import load_model, param_groups  # noqa: E402
from zoexp.offload import enable_offload  # noqa: E402
from zoexp.scoring import Encoder  # noqa: E402
from zoexp.tasks import Example  # noqa: E402

CONFIGS = {
    "mezo": lambda g: MeZO(g, lr=1e-3, eps=1e-3, seed=3),
    "mezo-wd": lambda g: MeZO(g, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=3),
    "hizoo": lambda g: HiZOO(g, lr=1e-3, eps=1e-3, hessian_smooth=1e-2, seed=3),
    "hizoo-wd-signed": lambda g: HiZOO(g, lr=1e-3, eps=1e-3, weight_decay=0.1, hessian_smooth=1e-2,
                                       hessian_update="signed", seed=3),
    "hizoo-legacy-focusform": lambda g: HiZOO(g, lr=1e-3, eps=1e-3, hessian_smooth=1e-2, hessian_update="legacy",
                                              hessian_form="focus", hessian_max=None, seed=3),
    "focus": lambda g: FOCUS(g, lr=1e-3, eps=1e-3, hessian_smooth=1e-2, active_blocks=1, interval=2, seed=3),
    "focus-gsd-probe": lambda g: FOCUS(g, lr=1e-3, eps=1e-3, hessian_smooth=1e-2, active_blocks=1, interval=2,
                                       rule="gsd", seed=3),
    "focus-cyclic-wd-mezolr": lambda g: FOCUS(g, lr=1e-3, eps=1e-3, weight_decay=0.1, active_blocks=1, interval=3,
                                              rule="cyclic", mezo_lr=5e-4, hessian_form="hizoo", seed=3),
    "focus-interval-mean": lambda g: FOCUS(g, lr=1e-3, eps=1e-3, active_blocks=1, interval=2,
                                           bandit="interval-mean", seed=3),
    "hzo": lambda g: HZO(g, lr=1e-3, eps=1e-3, rank=2, interval=2, fo_layers=0, seed=3),
    "hzo-z+f-wd": lambda g: HZO(g, lr=1e-3, eps=1e-3, rank=2, interval=2, fo_layers=1, weight_decay=0.1,
                                fo_optimizer="sgd", fo_lr=1e-2, seed=3),
    "hzo-alpha-adam": lambda g: HZO(g, lr=1e-3, eps=1e-3, rank=1, interval=3, fo_layers=1, lr_convention="alpha",
                                    lowrank_embed=False, fo_lr=1e-3, seed=3),
    "loho": lambda g: LoHO(g, lr=1e-3, eps=1e-2, fo_layers=1, fo_lr=1e-3, seed=3),
    "loho-wd": lambda g: LoHO(g, lr=1e-3, eps=1e-2, weight_decay=0.1, fo_layers=1, fo_lr=1e-3, seed=3),
    "loho-intra-wd": lambda g: LoHO(g, lr=1e-3, eps=1e-2, weight_decay=0.1, fo_layers=1, fo_lr=1e-3,
                                    hybrid="intra", zo_ratio=0.5, seed=3),
    "hzo-dense-embed-wd": lambda g: HZO(g, lr=1e-3, eps=1e-3, rank=2, interval=2, fo_layers=0, weight_decay=0.1,
                                        lowrank_embed=False, seed=3),
}
OFFLOADABLE = ("mezo", "mezo-wd", "hzo", "hzo-z+f-wd", "hzo-dense-embed-wd")
#: every method config of conf/method with an optimizer, at its defaults (lr raised so that steps move)
CONF_METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml")
                      if OmegaConf.load(p).get("_target_"))
STEPS = 5


def batch(t: int, n: int = 6) -> list[Example]:
    return [Example(id=i, prompt=f"review {i} : the film was {'wonderful' if i % 2 else 'awful'} overall . It was",
                    candidates=[" terrible", " great"], label=i % 2) for i in range(t, t + n)]


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k])
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors(v)


def fingerprint(model_name: str, config: str, offload: bool) -> str:
    torch.manual_seed(0)
    model, tok = load_model(OmegaConf.load(REPO / "conf" / "model" / f"{model_name}.yaml"), "fp32", "cpu")
    model = copy.deepcopy(model)
    if config.startswith("conf:"):
        cfg = OmegaConf.load(REPO / "conf" / "method" / f"{config[5:]}.yaml")
        cfg.lr = 1e-3
        opt = build_method(cfg, model, seed=3)
    else:
        opt = CONFIGS[config](param_groups(model))
    if offload:
        enable_offload(model, opt, "cpu", ring=2)
    enc, h, counters = Encoder(tok, 128), hashlib.sha256(), Counters()
    for t in range(STEPS):
        loss = opt.step(make_closure(model, enc, batch(t), tok.pad_token_id, counters))
        h.update(repr(float(loss)).encode())
        metrics = {k: v for k, v in opt.metrics().items() if k not in ("state_bytes", "grad_bytes")}
        h.update(json.dumps(metrics, sort_keys=True, default=repr).encode())
    opt.flush()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    for x in tensors(opt.state_dict()):
        h.update(x.detach().contiguous().cpu().numpy().tobytes())
    h.update(json.dumps(opt.row_fields(), sort_keys=True, default=repr).encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    if len(sys.argv) > 1:  # python tests/fingerprints.py 1: one torch thread (the noise workers then run in order)
        torch.set_num_threads(int(sys.argv[1]))
    out = {}
    for model_name in ("tiny-opt", "tiny-llama"):
        for config in [*CONFIGS, *(f"conf:{m}" for m in CONF_METHODS)]:
            for offload in (False, True) if config in OFFLOADABLE else (False,):
                key = f"{model_name}/{config}{'/offload' if offload else ''}"
                out[key] = fingerprint(model_name, config, offload)
                print(key, out[key], file=sys.stderr)
    print(json.dumps(out, indent=1))
