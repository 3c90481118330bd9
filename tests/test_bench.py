"""zoexp-bench end to end on a tiny model: one row per method with the timing fields, README-ready markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_writes_rows_and_markdown(tmp_path, fixture_data_dir):
    cmd = [sys.executable, "-m", "zoexp.bench", "model=tiny-llama", "run.batch_size=2", "bench.repeats=1",
           "bench.warmup=0", "bench.threads=1", "bench.methods=[zero-shot,mezo]", f"data_dir={fixture_data_dir}",
           f"results_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    assert set(rows) == {"zero-shot", "mezo"}
    mezo = rows["mezo"]
    assert mezo["forward_passes_per_step"] == 2 and mezo["threads"] == 1
    assert mezo["noise"] in ("philox-kernel", "torch")
    for key in ("forward_s", "forward_cpu_s", "step_s", "step_cpu_s", "overhead_ratio", "overhead_ratio_cpu",
                "z_pass_s", "z_pass_cpu_s", "tokens_per_s", "optimizer_state_bytes"):
        assert mezo[key] >= 0, key
    assert mezo["z_pass_numel"] > 0
    assert len(mezo["load_avg"]) == 6
    md = (tmp_path / "bench.md").read_text()
    assert "`zoexp-bench model=tiny-llama" in md and "| mezo |" in md and "z pass s" in md
