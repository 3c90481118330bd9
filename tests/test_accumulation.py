"""ZO gradient accumulation (run.accumulation_steps): k micro-batches under one perturbation give the
full batch's step, to float tolerance, for MeZO, HiZOO, FOCUS and HZO (with its FO step)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose
from fo_helpers import batch

from zoexp.closure import Counters, make_closure
from zoexp.methods import build_method
from zoexp.scoring import Encoder
from zoexp.training import SettingsError, accumulation_steps

ZO_METHODS = [
    ("mezo", ["method.lr=1e-3"]),
    ("hizoo", ["method.lr=1e-3", "method.hessian_smooth=0.1"]),
    ("focus", ["method.lr=1e-3", "method.hessian_smooth=0.1", "method.interval=2", "method.rule=cyclic"]),
    # fo_every=1: the first-order step on the deepest block runs (accumulated) every step
    ("hzo", ["method.lr=1e-3", "method.fo_layers=1", "method.fo_every=1", "method.fo_optimizer=sgd",
             "method.fo_lr=0.05"]),
]


def _step(tiny, data_dir, method, overrides, k, loss="lm", n=16):
    """One step on a fresh copy of the tiny model: (model, step loss, the method's metrics, counters)."""
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    model.eval()
    cfg = compose([f"method={method}", *overrides])
    opt = build_method(cfg.method, model, seed=0)
    counters = Counters()
    closure = make_closure(model, Encoder(tok, 512), batch(data_dir, n), tok.pad_token_id, counters, loss, k)
    value = float(opt.step(closure))
    return model, value, opt.metrics(), counters


LOSSES = ("loss_0", "loss_plus", "loss_minus", "fo_loss")


@pytest.mark.parametrize("method,overrides", ZO_METHODS, ids=[m for m, _ in ZO_METHODS])
@pytest.mark.parametrize("loss", ["lm", "classification"])
def test_four_micro_batches_equal_the_full_batch(method, overrides, loss, tiny_opt, fixture_data_dir):
    full, loss1, info1, c1 = _step(tiny_opt, fixture_data_dir, method, overrides, 1, loss)
    parts, loss4, info4, c4 = _step(tiny_opt, fixture_data_dir, method, overrides, 4, loss)
    keys = [key for key in LOSSES if key in info1]
    assert loss4 == pytest.approx(loss1, rel=1e-6)
    for key in keys:
        assert info4[key] == pytest.approx(info1[key], rel=1e-6), key
    # g = (L+ - L-) / 2eps turns the losses' last-bit differences (~1e-7 relative: a micro-batch pads
    # to its own longest example) into ~1e-4 of g; the weights then differ by that share of the update
    assert info4["proj_grad"] == pytest.approx(info1["proj_grad"], rel=1e-3, abs=1e-3)
    with torch.no_grad():
        moved = max(float((a - s).abs().max()) for a, s in zip(full.parameters(), tiny_opt[0].parameters()))
        worst = max(float((a - b).abs().max()) for a, b in zip(full.parameters(), parts.parameters()))
    print(f"\n{method}/{loss}: max |loss diff| {max(abs(info1[k] - info4[k]) for k in keys):.1e} "
          f"(loss {loss1:.4f}), proj_grad {info1['proj_grad']:.6f} vs {info4['proj_grad']:.6f}, "
          f"max |weight diff| {worst:.1e} of a max update {moved:.1e}")
    assert moved > 0 and worst <= 1e-3 * moved + 1e-6  # 1e-6: a few ulps of weights of order 1
    # the counts see one forward pass per perturbation, whatever the number of micro-batches
    assert c1.forward_passes == c4.forward_passes and c1.tokens == c4.tokens


def test_micro_batches_really_are_smaller(tiny_opt, fixture_data_dir):
    seen = []
    model = copy.deepcopy(tiny_opt[0])
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    cfg = compose(["method=mezo"])
    opt = build_method(cfg.method, model, seed=0)
    tok = tiny_opt[1]
    opt.step(make_closure(model, Encoder(tok, 512), batch(fixture_data_dir, 16), tok.pad_token_id, Counters(),
                          "lm", 4))
    hook.remove()
    assert seen == [4] * 8  # 2 perturbations x 4 micro-batches of 4


def _cfg(*overrides):
    return compose(["model=tiny-opt", *overrides])


def test_combinations_that_do_not_work_are_refused():
    assert accumulation_steps(_cfg("method=mezo")) == 1
    assert accumulation_steps(_cfg("method=hzo", "run.accumulation_steps=4")) == 4
    with pytest.raises(SettingsError, match="method.accumulation_steps=4"):
        accumulation_steps(_cfg("method=sgd", "run.accumulation_steps=4"))
    with pytest.raises(SettingsError, match="run.offload"):
        accumulation_steps(_cfg("method=mezo", "run.accumulation_steps=4", "run.offload=true"))
    with pytest.raises(SettingsError, match="does not train"):
        accumulation_steps(_cfg("method=zero-shot", "run.accumulation_steps=2"))
    with pytest.raises(SettingsError, match="per process"):
        accumulation_steps(_cfg("method=mezo", "run.accumulation_steps=4", "run.batch_size=8"), world_size=4)


def test_a_run_records_the_accumulation_in_its_row(tmp_path, fixture_data_dir):
    from zoexp.runner import run

    cfg = _cfg("method=mezo", "task=sst2", f"data_dir={fixture_data_dir}", f"results_dir={tmp_path}",
               "run.steps=2", "run.batch_size=8", "run.accumulation_steps=4", "run.progress=false",
               "task.num_train=16", "task.num_dev=4", "task.num_test=4")
    row = run(cfg, run_dir=tmp_path / "run")
    assert row["status"] == "ok"
    assert row["train/accumulation_steps"] == 4 and row["train/micro_batch_size"] == 2
    assert row["forward_passes"] == 4  # 2 steps x 2 perturbations


def test_accumulated_dual_forward_is_refused():
    closure = make_closure(None, None, [], 0, Counters(), "lm", 2)
    with pytest.raises(ValueError, match="run.offload"):
        closure.dual(None)



@pytest.fixture
def group(tmp_path):
    """A one-process gloo group: the data-parallel wrapper around the runner's closure."""
    import torch.distributed as dist

    from zoexp.distributed import DataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield DataParallel(torch.device("cpu"), "gloo")
    finally:
        dist.destroy_process_group()


def test_data_parallel_reduces_the_accumulated_loss_once(group, tiny_opt, fixture_data_dir):
    from zoexp.distributed import loss_weight

    model, tok = tiny_opt
    encoder = Encoder(tok, 512)
    examples = batch(fixture_data_dir, 8)
    weight = loss_weight(encoder, examples)
    with torch.no_grad():
        full = make_closure(model, encoder, examples, tok.pad_token_id, Counters())()
        wrapped = group.wrap_closure(make_closure(model, encoder, examples, tok.pad_token_id, Counters(), "lm", 4),
                                     weight, weight)
        value = wrapped()
    assert float(value) == pytest.approx(float(full), rel=1e-6)
    assert group.calls == 1  # the micro-batches are summed on the rank, then one all-reduce per perturbation
    group.close()


def test_data_parallel_predictions_are_gathered_from_every_shard(group, monkeypatch):
    shards = [{"acc": 0.5, "n": 2, "predictions": [{"id": 0}, {"id": 2}]},
              {"acc": 1.0, "n": 2, "predictions": [{"id": 1}, {"id": 3}]}]
    monkeypatch.setattr(group, "all_gather", lambda obj: shards)
    combined = group.evaluate(lambda shard: shards[0], list(range(4)))
    assert combined["acc"] == 0.75 and [p["id"] for p in combined["predictions"]] == [0, 2, 1, 3]
