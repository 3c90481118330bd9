"""Model sharding with accelerate device maps (model.device_map / model.max_memory).

This machine has no GPU: the multi-device placement is checked as accelerate computes it from the
budgets (no device needed), and training runs through the device-map code paths with CPU placements.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_resume import TINY, curve_without_time, run_inprocess

from zoexp.models import ModelLoadError, _check_resident, infer_device_map, load_model, model_devices

pytest.importorskip("accelerate")


def test_budgets_split_whole_layers_over_devices_in_order(tiny_opt):
    model, _ = tiny_opt
    # embeddings (tied with the head) fill GPU 0, two layers fit GPU 1, the rest goes to the CPU
    device_map = infer_device_map(model, "auto", {0: "13MB", 1: "300KB", "cpu": "1GB"})
    layers = [device_map[f"model.decoder.layers.{i}"] for i in range(4)]
    assert device_map["model.decoder.embed_tokens"] == device_map["lm_head"] == 0  # tied weights together
    assert layers == [0, 1, 1, "cpu"]
    assert not any(k.startswith("model.decoder.layers.0.") for k in device_map)  # a layer is never split


def test_device_map_run_trains_like_the_plain_run(tmp_path, fixture_data_dir, monkeypatch):
    monkeypatch.setenv("ZOEXP_DATA_DIR", str(fixture_data_dir))
    args = [*TINY, f"results_dir={tmp_path / 'results'}", "run.steps=3", "run.eval_every=0", "method.lr=1e-3",
            "run.keep_best=none"]
    plain = run_inprocess(args, tmp_path / "plain")
    auto = run_inprocess([*args, "model.device_map=auto", "model.max_memory={cpu: 1GiB}"], tmp_path / "auto")
    explicit = run_inprocess([*args, "model.device_map={model.decoder: cpu, lm_head: cpu}"], tmp_path / "explicit")
    for row in (auto, explicit):
        assert row["status"] == "ok"
        assert curve_without_time(row) == curve_without_time(plain)
        assert row["test/acc"] == plain["test/acc"]


def test_offloaded_parameters_are_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ModelLoadError, match="max_memory"):
        _check_resident(model)


def test_model_devices_lists_every_device(tiny_opt):
    model, _ = tiny_opt
    assert model_devices(model) == [torch.device("cpu")]


@pytest.mark.slow
def test_real_model_loads_through_from_pretrained_with_a_device_map():
    """SmolLM2-135M (GGUF -> safetensors) through transformers' device_map + max_memory."""
    from conftest import REPO

    cfg = OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")
    cfg.device_map, cfg.max_memory = "auto", {"cpu": "4GiB"}
    model, _ = load_model(cfg, "fp32", "cpu")
    assert model_devices(model) == [torch.device("cpu")]
