"""Checkpoint format and its pieces: nested state round trips, corrupt/partial checkpoints, signals."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from stateful_toys import ToyAdam
from toys import Quadratic

from zoexp.checkpoint import load_tree, save_tree
from zoexp.distributed import Single
from zoexp.methods import MeZO
from zoexp.resume import (
    Checkpointer,
    Preempted,
    PreemptionGuard,
    ResumeError,
    fingerprint,
    latest_valid,
    resume_point,
    run_identity,
    verify,
)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_nested_state_round_trips_exactly(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 7: {"h": torch.ones(2, dtype=torch.bfloat16)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 7], "name": "layers.0", "block": None}],
        "zo": {"seed": 2**62 + 5, "steps_done": 11},
        "bandit": np.array([0.25, 0.75]),
        "rng": {"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()},
        "edge": [float("-inf"), float("nan"), True, "", {"__odd": 1}, {(1, 2): "tuple key"}, torch.float16],
        "empty": torch.zeros(0, 5), "scalar": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "s.safetensors"
    save_tree(path, tree)
    assert same(tree, load_tree(path))


def test_unsupported_state_names_where_it_is(tmp_path):
    with pytest.raises(TypeError, match=r"state\.selector\.rng"):
        save_tree(tmp_path / "s.safetensors", {"selector": {"rng": object()}})


def _continue(opt_factory, model, steps_before: int, steps_after: int, tmp_path: Path):
    """Train, checkpoint the optimizer state (and weights), rebuild everything from the files, train on:
    the continuation must equal the uninterrupted run bit for bit."""
    opt = opt_factory(model.groups())
    for _ in range(steps_before):
        opt.step(model)
    save_tree(tmp_path / "opt.safetensors", opt.state_dict())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(steps_after):
        opt.step(model)
    expected = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(weights)
    fresh = opt_factory(model.groups())
    fresh.load_state_dict(load_tree(tmp_path / "opt.safetensors"))
    for _ in range(steps_after):
        fresh.step(model)
    return expected, [p.detach() for p in model.parameters()], fresh


@pytest.mark.parametrize("name", ["mezo", "toy-adam", "torch-adam"])
def test_optimizer_state_round_trip_continues_exactly(tmp_path, name):
    factories = {
        "mezo": lambda groups: MeZO(groups, lr=1e-2, eps=1e-3, seed=3, noise_threads=1),
        "toy-adam": lambda groups: ToyAdam(groups, lr=1e-2),
        # a stock torch optimizer through the same format (tuples, int keys, tensors in state)
        "torch-adam": lambda groups: _ClosureAdam(groups, lr=1e-2),
    }
    model = Quadratic()
    expected, got, fresh = _continue(factories[name], model, 3, 4, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    if name == "mezo":
        assert fresh.steps_done == 7 and fresh.seed == 3
    if name == "toy-adam":
        assert len(fresh.history) == 7 and fresh.visits[7] == "step 7"


class _ClosureAdam(torch.optim.Adam):
    def step(self, closure):
        with torch.enable_grad():
            self.zero_grad()
            loss = closure()
            loss.backward()
        super().step()
        return loss


# --------------------------------------------------------------------------- checkpoint directories


class _Cfg:
    """The few config keys Checkpointer reads, without composing the whole config."""

    @staticmethod
    def make(every=2, keep=2):
        from omegaconf import OmegaConf

        return OmegaConf.create({"run": {"checkpoint_every": every, "checkpoint_keep": keep, "seed": 0},
                                 "method": {"lr": 0.1}})


def _save(ckpt, step, model, opt):
    return ckpt.save(step, model, opt, {"step": step, "note": "x"}, keeper=None)


def _setup(tmp_path, keep=3):
    model = Quadratic()
    opt = ToyAdam(model.groups(), lr=1e-2)
    ckpt = Checkpointer(tmp_path, _Cfg.make(keep=keep), Single(torch.device("cpu")))
    for step in (2, 4, 6):
        opt.step(model)
        _save(ckpt, step, model, opt)
    return model, opt, ckpt


def test_newest_valid_checkpoint_is_found_and_old_ones_pruned(tmp_path):
    model, opt, ckpt = _setup(tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]
    path, skipped = latest_valid(tmp_path)
    assert path.name == "step-00000006" and not skipped
    manifest = verify(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "trainer.safetensors"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "missing-file"])
def test_corrupt_or_partial_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    model, opt, ckpt = _setup(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000006"
    target = newest / "optimizer.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-16])
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    # a half-written directory (killed during a save) is never a candidate either
    (tmp_path / "checkpoints" / "step-00000008.tmp").mkdir()
    path, skipped = latest_valid(tmp_path)
    assert path.name == "step-00000004"
    assert len(skipped) == 1 and "step-00000006" in skipped[0]

    # restoring it gives back exactly the state saved at step 4, and drops the abandoned newer one
    fresh_model = Quadratic(seed=9)
    fresh_opt = ToyAdam(fresh_model.groups(), lr=1e-2)
    trainer = ckpt.restore(path, fresh_model, fresh_opt, keeper=None)
    assert trainer["step"] == 4 and len(fresh_opt.history) == 2
    assert not newest.exists()


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    from omegaconf import OmegaConf

    model, opt, ckpt = _setup(tmp_path)
    cfg = OmegaConf.merge(_Cfg.make(), {"run": {"resume": "auto"}, "method": {"lr": 0.2}})
    with pytest.raises(ResumeError, match=r"method\.lr: 0\.1 -> 0\.2"):
        resume_point(cfg, tmp_path, Single(torch.device("cpu")))
    # placement keys may change between a run and its continuation
    cfg = OmegaConf.merge(_Cfg.make(every=5), {"run": {"resume": "auto", "device": "cpu"}})
    assert run_identity(cfg) == run_identity(_Cfg.make())
    assert resume_point(cfg, tmp_path, Single(torch.device("cpu"))).checkpoint.name == "step-00000006"
    # run.resume=never in a directory that holds checkpoints is refused rather than overwritten
    cfg = OmegaConf.merge(_Cfg.make(), {"run": {"resume": "never"}})
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        resume_point(cfg, tmp_path, Single(torch.device("cpu")))


def test_finished_run_is_returned_not_rerun(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(_Cfg.make(), {"run": {"resume": "auto"}})
    done = {"status": "ok", "test/acc": 0.75, "config_fingerprint": fingerprint(run_identity(cfg))}
    (tmp_path / "result.json").write_text(json.dumps(done))
    assert resume_point(cfg, tmp_path, Single(torch.device("cpu"))).finished["test/acc"] == 0.75
    # the finished run of another configuration in the same directory is refused, never overwritten
    other = OmegaConf.merge(cfg, {"method": {"lr": 0.5}})
    with pytest.raises(ResumeError, match="another configuration"):
        resume_point(other, tmp_path, Single(torch.device("cpu")))
    # run.resume=never would overwrite the finished run: refused too
    with pytest.raises(ResumeError, match="run.resume=never"):
        resume_point(OmegaConf.merge(cfg, {"run": {"resume": "never"}}), tmp_path, Single(torch.device("cpu")))


# --------------------------------------------------------------------------- signals


def test_armed_guard_defers_the_signal_and_chains_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        guard = PreemptionGuard()
        with guard:
            with guard.armed():
                os.kill(os.getpid(), signal.SIGUSR2)
                assert guard.requested and guard.signum == signal.SIGUSR2 and not seen
        guard.chain()  # e.g. submitit's requeue handler
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_unarmed_or_second_signal_interrupts_at_once():
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard()
    with guard:
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
    guard = PreemptionGuard()
    with guard, guard.armed():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the run


def test_an_immediate_stop_names_the_phase_it_stopped_in():
    guard = PreemptionGuard()
    with guard:
        with pytest.raises(Preempted, match="SIGTERM while setting up; no checkpoint"):
            os.kill(os.getpid(), signal.SIGTERM)
    guard = PreemptionGuard()
    with guard, guard.armed("the test evaluation", "finishing it"):
        os.kill(os.getpid(), signal.SIGTERM)  # deferred
        assert guard.requested and guard.deferred_phase == "during the test evaluation"
        with pytest.raises(Preempted, match="SIGTERM during the test evaluation; no checkpoint"):
            os.kill(os.getpid(), signal.SIGTERM)  # the second one stops at once
