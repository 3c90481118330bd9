"""Every config in every group composes; every method instantiates on toy parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO, compose
from toys import Quadratic

from zoexp.methods import build_method
from zoexp.tasks import Task, available_tasks

GROUPS = {group: sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
          for group in ("model", "method", "run")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None
    assert cfg.run.results_file.endswith("runs.jsonl")


@pytest.mark.parametrize("task", available_tasks())
def test_every_task_composes_and_compiles(task):
    cfg = compose([f"task={task}"])
    assert cfg.task.name == task and cfg.task.version is not None
    Task.from_config(cfg.task)


# the toy has a single block: hybrids keep it zeroth-order (their FO part is tested in test_hzo.py)
TOY_OVERRIDES = {"hzo": ["method.fo_layers=0"], "loho": ["method.fo_layers=0"]}


@pytest.mark.parametrize("method", GROUPS["method"])
def test_every_method_instantiates_on_toy_parameters(method, request):
    cfg = compose([f"method={method}", *TOY_OVERRIDES.get(method, [])])
    if "target_modules" in cfg.method:  # adapter methods (LoRA) need linear layers to attach to
        tiny = copy.deepcopy(request.getfixturevalue("tiny_opt")[0])
        ids = torch.tensor([[1, 2, 3, 4]])
        model, closure = tiny, (lambda: tiny(input_ids=ids, labels=ids).loss)
    else:
        q = Quadratic()
        model, closure = _ToyModel(q), q
    opt = build_method(cfg.method, model, seed=0)
    if opt is None:
        assert not cfg.method.get("_target_")
        return
    assert opt.forward_passes_per_step >= 1
    assert opt.state_bytes() >= 0
    loss = opt.step(closure)
    assert float(loss) == float(loss)  # finite, not NaN


class _ToyModel(Quadratic.__base__):
    """A module whose param groups are the quadratic's (build_method asks the model for its blocks)."""

    def __init__(self, q):
        super().__init__()
        self.q = q


@pytest.fixture(autouse=True)
def _toy_groups(monkeypatch):
    import zoexp.models

    original = zoexp.models.param_groups
    monkeypatch.setattr(zoexp.models, "param_groups",
                        lambda model, **kw: model.q.groups() if isinstance(model, _ToyModel) else original(model, **kw))


def test_unknown_choice_lists_valid_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose(["method=nope"])
    assert "mezo" in str(err.value) and "zero-shot" in str(err.value)
