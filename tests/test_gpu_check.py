"""The GPU check (tools/gpu_check.py, docs/gpu.md) cannot rot before a GPU is lent: its dry mode runs the
same code path on CPU with tiny shapes (``make gpu-check DRY=1``), and what travels stays under 64 MiB."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402
import gpu_pack  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's zoexp, as `make gpu-check DRY=1` runs it
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry", "--out", str(out),
                           "--budget-s", "900"], capture_output=True, text=True, env=env, timeout=900)
    return proc, out


def test_dry_run_passes_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    entries = doc["entries"]
    bad = [(e["name"], e["status"], e.get("reason")) for e in entries if e["status"] not in ("ok", "skipped")]
    assert not bad, bad
    assert {e["part"] for e in entries} == {"a", "b", "c", "d", "e"}
    skipped = [e["name"] for e in entries if e["status"] == "skipped"]
    assert skipped == ["upload/compute/offload overlap (CUDA events)"]  # the one CUDA-only measurement
    bench = {e.get("method") for e in entries if e["part"] == "b"}
    assert bench == set(gpu_check.BENCH_METHODS) | {"sgd", None}  # sgd: FOCUS Table 2; None: its ratios
    assert any(e["name"].startswith("FOCUS Table 2 ratios") and e["status"] == "ok" for e in entries)
    table4 = [e for e in entries if e["name"].startswith("HZO Table 4")]
    assert table4 and table4[0]["hzo_run"] == "offloaded (part c)" and table4[0]["hzo_over_mezo_tokens_per_s"] > 0
    assert {e["offload"] for e in entries if e["part"] == "c" and "offload" in e} == {True, False}
    assert doc["meta"]["mode"].startswith("dry")
    assert "## b. Paper-shaped benchmark" in (out / "gpu_check.md").read_text()


def test_every_bench_row_says_what_became_of_the_memory_prediction(dry_run):
    _, out = dry_run
    rows = [e for e in json.loads((out / "gpu_check.json").read_text())["entries"] if e["part"] in "bc"
            and "prediction" in e]
    assert rows
    for e in rows:  # either a prediction or the reason it is unavailable -- never silence
        assert e["prediction"] == "ok" or e["prediction"].startswith("prediction unavailable: ")
        if e["prediction"] == "ok":
            assert e["predicted_peak_bytes"] > 0


def test_intervals_and_budget():
    assert gpu_check._union([(0, 2), (1, 3), (5, 6)]) == [(0, 3), (5, 6)]
    assert gpu_check._intersection([(0, 3)], [(2, 5), (1, 1.5)]) == pytest.approx(1.5)
    budget = gpu_check.Budget(10.0)
    budget.begin_part(0.1, 0.0)
    with pytest.raises(gpu_check.OutOfTime):
        budget.check(5.0)


def test_paper_shapes_have_the_published_parameter_counts():
    # OPT-1.3B and OPT-13B as published (facebook/opt-*: 1.316e9 and 12.853e9 parameters)
    assert gpu_check.param_count("opt-1.3b", gpu_check.OPT_VOCAB) == pytest.approx(1.3158e9, rel=1e-3)
    assert gpu_check.param_count("opt-13b", gpu_check.OPT_VOCAB) == pytest.approx(12.853e9, rel=1e-3)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_what_travels_leaves_room_for_the_pack():
    sizes = gpu_pack.travelling_bytes()
    pack = 50 * 2**20  # wheels (0.5 MiB) + the 8-layer SmolLM2 GGUF (47.3 MiB) + SST-2 rows
    assert sizes["tracked"] + sizes["untracked"] + pack <= gpu_pack.LIMIT, sizes


class _Tick:
    """A stand-in timing event: record() stamps the next tick; elapsed_time as torch.cuda.Event's."""

    clock = 0

    def record(self, stream=None):
        _Tick.clock += 1
        self.t = _Tick.clock

    def elapsed_time(self, other) -> float:
        return float(other.t - self.t)


def test_timeline_pairs_each_stream_s_waits_with_its_completions():
    """The calls BlockOffloader makes for one layer (upload, acquire, release dirty) give one interval
    per stream, each from the last wait before the work to the completion record after it."""
    upload, offload, compute = object(), object(), object()
    loaded, done, free_, host_ready = object(), object(), object(), object()

    class Base:
        def wait(self, stream, event): pass
        def record(self, event, stream): pass

    base = Base()
    base.upload, base.offload = upload, offload

    class Off:
        _loaded, _done, _host_ready = [loaded], [done], {0: host_ready}

    t0 = _Tick()
    t0.record()
    tl = gpu_check._Timeline(base, Off(), event_factory=_Tick)
    tl.wait(upload, free_)           # _upload: slot free ...
    tl.wait(upload, host_ready)      # ... and host copy final: the copy starts here
    tl.record(loaded, upload)        # copy done
    tl.wait(compute, loaded)         # acquire: compute waits for the upload
    tl.record(done, compute)         # release: compute done
    tl.wait(offload, done)           # offload waits for compute
    tl.record(host_ready, offload)   # copy back done
    tl.record(free_, offload)        # slot free: not a completion of work
    iv = tl.intervals(t0)
    assert iv == {"upload": [(2.0, 3.0)], "compute": [(4.0, 5.0)], "offload": [(6.0, 7.0)]}
