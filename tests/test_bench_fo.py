"""The benchmark's memory columns for first-order methods: exact state and gradient bytes, d, theory."""

from __future__ import annotations

from conftest import compose

from zoexp.bench import THEORY, measure, peak_over_d, table


def bench_row(method: str, data_dir, *overrides: str) -> dict:
    cfg = compose(["model=tiny-opt", f"method={method}", "run.batch_size=4", "bench.repeats=1", "bench.warmup=0",
                   f"data_dir={data_dir}", *overrides], config_name="bench")
    return measure(cfg)


def test_first_order_rows_carry_state_gradient_and_model_bytes(fixture_data_dir):
    zero = bench_row("zero-shot", fixture_data_dir)
    badam = bench_row("badam", fixture_data_dir)
    d = zero["model_bytes"]
    assert d == badam["model_bytes"] > 0 and zero["mem/runtime_rss_bytes"] > 0
    # tiny-opt: 4 layers of (4·64·64+4·64 attention, 64·128+128+128·64+64 MLP, 4·64 norms) fp32 parameters
    layer = 4 * (4 * 64 * 64 + 4 * 64 + 64 * 128 + 128 + 128 * 64 + 64 + 4 * 64)
    assert badam["optimizer_grad_bytes_max"] == layer  # one active block's gradients, nothing else
    assert badam["optimizer_state_bytes"] == 2 * layer + 4 * 16  # Adam moments + 16 step counters
    assert badam["trainable_params"] == 4 * (layer // 4)  # numel of all four layers (trained one at a time)
    # in-process (a pytest process already holding earlier tests' memory) the tiny model may not grow the
    # RSS at all, so only the formula is checked here; zoexp-bench measures each method in a fresh process
    assert peak_over_d(badam) is not None and peak_over_d(badam) >= 0
    assert peak_over_d({"model_bytes": 100, "step_s": 1.0, "mem/train_rss_peak_bytes": 1250,
                        "mem/runtime_rss_bytes": 1000}) == 2.5
    assert peak_over_d({"model_bytes": 100, "mem/inference_gpu_allocated_peak_bytes": 300,
                        "mem/inference_rss_peak_bytes": 9999, "mem/runtime_rss_bytes": 1}) == 3.0
    md = table([zero, badam])
    assert "FOCUS Table 1" in md and THEORY["badam"] in md and "state + grad (MiB)" in md
