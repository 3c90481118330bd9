"""docs/extending.md runs as written: its `# file:` blocks are written out and its zoexp command is run
(in this process, on the tiny model and the fixture SST-2 data)."""

from __future__ import annotations

import re
import shlex
import sys

from conftest import REPO, compose

from zoexp.results import read_rows
from zoexp.runner import run

GUIDE = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def guide_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(GUIDE.read_text())]


def test_guide_has_a_method_a_task_and_a_command():
    files = [body.splitlines()[0] for _, body in guide_blocks() if body.startswith("# file:")]
    assert any(f.endswith(".py") for f in files)
    assert any("/method/" in f for f in files) and any("/task/" in f for f in files)
    assert any(lang == "bash" and "\nzoexp " in "\n" + body for lang, body in guide_blocks())


def test_guide_example_runs(tmp_path, fixture_data_dir, monkeypatch):
    command = None
    for lang, body in guide_blocks():
        first = body.splitlines()[0]
        if first.startswith("# file:"):
            path = tmp_path / first.split(":", 1)[1].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
        elif lang == "bash":
            command = next(line for line in body.splitlines() if line.startswith("zoexp "))
    assert command is not None
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))  # the guide's `export PYTHONPATH=$PWD/extra`
    overrides = shlex.split(command.replace("$PWD", str(tmp_path)))[1:]
    cfg = compose([*overrides, f"data_dir={fixture_data_dir}", f"results_dir={tmp_path / 'results'}"])
    try:
        row = run(cfg, run_dir=tmp_path / "run")
    finally:
        sys.modules.pop("my_methods", None)
    assert row["status"] == "ok", row.get("message")
    assert (row["method"], row["task"], row["task_version"]) == ("zo-sign", "sst2-review", 1)
    assert row["steps"] == 4 and row["forward_passes"] == 8 and row["optimizer_state_bytes"] == 0
    assert row["hparams"] == {"lr": 1e-4, "eps": 1e-3}
    assert len(row["code_version"]) == 12  # the guide's module and zoexp's Method (zoexp.provenance)
    assert 0 <= row["test/acc"] <= 1 and row["test/n"] == 8
    assert all("proj_grad" in point for point in row["curve"])
    assert read_rows(tmp_path / "results" / "runs.jsonl")[-1]["method"] == "zo-sign"


def test_guide_method_moves_each_weight_by_lr():
    """The guide's update rule as its docstring states it: every weight moves by exactly ±lr."""
    import torch

    namespace: dict = {}
    code = next(body for lang, body in guide_blocks() if lang == "python")
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 -- the repository's own docs
    w = torch.nn.Parameter(torch.zeros(3, 4))
    opt = namespace["ZOSignSGD"]([{"params": [w]}], lr=0.5, eps=1e-2, seed=1)
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    loss = opt.step(lambda: ((w - target) ** 2).sum())
    assert torch.isfinite(loss) and opt.steps_done == 1
    assert torch.allclose(w.detach().abs(), torch.full((3, 4), 0.5), atol=1e-6)
