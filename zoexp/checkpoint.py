"""Streaming safetensors I/O: write and read tensors without a second in-memory copy of the model.

``safetensors.torch.save_file`` serialises every tensor to ``bytes`` first, which briefly doubles the
host memory of a model and would show up in the next phase's peak-memory measurement. The format
is simple (8-byte little-endian header length, JSON header, raw little-endian data), so this module
writes it tensor by tensor from the tensors' own memory and reads it back into existing tensors.
Files are written to a temporary name, flushed and renamed: a killed run never leaves half a file.
Any safetensors reader can open the result.

Checkpoints (``zoexp.resume``) also store nested state (``Optimizer.state_dict()``, sampler and RNG
states): ``save_tree`` writes the tensors of such a tree to a safetensors file and its structure as
JSON in the file's metadata, so no pickle is involved; ``load_tree`` rebuilds it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def _as_buffer(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return memoryview(t.reshape(-1).numpy()).cast("B")  # flat: memoryview cannot cast shapes with a 0


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``path`` (atomically); returns the CRC-32 of the file's bytes."""
    path = Path(path)
    header: dict = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} not supported")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    crc = 0
    with open(tmp, "wb") as fh:
        for part in _parts(struct.pack("<Q", len(blob)), blob, tensors):
            crc = zlib.crc32(part, crc)
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return crc


def _parts(size: bytes, blob: bytes, tensors: dict[str, torch.Tensor]):
    yield size
    yield blob
    for t in tensors.values():
        if t.numel():
            yield _as_buffer(t)


def file_crc32(path: str | os.PathLike, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: header of {n} bytes is not plausible")
        header = json.loads(fh.read(n))
    return header, 8 + n


@torch.no_grad()
def load_into(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Read every tensor of ``tensors`` from ``path`` into the tensor itself; returns the file's metadata.

    Shapes and dtypes must match; a missing or truncated entry raises ``ValueError``.
    """
    header, start = read_header(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        for name, dst in tensors.items():
            info = header.get(name)
            if info is None:
                raise ValueError(f"{path}: no tensor {name!r}")
            if info["dtype"] != _DTYPES[dst.dtype] or list(info["shape"]) != list(dst.shape):
                raise ValueError(f"{path}: {name} is {info['dtype']}{info['shape']}, expected "
                                 f"{_DTYPES[dst.dtype]}{list(dst.shape)}")
            a, b = info["data_offsets"]
            if start + b > size:
                raise ValueError(f"{path}: truncated ({name} ends past the end of the file)")
            fh.seek(start + a)
            if dst.device.type == "cpu" and dst.is_contiguous():
                view = _as_buffer(dst)
                if fh.readinto(view) != b - a:
                    raise ValueError(f"{path}: short read for {name}")
            else:
                host = torch.empty(dst.shape, dtype=dst.dtype)
                if fh.readinto(_as_buffer(host)) != b - a:
                    raise ValueError(f"{path}: short read for {name}")
                dst.copy_(host)
    return header.get("__metadata__", {})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (new CPU tensors) and the file's metadata."""
    header, _ = read_header(path)
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _FROM_NAME:
            raise ValueError(f"{path}: {name} has unsupported dtype {info['dtype']}")
        tensors[name] = torch.empty(info["shape"], dtype=_FROM_NAME[info["dtype"]])
    load_into(path, tensors)
    return tensors, meta


# --------------------------------------------------------------------------- nested state


def _encode(obj, tensors: dict[str, torch.Tensor], where: str):
    """JSON skeleton of ``obj``; tensors are replaced by references into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _DTYPES:
            raise TypeError(f"cannot checkpoint {where}: tensor dtype {obj.dtype}")
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    raise TypeError(f"cannot checkpoint {where}: {type(obj).__name__} is not a tensor, number, string, "
                    "list, tuple, dict or numpy array (make the method's state_dict() return such values)")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__device__" in obj:
        return torch.device(obj["__device__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def save_tree(path: str | os.PathLike, tree) -> int:
    """Write a nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) to one
    safetensors file: tensors as tensors, the structure as JSON metadata. Returns the file's CRC-32."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "state")
    return save_tensors(path, tensors, metadata={"zoexp.tree": json.dumps(skeleton, separators=(",", ":"))})


def load_tree(path: str | os.PathLike):
    """The nested state written by ``save_tree`` (tensors on the CPU)."""
    tensors, meta = load_tensors(path)
    if "zoexp.tree" not in meta:
        raise ValueError(f"{path}: not a zoexp state file (no zoexp.tree metadata)")
    return _decode(json.loads(meta["zoexp.tree"]), tensors)
