"""Result rows and streamed safetensors: atomic, readable, corruption detected."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from zoexp.checkpoint import load_into, save_tensors
from zoexp.results import append_row, read_rows


def _writer(path, k):
    for i in range(50):
        append_row(path, {"writer": k, "i": i, "pad": "x" * 5000})


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "runs.jsonl"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = read_rows(path)
    assert len(rows) == 200 and sorted((r["writer"], r["i"]) for r in rows) == [(k, i) for k in range(4) for i in range(50)]


def test_torn_last_line_is_skipped_and_next_row_survives(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"b": ')
    append_row(path, {"c": float("nan"), "t": torch.tensor(2.5)})
    assert read_rows(path) == [{"a": 1}, {"c": None, "t": 2.5}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_streamed_safetensors_round_trip_and_interoperate(tmp_path, dtype):
    tensors = {"w": (torch.randn(7, 5) * 10).to(dtype), "b": torch.arange(3).to(dtype), "empty": torch.zeros(0, dtype=dtype)}
    path = tmp_path / "x.safetensors"
    save_tensors(path, tensors, metadata={"step": 3})
    other = load_file(str(path))  # the reference reader agrees
    assert all(torch.equal(other[k], v) for k, v in tensors.items())
    dst = {k: torch.empty_like(v) for k, v in tensors.items()}
    assert load_into(path, dst) == {"step": "3"}
    assert all(torch.equal(dst[k], v) for k, v in tensors.items())


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_into(path, {"w": torch.empty(100)})


def test_shape_mismatch_is_detected(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.randn(10)})
    with pytest.raises(ValueError, match="expected"):
        load_into(path, {"w": torch.empty(11)})
