"""Paper-scale memory on any machine: the peak of one training step, predicted on fake tensors.

``predict(overrides)`` composes the zoexp config, builds the model from its architecture (no weights,
no download: ``architecture`` in ``conf/model/*.yaml``) on ``FakeTensorMode`` tensors, which carry
shape, dtype and device but no storage, and runs the project's own training step on a synthetic batch
of ``run.batch_size`` x ``run.max_length`` tokens: the method's ``step(closure)`` with the runner's
loss closure, its noise generation (the torch path: the C Philox kernel cannot run on fake tensors),
the offloading ring and dual forward (``run.offload``), the first-order parts. A dispatch-mode tracker
(the approach of ``torch.distributed._tools.mem_tracker.MemTracker``, re-implemented here so that
the categories fit methods whose forward passes run inside ``step``) follows every storage the step
allocates and frees, and reports the peak of the live bytes, split into categories:

    parameters        model parameters and buffers on the device (offloaded runs: resident parts + ring)
    gradients         ``.grad`` of parameters
    optimizer_state   tensors the optimizer holds between steps (``optimizer.state``, sub-optimizers,
                      Hessian estimates, low-rank factors, ...)
    activations       tensors allocated inside a module's forward (kept for backward, or transient)
    temporaries       everything else: noise chunks, update arithmetic, loss, backward temporaries

``host`` (offloaded layers' buckets) is reported separately and is not part of the device peak.

On a GPU target every allocation is rounded up to the caching allocator's 512-byte block; the CUDA
context, the allocator's cached-but-free segments and fragmentation are not predicted (docs/memory.md).
The same tracker on real tensors (``fake=False``) measures the same step on CPU: tests prove the two
agree exactly. Command line: ``python -m zoexp.memory model=opt-175b method=hzo run.offload=true``
(``zoexp-memory`` once installed); ``zoexp -m ... run.dry_run=memory`` writes rows (status
``predicted``) for ``zoexp-report``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from zoexp.models import ModelLoadError

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
HOST = "host"
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
PREFIX = "memory/"
TINY_VOCAB = 49152  # vocabulary of the SmolLM2 tokenizer that the tiny random-init models use

# --------------------------------------------------------------------------- architectures


def architecture(model_cfg) -> tuple[str, dict]:
    """(model_type, config kwargs) of a model config: ``architecture`` (published configs of hub
    models, conf/model/*.yaml) or ``config`` (random-init models)."""
    from omegaconf import OmegaConf

    node = model_cfg.get("architecture") or model_cfg.get("config")
    arch = model_cfg.get("arch") or (node.get("model_type") if node is not None else None)
    if node is None or not arch:
        raise ValueError(f"model {model_cfg.get('name')!r} has no architecture data (model.arch + "
                         "model.architecture in conf/model/*.yaml): cannot be built without weights")
    kwargs = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    kwargs.pop("model_type", None)
    return str(arch), kwargs


def build_model(model_cfg, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The model of ``model_cfg`` from its architecture, randomly initialised (fake under FakeTensorMode)."""
    from transformers import AutoConfig

    from zoexp.models import _auto_class

    arch, kwargs = architecture(model_cfg)
    kwargs.setdefault("vocab_size", TINY_VOCAB)  # random-init models borrow the SmolLM2 tokenizer
    config = AutoConfig.for_model(arch, **kwargs)
    model = _auto_class(model_cfg).from_config(config, attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
                                               dtype=dtype)
    if any(p.dtype != dtype or p.device != torch.device(device) for p in model.parameters()):
        model.to(device=device, dtype=dtype)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 1
    return model


# --------------------------------------------------------------------------- the tracker


class _Info:
    __slots__ = ("nbytes", "tag")

    def __init__(self, nbytes: int, tag: str):
        self.nbytes, self.tag = nbytes, tag


class Tracker(TorchDispatchMode):
    """Live bytes per category of every storage an op creates (weak references to the storages).

    Tags at creation: ``activations`` inside a module's forward, ``temporaries`` otherwise; ``retag``
    files known tensors (parameters, gradients, optimizer state, host buckets) under their category.
    The peak of the device total is recorded with the list of storages live at that moment, whose
    categories are read once the step is over (state created during the step counts as state).
    """

    def __init__(self, round_to: int = 1, scalar: float = 1.0):
        super().__init__()
        self.round_to = max(1, int(round_to))
        self._infos: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._live: dict[int, _Info] = {}
        self.totals = dict.fromkeys((*CATEGORIES, HOST), 0)
        self.device_total = 0
        self.peak = 0
        self._peak_live: list[_Info] = []
        self._module_depth = 0
        self._hooks: list = []
        self._scalars = 0
        self.scalar = scalar

    # ------------------------------------------------------------------ bookkeeping

    def _bytes(self, st) -> int:
        n = int(st.nbytes())
        return math.ceil(n / self.round_to) * self.round_to if n else 0

    def _add(self, st, tag: str) -> _Info:
        info = self._infos.get(st)
        if info is not None:
            if info.tag != tag:
                self._move(info, tag)
            return info
        info = _Info(self._bytes(st), tag)
        self._infos[st] = info
        key = id(info)
        self._live[key] = info
        weakref.finalize(st, self._free, key)
        self.totals[tag] += info.nbytes
        if tag != HOST:
            self.device_total += info.nbytes
            self._maybe_peak()
        return info

    def _move(self, info: _Info, tag: str) -> None:
        self.totals[info.tag] -= info.nbytes
        if info.tag == HOST:
            self.device_total += info.nbytes
        if tag == HOST:
            self.device_total -= info.nbytes
        self.totals[tag] += info.nbytes
        info.tag = tag
        self._maybe_peak()

    def _free(self, key: int) -> None:
        info = self._live.pop(key, None)
        if info is None:
            return
        self.totals[info.tag] -= info.nbytes
        if info.tag != HOST:
            self.device_total -= info.nbytes

    def _maybe_peak(self) -> None:
        if self.device_total > self.peak:
            self.peak = self.device_total
            self._peak_live = list(self._live.values())

    def retag(self, tensors, tag: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), tag)

    def current(self) -> dict:
        return {k: v for k, v in self.totals.items()}

    def peak_breakdown(self) -> dict:
        out = dict.fromkeys(CATEGORIES, 0)
        for info in self._peak_live:
            if info.tag != HOST:
                out[info.tag] += info.nbytes
        return out

    def reset_peak(self) -> None:
        self.peak = self.device_total
        self._peak_live = list(self._live.values())

    # ------------------------------------------------------------------ hooks

    def __enter__(self):
        from torch.nn.modules import module as mod

        def pre(module, args):
            self._module_depth += 1

        def post(module, args, out):
            self._module_depth -= 1

        # always_call: a forward cut short by an exception (the offload prologue capture) still counts out
        self._hooks = [mod.register_module_forward_pre_hook(pre),
                       mod.register_module_forward_hook(post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            # .item() of a fake tensor has no value: losses get distinct finite numbers, flags are true
            t = args[0]
            if t.dtype == torch.bool:
                return True
            if t.is_floating_point():
                self._scalars += 1
                return self.scalar + 1e-3 * (self._scalars % 7)
            return 1
        out = func(*args, **kwargs)
        tag = "activations" if self._module_depth > 0 else "temporaries"
        for t in _tensors(out):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if st not in self._infos:
                self._add(st, tag)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, list | tuple):
        for o in out:
            if isinstance(o, torch.Tensor):
                yield o


def optimizer_tensors(optimizer, _seen=None) -> list[torch.Tensor]:
    """Tensors an optimizer holds between steps: its state, and the state and tensor attributes of
    the objects it owns (a hybrid's first-order optimizer, Hessian estimates, low-rank factors)."""
    seen = _seen if _seen is not None else {}  # id -> object: the objects stay alive, so ids stay unique
    out: list[torch.Tensor] = []
    params = {id(p) for g in getattr(optimizer, "param_groups", []) for p in g["params"]}

    def walk(o, depth=0):
        if id(o) in seen or depth > 8:
            return
        seen[id(o)] = o
        if isinstance(o, torch.Tensor):
            if id(o) not in params and not isinstance(o, torch.nn.Parameter):
                out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, list | tuple | set):
            for v in o:
                walk(v, depth + 1)
        elif isinstance(o, torch.optim.Optimizer):
            walk(dict(o.state), depth + 1)
            walk({k: v for k, v in vars(o).items() if k not in ("param_groups", "state", "offloader")}, depth + 1)

    walk(optimizer)
    return out


# --------------------------------------------------------------------------- a synthetic batch


class SyntheticEncoder:
    """Stands in for ``zoexp.scoring.Encoder``: every example is ``length`` tokens (``SHORT``: one
    fewer), the last ``answer_tokens`` of which are the target (no tokenizer)."""

    def __init__(self, length: int, answer_tokens: int = 1, token: int = 5):
        self.max_length, self.answer_tokens, self.token = int(length), int(answer_tokens), int(token)
        self.truncated = 0

    def encode(self, prompt, continuation, passage=None, reserve=0):
        n = self.max_length - (1 if prompt == SHORT else 0)
        return [self.token] * n, self.answer_tokens

    def continuation_request(self, prompt, continuation, passage=None):
        from zoexp.scoring import Request

        ids, n = self.encode(prompt, continuation)
        start = len(ids) - n
        return Request(ids, [(t - 1, [ids[t]]) for t in range(start, len(ids))])


def synthetic_batch(n: int):
    from zoexp.tasks import Example

    # the last example is one token shorter: a real batch is padded, so the attention mask exists
    # (with fake tensors every data-dependent "is there padding?" check answers yes)
    return [Example(id=i, prompt=SHORT if i == n - 1 and n > 1 else "x", candidates=[" a", " b"], label=0)
            for i in range(n)]


SHORT = "<short>"


# --------------------------------------------------------------------------- predict


@contextlib.contextmanager
def _prediction_env(fake: bool):
    """Torch noise path; offloading without CUDA streams or pinned memory (no driver needed); fresh
    per-thread scratch caches; block-selection control logic on real tensors (``_real_control``)."""
    import zoexp.offload as offload

    old_env = os.environ.get("ZOEXP_NOISE")
    os.environ["ZOEXP_NOISE"] = "torch"
    old_cls = offload.BlockOffloader

    class _Offloader(old_cls):
        def __init__(self, model, device, ring=3, keep=(), pin=None):
            super().__init__(model, device, ring=ring, keep=keep, pin=False)

    offload.BlockOffloader = _Offloader
    caches = _thread_caches()
    saved = [(local, dict(vars(local))) for local in caches]
    for local in caches:  # module-level per-thread scratch buffers (HiZOO): allocated inside this step
        vars(local).clear()
    patched = _real_control() if fake else []
    from zoexp.methods import noise

    slices, visit = noise.chunk_slices, noise.NoiseSource.visit
    if fake:
        noise.chunk_slices = _sampled_slices(slices)
        noise.NoiseSource.visit = _sampled_visit(visit)
    swap = torch.utils.swap_tensors
    if fake:
        torch.utils.swap_tensors = _swap_or_set_data
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap
        noise.chunk_slices = slices
        noise.NoiseSource.visit = visit
        for cls, name, fn in patched:
            setattr(cls, name, fn)
        for local, state in saved:
            vars(local).clear()
            vars(local).update(state)
        offload.BlockOffloader = old_cls
        if old_env is None:
            os.environ.pop("ZOEXP_NOISE", None)
        else:
            os.environ["ZOEXP_NOISE"] = old_env


def _sampled_slices(chunk_slices):
    """The first and the last chunk of a tensor instead of all of them (fake tensors only).

    z is regenerated chunk by chunk; every chunk allocates and frees the same transient tensors (its
    z in a reused scratch buffer, HiZOO's per-chunk factors), so the peak is reached by the first full
    chunk and the last (partial) one. OPT-175B has 167k chunks per pass: visiting two per parameter
    keeps the prediction at seconds. Tests check the sampled prediction against the full real step.
    """
    def sampled(numel: int, *args, **kwargs):
        out = chunk_slices(numel, *args, **kwargs)
        return out if len(out) <= 2 else [out[0], out[-1]]

    return sampled


def _sampled_visit(visit):
    """One parameter per (chunk lengths, dtype, device) in a ``NoiseSource.visit`` call (fake tensors
    only): z is applied in place, so parameters of the same shape repeat the same transient
    allocations, and 96 identical layers need not be walked to find the peak of one."""
    def sampled(self, items, seed, fn):
        from zoexp.methods import noise

        kept, seen = [], set()
        for key, p in items:
            sig = (tuple(b - a for a, b in noise.chunk_slices(p.numel(), self.chunk)), p.dtype, p.device)
            if sig not in seen:
                seen.add(sig)
                kept.append((key, p))
        return visit(self, kept, seed, fn)

    return sampled


_SWAP = torch.utils.swap_tensors


def _swap_or_set_data(t1, t2):
    """``Module.to`` swaps fake parameters (``torch.utils.swap_tensors``), which refuses a tensor that
    something holds a weak reference to (a fake parameter often is); then move the data instead."""
    try:
        _SWAP(t1, t2)
    except RuntimeError as exc:
        if "weakref" not in str(exc):
            raise
        t1.data = t2.detach()


def _thread_caches() -> list:
    """``threading.local`` objects at module level in zoexp.methods (scratch buffers reused across steps)."""
    import sys
    import threading

    out = []
    for name, module in list(sys.modules.items()):
        if name.startswith("zoexp.methods") and module is not None:
            out.extend(v for v in vars(module).values() if isinstance(v, threading.local))
    return out


def _real_control() -> list:
    """Run FOCUS's block selection (``zoexp.methods.selection``: a few probabilities, a random draw)
    on real tensors while the step runs on fake ones: which blocks are active decides the memory, and a
    fake tensor has no value to decide with. Returns what was patched, to undo."""
    import inspect

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        from zoexp.methods import selection
    except ImportError:
        return []

    def real(fn):
        def wrapper(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        wrapper.__wrapped__ = fn
        return wrapper

    patched = []
    for cls in vars(selection).values():
        if inspect.isclass(cls) and cls.__module__ == selection.__name__:
            for name, fn in list(vars(cls).items()):
                if inspect.isfunction(fn):
                    patched.append((cls, name, fn))
                    setattr(cls, name, real(fn))
    return patched


def seq_length(cfg) -> int:
    """Tokens per example: ``run.max_length`` (the runner pads a batch to its longest example, at most
    this), else ``DEFAULT_SEQ_LEN`` -- the model's context would overstate short-prompt tasks."""
    value = cfg.run.get("max_length")
    return int(value) if value else DEFAULT_SEQ_LEN


DEFAULT_SEQ_LEN = 128


def target_is_gpu(cfg) -> bool:
    name = str(cfg.run.get("device", "auto"))
    if name == "auto":
        return torch.cuda.is_available()
    return name.startswith("cuda")


@contextlib.contextmanager
def _rng_preserved():
    """The caller's random state is left as it was (a pre-run check must not change the run)."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def measure_step(cfg, fake: bool = True, steps: int = 2, gpu: bool | None = None) -> dict:
    """See ``_measure_step``; the random state of the caller is preserved."""
    with _rng_preserved():
        return _measure_step(cfg, fake=fake, steps=steps, gpu=gpu)


def _measure_step(cfg, fake: bool = True, steps: int = 2, gpu: bool | None = None) -> dict:
    """Run ``steps`` training steps of the configured method on a synthetic batch and track memory.

    ``fake``: fake tensors (no storage, any size); else real CPU tensors (validation). ``gpu``: round
    allocations as the CUDA caching allocator does (default: when ``run.device`` targets a GPU).
    """
    from omegaconf import OmegaConf
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoexp.closure import Counters, LossClosure, seed_everything
    from zoexp.methods import build_method
    from zoexp.models import resolve_dtype

    gpu = target_is_gpu(cfg) if gpu is None else gpu
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key in ("noise", "noise_threads"):  # serial torch noise: one scratch buffer, as on CUDA
        if key in cfg.method:
            cfg.method[key] = "torch" if key == "noise" else 1
    dtype = resolve_dtype(cfg.run.dtype)
    batch_size, length = int(cfg.run.batch_size), seq_length(cfg)
    offload = bool(cfg.run.get("offload", False))
    device = torch.device("cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    tracker = Tracker(round_to=CUDA_BLOCK if gpu else 1)
    with _prediction_env(fake), fake_mode:
        seed_everything(int(cfg.run.seed))
        model = build_model(cfg.model, dtype, device)
        optimizer = build_method(cfg.method, model, seed=int(cfg.run.seed))
        offloader = None
        if offload:
            from zoexp.offload import enable_offload

            offloader = enable_offload(model, optimizer, device, ring=int(cfg.run.get("offload_ring", 3)))
        params = list({id(p): p for p in model.parameters()}.values())
        host = list(offloader._buckets.values()) if offloader is not None else []
        host_ids = {id(t.untyped_storage()) for t in host}
        n_params = sum(p.numel() for p in params)
        counters = Counters()
        encoder = SyntheticEncoder(length)
        pad_id = int(model.config.pad_token_id or 0)
        with tracker:
            tracker.retag(host, HOST)
            tracker.retag([p for p in params if id(p.untyped_storage()) not in host_ids], "parameters")
            tracker.retag(list(model.buffers()), "parameters")
            if offloader is not None:
                tracker.retag(offloader.slots, "parameters")
            if optimizer is not None:
                tracker.retag(optimizer_tensors(optimizer), "optimizer_state")
            tracker.reset_peak()
            at_start = tracker.current()
            hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag([p.grad], "gradients"))
                     for p in params if p.requires_grad]
            losses = []
            if optimizer is not None:
                model.train(optimizer.train_mode)
                for _ in range(int(steps)):
                    closure = LossClosure(model, encoder, synthetic_batch(batch_size), pad_id, counters, "lm")
                    losses.append(optimizer.step(closure))
                    tracker.retag(optimizer_tensors(optimizer), "optimizer_state")
                    tracker.retag([p.grad for p in params if p.grad is not None], "gradients")
                    del closure
            else:  # evaluation only: one forward pass
                from zoexp.scoring import lm_loss

                with torch.no_grad():
                    losses.append(lm_loss(model, encoder, synthetic_batch(batch_size), pad_id))
            for h in hooks:
                h.remove()
            del losses
        peak = tracker.peak_breakdown()
        host_bytes = tracker.totals[HOST]
        row = {
            f"{PREFIX}predicted_peak_bytes": tracker.peak,
            **{f"{PREFIX}predicted/{k}_bytes": v for k, v in peak.items()},
            f"{PREFIX}device_param_bytes": at_start["parameters"],
            f"{PREFIX}device_state_bytes": at_start["optimizer_state"],
            f"{PREFIX}host_bytes": host_bytes,
            f"{PREFIX}model_params": n_params,
            f"{PREFIX}batch_size": batch_size,
            f"{PREFIX}seq_len": length,
            f"{PREFIX}dtype": str(cfg.run.dtype),
            f"{PREFIX}offload": offload,
            f"{PREFIX}offload_ring": int(cfg.run.get("offload_ring", 3)) if offload else None,
            f"{PREFIX}steps": int(steps) if optimizer is not None else 0,
            f"{PREFIX}target": "cuda" if gpu else "cpu",
            f"{PREFIX}fake": bool(fake),
        }
        if offloader is not None:
            row.update({f"{PREFIX}{k}": v for k, v in offloader.device_bytes().items()})
    row[f"{PREFIX}predict_s"] = time.perf_counter() - t0
    row[f"{PREFIX}predict_cpu_s"] = time.process_time() - c0  # CPU seconds: wall-clock on a loaded machine
    return row


def predict_cfg(cfg, steps: int = 2) -> dict:
    """The prediction row of a composed config: inputs + ``memory/*`` (see the module doc)."""
    row = {"method": cfg.method.name, "model": cfg.model.name, "dtype": str(cfg.run.dtype),
           "run.batch_size": int(cfg.run.batch_size), "run.max_length": seq_length(cfg),
           "run.offload": bool(cfg.run.get("offload", False)), "run.device": str(cfg.run.get("device", "auto"))}
    row.update(measure_step(cfg, fake=True, steps=steps))
    return row


class DoesNotFit(ModelLoadError):
    """The predicted peak of a step exceeds the free device memory (raised before the model loads; a
    user error: the CLI prints it without a traceback, a sweep records a failed row and goes on)."""


def check_fits(cfg, device: torch.device, row: dict | None = None) -> dict | None:
    """Before a CUDA run (``run.memory_check``: auto/true; false = off): predict the device peak and
    stop with a clear message if it exceeds the free memory of ``device``. Returns the prediction
    (None when skipped: not CUDA, switched off, or a model without architecture data)."""
    import logging

    log = logging.getLogger(__name__)
    setting = cfg.run.get("memory_check", "auto")
    if setting in (False, "false", "off", None) or device.type != "cuda":
        return None
    if cfg.model.get("device_map") is not None:  # sharded over devices: one device's peak is not predicted
        log.info("memory check skipped: model.device_map spreads the model over several devices")
        return None
    try:
        pred = measure_step(cfg, fake=True, gpu=True)
    except ValueError as exc:  # no architecture data: nothing to predict from
        log.warning("memory check skipped: %s", exc)
        return None
    free, total = torch.cuda.mem_get_info(device)
    peak = pred[PREFIX + "predicted_peak_bytes"]
    if row is not None:
        row.update({PREFIX + "predicted_peak_bytes": peak, PREFIX + "device_free_bytes": free,
                    PREFIX + "predict_s": pred[PREFIX + "predict_s"]})
    if peak > free:
        raise DoesNotFit(
            f"predicted peak device memory {peak / GIB:.2f} GiB exceeds the free memory of {device} "
            f"({free / GIB:.2f} of {total / GIB:.2f} GiB): "
            + ", ".join(f"{k} {pred[f'{PREFIX}predicted/{k}_bytes'] / GIB:.2f}" for k in CATEGORIES)
            + " GiB. Smaller run.batch_size / run.max_length, run.dtype=fp16, run.offload=true, or more "
              "memory; run.memory_check=false skips this check (docs/memory.md).")
    log.info("memory check: predicted peak %.2f GiB, free %.2f GiB on %s", peak / GIB, free / GIB, device)
    return pred


def dry_run(cfg, row: dict) -> dict:
    """``run.dry_run=memory``: ``row`` (the run's inputs, as any row: ``zoexp.runner.base_row``) with status
    ``predicted`` and ``memory/*``, appended to ``run.results_file``; nothing is trained or loaded."""
    from zoexp.results import append_row

    mode = str(cfg.run.get("dry_run"))
    if mode != "memory":
        raise ValueError(f"run.dry_run must be memory or null, not {mode!r}")
    t0 = time.perf_counter()
    try:
        row.update(measure_step(cfg, fake=True))
        row["status"] = "predicted"
    except Exception as exc:  # the row says why (e.g. no architecture data); a sweep goes on
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
    row["device"] = f"predicted ({'cuda' if target_is_gpu(cfg) else 'cpu'})"
    row["time/total_s"] = time.perf_counter() - t0
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if cfg.run.get("results_file"):
        append_row(cfg.run.results_file, row)
    if row["status"] == "failed":
        raise RuntimeError(row["message"])
    return row


def compose(overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from zoexp.configs import register_resolvers, register_tasks
    from zoexp.paths import conf_dir

    register_tasks()
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def predict(overrides: list[str]) -> dict:
    """Compose the zoexp config with ``overrides`` and predict the device peak of one training step
    (two steps, tracked together) on fake tensors. Returns a flat row: the inputs, and
    ``memory/predicted_peak_bytes`` (device peak) plus ``memory/predicted/<category>_bytes``."""
    row = predict_cfg(compose(overrides))
    row["overrides"] = list(overrides)
    return row


GIB = 1024 ** 3


def format_row(row: dict) -> str:
    lines = [f"{row['method']} · {row['model']} · {row['dtype']} · batch {row[PREFIX + 'batch_size']} x "
             f"{row[PREFIX + 'seq_len']} tokens" + (" · offload" if row[PREFIX + "offload"] else "")]
    lines.append(f"  predicted device peak   {row[PREFIX + 'predicted_peak_bytes'] / GIB:8.3f} GiB "
                 f"({row[PREFIX + 'predicted_peak_bytes'] / 1e9:.2f} GB)")
    for k in CATEGORIES:
        lines.append(f"    {k:<20} {row[f'{PREFIX}predicted/{k}_bytes'] / GIB:8.3f} GiB")
    lines.append(f"  device bytes before the step: parameters {row[PREFIX + 'device_param_bytes'] / GIB:.3f} GiB, "
                 f"optimizer state {row[PREFIX + 'device_state_bytes'] / GIB:.3f} GiB")
    if row[PREFIX + "offload"]:
        lines.append(f"  host (offloaded layers) {row[PREFIX + 'host_bytes'] / GIB:8.3f} GiB")
    lines.append(f"  predicted in {row[PREFIX + 'predict_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print("usage: zoexp-memory [KEY=VALUE ...]   e.g. zoexp-memory model=opt-175b method=hzo run.dtype=fp16 "
              "run.offload=true run.batch_size=16 run.max_length=128\n"
              "Predicts the device peak of a training step on fake tensors (docs/memory.md).\n"
              "A sweep that writes rows: zoexp -m ... run.dry_run=memory")
        return 0
    print(format_row(predict(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
