"""LoRA through peft: base weights untouched, merge is exact, MeZO-LoRA perturbs only the adapters,
exact state bytes, and a full run through the runner."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose
from fo_helpers import eval_loss, setup, snapshot

pytest.importorskip("peft")

from zoexp.methods.lora import lora_modules, merge_lora  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
def test_lora_trains_adapters_only_and_leaves_base_weights_bit_identical(fixture, request, fixture_data_dir):
    tiny = request.getfixturevalue(fixture)
    original = snapshot(tiny[0])
    model, opt, closure, _ = setup(tiny, fixture_data_dir, "lora", ["method.lr=1e-2"])
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_A" in n or "lora_B" in n for n in adapters)
    assert all(".q_proj." in n or ".v_proj." in n for n in adapters)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in adapters}
    assert all(g["role"] == "block" for g in opt.param_groups) and len(opt.param_groups) == 4
    start = eval_loss(model, closure)
    for _ in range(3):
        opt.step(closure)
    assert eval_loss(model, closure) < start
    for name, p in model.named_parameters():
        if name not in adapters:  # peft renames adapted layers' weights to <layer>.base_layer.weight
            assert torch.equal(p, original[name.replace(".base_layer", "")]), name
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B started at 0
    # exact state: AdamW moments for every adapter tensor + one fp32 step counter each
    params = [p for g in opt.param_groups for p in g["params"]]
    assert opt.state_bytes() == 2 * nbytes(params) + 4 * len(params)
    assert opt.grad_bytes_max == nbytes(params)


def test_merge_folds_the_adapters_into_the_weights(tiny_opt, fixture_data_dir):
    model, opt, closure, _ = setup(tiny_opt, fixture_data_dir, "lora", ["method.lr=1e-2", "method.alpha=32"])
    for _ in range(2):
        opt.step(closure)
    model.eval()
    layer = dict(lora_modules(model))["model.decoder.layers.0.self_attn.q_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer.weight.detach() + (32 / 8) * (b @ a).detach()
    with torch.no_grad():
        unmerged = float(closure())
    merge_lora(model)
    assert not lora_modules(model)
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear
    assert torch.allclose(q_proj.weight, expected, atol=1e-6)
    with torch.no_grad():
        assert float(closure()) == pytest.approx(unmerged, rel=1e-5)


def test_mezo_lora_perturbs_only_the_adapters(tiny_opt, fixture_data_dir):
    model, opt, closure, _ = setup(tiny_opt, fixture_data_dir, "mezo-lora", ["method.lr=1e-2"])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in adapters.values()}
    seen = []

    def watched():
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        seen.append({n: p.detach().clone() for n, p in adapters.items()})
        return closure()

    before = {n: p.detach().clone() for n, p in adapters.items()}
    opt.step(watched)
    plus, minus = seen
    for n in adapters:  # both forwards ran with perturbed adapters (B starts at zero: now nonzero)
        assert not torch.equal(plus[n], before[n]) and not torch.equal(minus[n], before[n])
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert opt.state_bytes() == 0 and opt.grad_bytes_max == 0


def test_lora_needs_matching_target_modules(tiny_opt, fixture_data_dir):
    with pytest.raises(ValueError, match="Target modules"):
        setup(tiny_opt, fixture_data_dir, "lora", ["method.target_modules=[nope_proj]"])


@pytest.mark.parametrize("method,overrides", [
    ("lora", ["method.lr=1e-2"]),
    ("badam", ["method.lr=1e-3", "method.interval=1", "method.accumulation_steps=2"]),
])
def test_runner_runs_the_method_end_to_end(method, overrides, tmp_path, fixture_data_dir):
    from zoexp.runner import run

    cfg = compose(["model=tiny-opt", f"method={method}", *overrides, f"data_dir={fixture_data_dir}",
                   "task.num_train=16", "task.num_dev=8", "task.num_test=8", "run.batch_size=4",
                   "run.steps=4", "run.eval_every=2", "run.progress=false", "run.keep_best=memory",
                   f"results_dir={tmp_path}"])
    row = run(copy.deepcopy(cfg), run_dir=tmp_path)
    assert row["status"] == "ok" and row["steps"] == 4 and row["forward_passes"] == 4
    assert row["optimizer_grad_bytes_max"] > 0 and row["optimizer_state_bytes_max"] > 0
    assert row["best_step"] in (2, 4) and 0 <= row["test/acc"] <= 1
