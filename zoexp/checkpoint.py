"""Streaming safetensors I/O: write and read tensors without a second in-memory copy of the model.

``safetensors.torch.save_file`` serialises every tensor to ``bytes`` first, which briefly doubles the
host memory of a model and would show up in the next phase's peak-memory measurement. The format
is simple (8-byte little-endian header length, JSON header, raw little-endian data), so this module
writes it tensor by tensor from the tensors' own memory and reads it back into existing tensors.
Files are written to a temporary name, flushed and renamed: a killed run never leaves half a file.
Any safetensors reader can open the result.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}


def _as_buffer(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return memoryview(t.numpy()).cast("B")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
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
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            if t.numel():
                fh.write(_as_buffer(t))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
