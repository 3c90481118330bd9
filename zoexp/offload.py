"""Block offloading for zeroth-order steps (HZO Section 3.5; the public ZO2 project is the anchor).

The transformer layers live in host memory, one flat *bucket* per layer (pinned on CUDA machines, so
copies are asynchronous DMA); embeddings, final norm, LM head and any layer a hybrid method trains
first-order stay on the device. A *ring* of ``ring`` reusable device buffers, each the size of the
largest bucket, holds the layers being computed: layer i always uses slot ``i mod ring``. Three
streams overlap the work -- upload layer i+1 (upload stream), compute layer i (the current stream),
offload layer i-1 (offload stream) -- ordered by events only:

    upload i   waits  slot free (previous occupant offloaded) and host copy of i final
    compute i  waits  upload of i
    offload i  waits  compute of i;  its completion frees the slot and finalises the host copy

While a layer is resident its parameters are views into its slot; otherwise views into its bucket.
The ring never holds more than ``ring`` layers, so the device holds about

    ring x (largest layer) + embeddings + norm + head + first-order layers + activations

**Dual forward** (``zoexp.scoring.dual_lm_loss``, beside ``lm_loss``; it drives this ring through
``acquire``/``release`` and the ``plan`` of which param groups each part of the forward uses): a ZO step needs L(θ+εd) and L(θ−εd). Instead of two full forward
passes (each moving every layer over the bus), both passes run through a layer while it is resident:
perturb +ε, compute the + stream, perturb −ε, compute the − stream, restore -- so each layer crosses
the bus once per step and the compute per transfer doubles (the paper's argument for full overlap).
The step's update needs the projected gradient, known only after the head, so it is *deferred*:
step t's update of a layer is applied at its next residency, before step t+1's perturbation (ZO2's
lazy update); ``Method.flush`` applies what is still deferred (the runner calls it before evaluation).

The per-layer inputs (attention mask, rotary position embeddings, position ids) are taken from the
model itself: the embedding prologue of the Hugging Face forward runs until the first decoder layer is
called, its arguments are captured and reused for every layer (OPT and LLaMA-family pass the same
arguments to each layer; ``zoexp.models.layer_inputs``). The loss after the layers is
``zoexp.scoring``'s, so it equals ``lm_loss``.

Single forward passes (evaluation, generation, the FO step of a hybrid) use the same ring through
forward hooks on each offloaded layer: acquire before, release after, deferred updates applied on
the way. On a machine without an accelerator the same schedule runs with host-to-host copies and
no-op streams (``tests/test_offload.py`` proves losses and weights equal the non-offloaded path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from zoexp.models import block_view, tail_modules

SUPPORTED_FAMILIES = ("opt", "llama")


# The method side, as this module sees it. The ring imports no method: a method that supports
# offloading (``zoexp.methods.base.ZOMethod`` and its per-group operations) meets this protocol,
# and the signs it applies during a dual forward are ``zoexp.methods.deferred.DualPerturbation``
# (``zoexp.scoring.GroupPerturbation``).

class OffloadedMethod(Protocol):
    """What ``enable_offload`` needs of a method."""

    param_groups: list[dict]

    def supports_offload(self) -> bool: ...

    def zo_group_ids(self) -> list[int]: ...

    def attach_offloader(self, offloader: BlockOffloader) -> None: ...


class _Sync:
    """Streams and events on CUDA; on CPU every copy is synchronous and these are no-ops."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.upload = torch.cuda.Stream(device) if self.cuda else None
        self.offload = torch.cuda.Stream(device) if self.cuda else None

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def compute(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def record(self, event, stream) -> None:
        if event is not None:
            event.record(stream)

    def wait(self, stream, event) -> None:
        if event is not None:
            stream.wait_event(event)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class ForwardGroups:
    """Which param groups (indices) each part of the forward pass uses."""

    embed: set[int] = field(default_factory=set)
    layers: list[set[int]] = field(default_factory=list)
    tail: set[int] = field(default_factory=set)
    head: set[int] = field(default_factory=set)


def _family(model: nn.Module) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SUPPORTED_FAMILIES:
        raise NotImplementedError(f"offloading supports {', '.join(SUPPORTED_FAMILIES)} models, not {kind!r}")
    return kind


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class BlockOffloader:
    """Transformer layers in host buckets, computed in a ring of ``ring`` device slots (see module doc).

    ``keep``: layer indices that stay on the device (e.g. a hybrid method's first-order layers).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, ring: int = 3, keep: Iterable[int] = (),
                 pin: bool | None = None):
        if int(ring) < 1:
            raise ValueError(f"offload ring must hold at least one block (got {ring})")
        _family(model)  # refuses a model family the dual forward does not know
        self.model = model
        self.device = torch.device(device)
        self.view = block_view(model)
        self.layers = self.view.layers
        self.keep = {int(i) for i in keep}
        self.order = [i for i in range(len(self.layers)) if i not in self.keep]
        self.ring = min(int(ring), len(self.order))
        self.sync = _Sync(self.device)
        pin = self.device.type == "cuda" if pin is None else pin
        self.on_resident: Callable[[list[int]], bool] | None = None  # applies deferred updates
        self.manual = False  # True while dual_lm_loss drives the layers itself (hooks stand aside)
        self.uploads = self.offloads = 0
        self.max_in_ring = 0
        self.layer_groups: dict[int, list[int]] = {}
        self.group_layer: dict[int, int | None] = {}
        self.plan = ForwardGroups()

        offloaded = {id(m) for i in self.order for m in self.layers[i].modules()}
        self._params: dict[int, list[nn.Parameter]] = {}
        self._buckets: dict[int, torch.Tensor] = {}
        self._host_views: dict[int, list[torch.Tensor]] = {}
        dtypes = set()
        with torch.no_grad():
            for i in self.order:
                params = _unique_params(self.layers[i])
                dtypes |= {p.dtype for p in params}
                if len(dtypes) > 1:
                    raise ValueError(f"offloaded layers must share one dtype (found {sorted(map(str, dtypes))})")
                numel = sum(p.numel() for p in params)
                bucket = torch.empty(numel, dtype=params[0].dtype, pin_memory=pin)
                views, offset = [], 0
                for p in params:
                    view = bucket[offset:offset + p.numel()].view(p.shape)
                    view.copy_(p.data)
                    p.data = view
                    views.append(view)
                    offset += p.numel()
                self._params[i], self._buckets[i], self._host_views[i] = params, bucket, views
                for module in self.layers[i].modules():  # buffers are small: they live on the device
                    for name, buf in module._buffers.items():
                        if buf is not None:
                            module._buffers[name] = buf.to(self.device)
            for module in model.modules():  # everything else on the device
                if id(module) in offloaded:
                    continue
                for p in module._parameters.values():
                    if p is not None and p.device != self.device:
                        p.data = p.data.to(self.device)
                for name, buf in module._buffers.items():
                    if buf is not None and buf.device != self.device:
                        module._buffers[name] = buf.to(self.device)
        slot_numel = max((b.numel() for b in self._buckets.values()), default=0)
        dtype = dtypes.pop() if dtypes else torch.float32
        self.slots = [torch.empty(slot_numel, dtype=dtype, device=self.device) for _ in range(self.ring)]
        self._slot_of = {i: pos % self.ring for pos, i in enumerate(self.order)} if self.ring else {}
        self._next = {i: self.order[pos + 1:pos + self.ring] for pos, i in enumerate(self.order)}
        self._owner: list[int | None] = [None] * self.ring
        self._state = {i: "host" for i in self.order}  # host | loading | resident | released
        self._loaded = [self.sync.event() for _ in range(self.ring)]
        self._done = [self.sync.event() for _ in range(self.ring)]
        self._free = [self.sync.event() for _ in range(self.ring)]
        self._host_ready = {i: self.sync.event() for i in self.order}
        self._dirty: dict[int, bool] = {}
        self._hooks = []
        for i in self.order:
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(self.layers[i].register_forward_hook(self._post_hook(i)))

    # ------------------------------------------------------------------ bookkeeping

    def bind(self, param_groups: list[dict]) -> None:
        """Map param groups (by index) to layers and to the parts of the forward pass (``plan``)."""
        where = {}
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                where[id(p)] = i
        self.layer_groups = {i: [] for i in range(len(self.layers))}
        self.group_layer = {}
        for gi, group in enumerate(param_groups):
            layers = {where.get(id(p)) for p in group["params"]}
            if len(layers) > 1:
                raise ValueError(f"param group {group.get('name', gi)!r} spans several layers; offloading needs one block per group")
            layer = layers.pop() if layers else None
            self.group_layer[gi] = layer
            if layer is not None:
                self.layer_groups[layer].append(gi)

        def groups_of(modules: list[nn.Module | None]) -> set[int]:
            ids = {id(p) for m in modules if m is not None for p in m.parameters()}
            return {gi for gi, g in enumerate(param_groups) if any(id(p) in ids for p in g["params"])}

        self.plan = ForwardGroups(embed=groups_of(list(self.view.embed)),
                         layers=[set(self.layer_groups[i]) for i in range(len(self.layers))],
                         tail=groups_of(tail_modules(self.model)),
                         head=groups_of([self.view.head]))

    def device_bytes(self) -> dict:
        """Bytes of parameters on the device: the ring plus everything kept resident (the memory formula)."""
        block = max((b.numel() * b.element_size() for b in self._buckets.values()), default=0)
        offloaded = {id(p) for ps in self._params.values() for p in ps}
        resident = 0
        seen = set()
        for p in self.model.parameters():
            if id(p) in offloaded or id(p) in seen:
                continue
            seen.add(id(p))
            resident += p.numel() * p.element_size()
        return {"offload/ring": self.ring, "offload/block_bytes": block, "offload/ring_bytes": self.ring * block,
                "offload/resident_param_bytes": resident, "offload/offloaded_layers": len(self.order),
                "offload/device_param_bytes": self.ring * block + resident}

    # ------------------------------------------------------------------ the ring

    def _slot_busy(self, s: int, i: int) -> bool:
        owner = self._owner[s]
        return owner is not None and owner != i and self._state[owner] in ("loading", "resident")

    def _upload(self, i: int) -> None:
        s = self._slot_of[i]
        if self._slot_busy(s, i):
            raise RuntimeError(f"ring slot {s} is busy with layer {self._owner[s]}; cannot upload layer {i}")
        previous = self._owner[s]
        if previous is not None and previous != i:
            self._state[previous] = "host"
        bucket = self._buckets[i]
        with self.sync.on(self.sync.upload):
            if self.sync.cuda:
                self.sync.wait(self.sync.upload, self._free[s])
                self.sync.wait(self.sync.upload, self._host_ready[i])
            self.slots[s][: bucket.numel()].copy_(bucket, non_blocking=True)
            self.sync.record(self._loaded[s], self.sync.upload)
        self._owner[s] = i
        self._state[i] = "loading"
        self.uploads += 1
        self.max_in_ring = max(self.max_in_ring, sum(st in ("loading", "resident") for st in self._state.values()))

    def prefetch(self, i: int) -> None:
        """Start uploading layer i if its slot is free (no-op for kept or already loading layers)."""
        if i in self.keep or self._state[i] in ("loading", "resident") or self._slot_busy(self._slot_of[i], i):
            return
        self._upload(i)

    def acquire(self, i: int) -> None:
        """Make layer i resident: its parameters become views into its ring slot."""
        if i in self.keep:
            return
        if self._state[i] == "resident":
            raise RuntimeError(f"layer {i} is already resident")
        if self._state[i] != "loading":
            self._upload(i)
        s = self._slot_of[i]
        if self.sync.cuda:
            self.sync.wait(self.sync.compute(), self._loaded[s])
        offset = 0
        for p in self._params[i]:
            p.data = self.slots[s][offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        self._state[i] = "resident"
        for j in self._next[i]:
            self.prefetch(j)

    def release(self, i: int, dirty: bool) -> None:
        """Layer i is done: parameters point back at the host bucket; a changed layer is copied back."""
        if i in self.keep:
            return
        if self._state[i] != "resident":
            raise RuntimeError(f"layer {i} is not resident")
        s = self._slot_of[i]
        compute = self.sync.compute()
        self.sync.record(self._done[s], compute)
        for p, view in zip(self._params[i], self._host_views[i]):
            p.data = view
        if dirty:
            bucket = self._buckets[i]
            with self.sync.on(self.sync.offload):
                if self.sync.cuda:
                    self.sync.wait(self.sync.offload, self._done[s])
                bucket.copy_(self.slots[s][: bucket.numel()], non_blocking=True)
                self.sync.record(self._host_ready[i], self.sync.offload)
                self.sync.record(self._free[s], self.sync.offload)
            self.offloads += 1
        else:
            self.sync.record(self._free[s], compute)
        self._state[i] = "released"

    def synchronize(self) -> None:
        """Wait for every transfer; afterwards the host buckets hold the current weights."""
        self.sync.synchronize()
        for i, state in self._state.items():
            if state == "resident":
                raise RuntimeError(f"layer {i} is still resident")
            self._state[i] = "host"
        self._owner = [None] * self.ring

    def visit_groups(self, group_ids: list[int], fn: Callable[[list[int]], object]) -> None:
        """Call ``fn(groups)`` with the groups resident: device groups at once, then layer by layer."""
        by_layer: dict[int, list[int]] = {}
        here = []
        for gi in group_ids:
            layer = self.group_layer.get(gi)
            if layer is None or layer in self.keep:
                here.append(gi)
            else:
                by_layer.setdefault(layer, []).append(gi)
        if here:
            fn(here)
        for i in sorted(by_layer):
            self.acquire(i)
            fn(by_layer[i])
            self.release(i, dirty=True)
        self.synchronize()

    def in_ring(self) -> list[int]:
        """Layers whose parameters currently point into a ring slot."""
        ranges = [(s.data_ptr(), s.data_ptr() + s.numel() * s.element_size()) for s in self.slots]
        out = []
        for i in self.order:
            ptr = self._params[i][0].data_ptr()
            if any(a <= ptr < b for a, b in ranges):
                out.append(i)
        return out

    # ------------------------------------------------------------------ hooks for single passes

    def _pre_hook(self, i: int):
        def hook(module, args):
            if self.manual:
                return
            self.acquire(i)
            applied = self.on_resident(self.layer_groups.get(i, [])) if self.on_resident else False
            self._dirty[i] = bool(applied)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if self.manual:
                return
            self.release(i, self._dirty.pop(i, False))
        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


# ---------------------------------------------------------------------- set-up


def enable_offload(model: nn.Module, method: OffloadedMethod | None = None, device: torch.device | str = "cpu",
                   ring: int = 3) -> BlockOffloader:
    """Offload ``model``'s layers and attach the offloader to ``method`` (a ZO method, or None to only
    evaluate). Layers holding a method's non-ZO (first-order) groups stay on the device."""
    view = block_view(model)
    keep: set[int] = set()
    if method is not None:
        supports = getattr(method, "supports_offload", None)
        if not callable(supports) or not supports():
            raise ValueError(f"method {type(method).__name__} does not support offloading (run.offload=true)")
        where = {id(p): i for i, layer in enumerate(view.layers) for p in layer.parameters()}
        zo = set(method.zo_group_ids())
        fo_layers = {where[id(p)] for gi, g in enumerate(method.param_groups) if gi not in zo
                     for p in g["params"] if id(p) in where}
        zo_layers = {where[id(p)] for gi, g in enumerate(method.param_groups) if gi in zo
                     for p in g["params"] if id(p) in where}
        fo_embed = any(g.get("role") == "embed" for gi, g in enumerate(method.param_groups) if gi not in zo)
        if zo_layers and (fo_embed or (fo_layers and min(fo_layers) < max(zo_layers))):
            raise ValueError("offloading needs the first-order layers above every offloaded ZO layer (Z+F): "
                             "with F+Z the backward pass would run through streamed layers")
        keep = fo_layers
    offloader = BlockOffloader(model, device, ring=ring, keep=keep)
    offloader.bind(method.param_groups if method is not None else [])
    if method is not None:
        method.attach_offloader(offloader)
    return offloader
