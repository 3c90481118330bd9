"""Slow: SmolLM2-135M zero-shot and ICL on real data, 200 test examples per task, end to end, rows written.

    ZOEXP_SLOW_RESULTS=results/tasks-smollm2.jsonl make test-slow    # keep the rows (default: a temp dir)

ICL follows MeZO: 32 demonstrations and a 2,048-token context (MeZO's max_length); demonstrations that do
not fit are dropped from the front, and the row records how many were used. SQuAD's ICL is capped at 4
demonstrations to keep the CPU run short (recorded in the row too).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import compose, shared_data_dir

from zoexp.runner import run

TASKS = ["sst2", "rte", "cb", "boolq", "copa", "wic", "wsc", "multirc", "squad"]
ICL_K = {"squad": 4}
AVAILABLE = {"cb": 56, "copa": 100, "wsc": 104}  # validation rows, fewer than 200

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    path = os.environ.get("ZOEXP_SLOW_RESULTS")
    return Path(path) if path else tmp_path_factory.mktemp("real") / "runs.jsonl"


@pytest.mark.parametrize("method", ["zero-shot", "icl"])
@pytest.mark.parametrize("task", TASKS)
def test_real_model_on_real_data(task, method, results_file, tmp_path):
    data = shared_data_dir()
    if data is None:
        pytest.skip("no benchmark data (ZOEXP_DATA_DIR or ../shared/data)")
    overrides = ["model=smollm2-135m", f"task={task}", f"method={method}", "task.num_test=200",
                 f"data_dir={data}", f"run.results_file={results_file}", "run.progress=false",
                 "experiment_name=issue3-task-table"]
    if method == "icl":
        overrides += ["run.max_length=2048", f"method.demonstrations={ICL_K.get(task, 32)}"]
    row = run(compose(overrides), run_dir=tmp_path)
    assert row["status"] == "ok" and row["task_version"] == 1
    assert row["test/n"] == AVAILABLE.get(task, 200)
    metric = row["test/f1"] if task == "squad" else row["test/acc"]
    assert math.isfinite(metric) and 0.0 <= metric <= 1.0
    if method == "icl":
        assert row["icl/demonstrations"] == ICL_K.get(task, 32) and row["icl/demonstrations_mean"] >= 1
    assert results_file.is_file()
