"""The memory predictor (zoexp.memory): fake tensors predict exactly what the same step allocates on
real tensors, paper models build from their architecture data, the pre-run check stops a run that
cannot fit, and a dry run writes a `predicted` row."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose

from zoexp import memory

SMALL = ["run.batch_size=2", "run.max_length=16"]


def _breakdown(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("memory/predicted")}


@pytest.mark.parametrize("method,extra", [
    ("mezo", []), ("hizoo", []), ("focus", []), ("hzo", ["run.offload=true"]), ("loho", []),
    ("adam", []), ("lomo", []), ("lora", []), ("bcd-sgd", []), ("zero-shot", []),
])
def test_fake_prediction_equals_real_step_on_tiny_opt(method, extra):
    cfg = compose(["model=tiny-opt", f"method={method}", *SMALL, *extra])
    fake = memory.measure_step(cfg, fake=True, gpu=False)
    real = memory.measure_step(cfg, fake=False, gpu=False)
    assert _breakdown(fake) == _breakdown(real)
    assert fake["memory/predicted_peak_bytes"] >= fake["memory/device_param_bytes"] > 0


@pytest.mark.slow  # real steps of a 135M model: ~1-3 min each on 2 shared cores
@pytest.mark.parametrize("method", ["mezo", "hizoo", "sgd"])
def test_fake_prediction_equals_real_step_on_smollm2(method):
    """SmolLM2-135M's embedding spans 27 noise chunks: the fake run visits two of them (sampled), the
    real one all -- the same peak."""
    cfg = compose(["model=smollm2-135m", f"method={method}", *SMALL])
    fake = memory.measure_step(cfg, fake=True, gpu=False)
    real = memory.measure_step(cfg, fake=False, gpu=False)
    assert _breakdown(fake) == _breakdown(real)
    assert fake["memory/model_params"] == 134_515_008


def test_paper_architectures_build_without_weights():
    from torch._subclasses.fake_tensor import FakeTensorMode

    counts = {"opt-1.3b": 1_315_758_080, "llama-2-7b": 6_738_415_616}
    for name, n in counts.items():
        with FakeTensorMode():
            model = memory.build_model(compose([f"model={name}"]).model, torch.float16)
        assert sum(p.numel() for p in model.parameters()) == n
        assert next(model.parameters()).dtype == torch.float16


def test_predict_api_returns_a_flat_row():
    row = memory.predict(["model=tiny-llama", "method=mezo", "run.dtype=fp16", *SMALL, "run.device=cuda"])
    assert row["memory/target"] == "cuda" and row["memory/batch_size"] == 2 and row["memory/seq_len"] == 16
    cats = sum(row[f"memory/predicted/{c}_bytes"] for c in memory.CATEGORIES)
    assert cats == row["memory/predicted_peak_bytes"]
    assert row["memory/predicted_peak_bytes"] % memory.CUDA_BLOCK == 0  # 512-byte CUDA blocks


def test_offloaded_device_bytes_leave_the_host_buckets_out():
    base = ["model=tiny-llama", "method=mezo", *SMALL]
    resident = memory.measure_step(compose(base), gpu=False)
    ring = memory.measure_step(compose([*base, "run.offload=true", "run.offload_ring=1"]), gpu=False)
    assert ring["memory/host_bytes"] > 0
    # parameters + buffers on the device = the offloader's ring + resident parameters (+ small buffers)
    assert 0 <= ring["memory/device_param_bytes"] - ring["memory/offload/device_param_bytes"] < 1 << 12
    assert ring["memory/device_param_bytes"] + ring["memory/host_bytes"] >= resident["memory/device_param_bytes"]
    assert ring["memory/predicted_peak_bytes"] < resident["memory/predicted_peak_bytes"]


def test_check_fits_stops_a_cuda_run_that_cannot_fit(monkeypatch):
    cfg = compose(["model=tiny-opt", "method=mezo", *SMALL])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    row = {}
    with pytest.raises(memory.DoesNotFit, match="exceeds the free memory"):
        memory.check_fits(cfg, torch.device("cuda"), row)
    assert row["memory/predicted_peak_bytes"] > 1 << 20
    assert memory.check_fits(cfg, torch.device("cpu")) is None
    off = compose(["model=tiny-opt", "method=mezo", "run.memory_check=false", *SMALL])
    assert memory.check_fits(off, torch.device("cuda")) is None


def test_dry_run_writes_a_predicted_row(tmp_path):
    from zoexp.runner import run

    cfg = compose(["model=tiny-opt", "method=mezo", "run.dry_run=memory", f"results_dir={tmp_path}", *SMALL])
    row = run(cfg, run_dir=tmp_path / "r")
    assert row["status"] == "predicted" and row["method"] == "mezo" and row["run"]["batch_size"] == 2
    written = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert written[-1]["memory/predicted_peak_bytes"] == row["memory/predicted_peak_bytes"]


def test_memory_tables_cells_follow_the_paper_sweeps_and_render_deltas():
    from zoexp import memory_tables

    cells = memory_tables.cells("hzo_table4")
    hzo175 = [c for c in cells if c["method"] == "hzo" and c["role"] == "opt-175b" and c["variant"] == "fp16"]
    assert len(hzo175) == 1 and "model=opt-175b" in hzo175[0]["overrides"]
    assert "run.offload=true" in hzo175[0]["overrides"]  # whatever the sweep says for HZO flows in
    row = {**hzo175[0], "status": "predicted", "memory/predicted_peak_bytes": int(17.62 * 1.1 * 2**30)}
    text = memory_tables.render("hzo_table4", [row])
    assert "17.62 / **19.38** (+10%)" in text
    assert {c["role"] for c in memory_tables.cells("focus_table5")} == {"llama-3-8b"}
