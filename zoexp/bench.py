"""`zoexp-bench`: forward time, step time, overhead ratio and peak memory per method, side by side.

    zoexp-bench                                  # methods of conf/bench.yaml on the default model/task
    zoexp-bench bench.methods=[zero-shot,mezo] model=smollm2-135m run.batch_size=16

Every method is measured in its own fresh process (so one method's memory never shows up in another's
peak) on the same batch of real task examples: the median of ``bench.repeats`` forward passes (no grad),
then the median of ``bench.repeats`` optimizer steps after ``bench.warmup`` untimed ones.
The overhead ratio is step / (forward passes per step x forward): 1.0 is the physical floor of a ZO step.
Rows go to ``bench.output`` (JSON lines) and the table to ``bench.markdown``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from zoexp.configs import register_tasks
from zoexp.paths import conf_dir


def measure(cfg: DictConfig) -> dict:
    """Measure one method in this process (the child side)."""
    import torch

    from zoexp.closure import Counters, make_closure, seed_everything
    from zoexp.measure import Meter, current_rss, device_name
    from zoexp.methods import build_method
    from zoexp.models import load_model, resolve_device, resolve_dtype
    from zoexp.scoring import Encoder
    from zoexp.tasks import Task

    load_start = os.getloadavg()
    if cfg.bench.get("threads"):
        torch.set_num_threads(int(cfg.bench.threads))
    seed = int(cfg.run.seed)
    seed_everything(seed)
    device = resolve_device(cfg.run.device)
    meter = Meter(device)
    task = Task.from_config(cfg.task)
    batch_size = int(cfg.run.batch_size)
    data = task.sample(seed, data_dir=cfg.get("data_dir"), num_train=batch_size, num_dev=0, num_test=0)
    runtime_rss = current_rss()  # the process before the model exists: interpreter, torch, data
    offload = bool(cfg.run.get("offload", False))
    with meter.phase("load"):
        model, tok = load_model(cfg.model, dtype=resolve_dtype(cfg.run.dtype),
                                device=torch.device("cpu") if offload else device)
    optimizer = offloader = None
    if offload:  # the method decides which layers stay on the device, so it is built first
        from zoexp.offload import enable_offload

        optimizer = build_method(cfg.method, model, seed=seed)
        offloader = enable_offload(model, optimizer, device, ring=int(cfg.run.get("offload_ring", 3)))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # d, in bytes
    encoder = Encoder(tok, max_length=int(cfg.run.get("max_length") or 2048))
    batch = data.train[:batch_size]
    seq_len = cfg.bench.get("seq_len")
    if seq_len:
        batch = [_fixed_length(ex, tok, int(seq_len)) for ex in batch]
    counters = Counters()
    closure = make_closure(model, encoder, batch, tok.pad_token_id, counters)
    tokens = sum(len(encoder.encode(ex.prompt, ex.target)[0]) for ex in batch)
    repeats, warmup = int(cfg.bench.repeats), int(cfg.bench.warmup)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    forward_times, forward_cpu = [], []
    with meter.phase("inference"), torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            closure()
            sync()
            if i >= warmup:
                forward_times.append(time.perf_counter() - t0)
                forward_cpu.append(time.process_time() - c0)
    row = {
        "kind": "bench", "method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name,
        "dtype": cfg.run.dtype, "device": device_name(device), "batch_size": len(batch), "batch_tokens": tokens,
        "seq_len": seq_len, "forward_s": statistics.median(forward_times), "forward_s_all": forward_times,
        "model_bytes": model_bytes, "mem/runtime_rss_bytes": runtime_rss,
        "forward_cpu_s": statistics.median(forward_cpu), "threads": torch.get_num_threads(),
        "hparams": {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if not k.startswith("_")},
    }
    if offloader is not None:
        row.update(offloader.device_bytes(), offload=True)
    else:
        optimizer = build_method(cfg.method, model, seed=seed)
    if optimizer is not None:
        model.train(optimizer.train_mode)
        step_times, step_cpu = [], []
        with meter.phase("train"):
            for i in range(warmup + repeats):
                before = counters.forward_passes
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                optimizer.step(closure)
                sync()
                if i >= warmup:
                    step_times.append(time.perf_counter() - t0)
                    step_cpu.append(time.process_time() - c0)
                passes = counters.forward_passes - before
        step_s = statistics.median(step_times)
        row.update({
            "step_s": step_s, "step_s_all": step_times, "forward_passes_per_step": passes,
            "overhead_ratio": step_s / (passes * row["forward_s"]),
            "step_cpu_s": statistics.median(step_cpu),
            "overhead_ratio_cpu": statistics.median(step_cpu) / (passes * row["forward_cpu_s"]),
            "tokens_per_s": passes * tokens / step_s,
            "optimizer_state_bytes": optimizer.state_bytes(),
            "optimizer_grad_bytes_max": getattr(optimizer, "grad_bytes_max", 0),
            "trainable_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        })
        if hasattr(optimizer, "draws_per_step"):  # random numbers drawn per ZO step (z or U, V factors)
            row["draws_per_step"] = optimizer.draws_per_step()
        noise = getattr(optimizer, "noise", None)
        if noise is not None:  # where a ZO step's time goes besides the forwards: one pass of z
            impl = getattr(noise, "implementation", None)  # (older NoiseSource: torch's generator only)
            row["noise"] = impl(device) if impl else "torch"
            row.update(_z_pass(optimizer, repeats, sync))
    row.update(meter.values)
    row["load_avg"] = [round(x, 2) for x in (*load_start, *os.getloadavg())]  # 1/5/15 min at start, at end
    return row


def _z_pass(optimizer, repeats: int, sync) -> dict:
    """Seconds (wall and CPU) of one ``noise.add_`` pass of z over every parameter the method holds --
    the unit a ZO step repeats (MeZO: 3 per step). It moves the weights; the measuring process ends here."""
    import torch

    items = list(optimizer.keyed_params())
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            optimizer.noise.add_(items, 1000 + i, 1e-3)
            sync()
            if i:  # the first pass may still pay one-off costs
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    return {"z_pass_s": statistics.median(wall), "z_pass_cpu_s": statistics.median(cpu),
            "z_pass_numel": sum(p.numel() for _, p in items)}


def _fixed_length(ex, tok, seq_len: int):
    """Pad/truncate the prompt so that prompt + target is exactly ``seq_len`` tokens (synthetic lengths)."""
    from zoexp.tasks import Example

    words = ex.prompt.split()
    while len(tok(" ".join(words) + ex.target)["input_ids"]) < seq_len:
        words = words + words
    prompt = " ".join(words)
    ids = tok(prompt + ex.target)["input_ids"]
    if len(ids) > seq_len:
        keep = tok(prompt)["input_ids"][len(ids) - seq_len:]
        prompt = tok.decode(keep)
    return Example(id=ex.id, prompt=prompt, candidates=ex.candidates, label=ex.label, answers=ex.answers)


# FOCUS Table 1, "theoretical average memory" in units of d (the bytes of the model's weights).
THEORY = {"zero-shot": "d (inference)", "mezo": "d", "hizoo": "2d", "focus": "≈ d", "sgd": "3d",
          "bcd-sgd": "d < m < 3d", "badam": "d < m < 3d", "lora": "d < m < 3d"}


def peak_over_d(r: dict) -> float | None:
    """Training-phase peak attributable to the model, in units of d: GPU allocated bytes / d, or on CPU
    (peak RSS − RSS of the process before loading the model) / d."""
    d = r.get("model_bytes")
    if not d:
        return None
    phase = "train" if "step_s" in r else "inference"
    gpu = r.get(f"mem/{phase}_gpu_allocated_peak_bytes")
    if gpu is not None:
        return gpu / d
    rss, runtime = r.get(f"mem/{phase}_rss_peak_bytes"), r.get("mem/runtime_rss_bytes")
    return (rss - runtime) / d if rss and runtime is not None else None


def timing_table(rows: list[dict]) -> str:
    """Where the time goes, per method: wall and process-CPU seconds, and the noise implementation.

    On a shared machine wall time includes waiting for the CPU; the CPU-time ratio (step CPU seconds /
    forward passes x forward CPU seconds, all threads together) is less sensitive to other processes.
    """
    head = ["method", "noise", "threads", "forward s (CPU s)", "step s (CPU s)", "ratio (CPU-time ratio)",
            "z pass s (CPU s)", "ns / number (CPU)", "load avg at start / end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        load = r.get("load_avg") or []
        cells = [
            r["method"], r.get("noise", "—"), str(r.get("threads", "—")),
            f"{r['forward_s']:.3f} ({r['forward_cpu_s']:.3f})" if "forward_cpu_s" in r else f"{r['forward_s']:.3f}",
            f"{r['step_s']:.3f} ({r['step_cpu_s']:.3f})" if "step_cpu_s" in r else "—",
            f"{r['overhead_ratio']:.2f} ({r['overhead_ratio_cpu']:.2f})" if "overhead_ratio_cpu" in r else "—",
            f"{r['z_pass_s']:.3f} ({r['z_pass_cpu_s']:.3f})" if "z_pass_s" in r else "—",
            f"{1e9 * r['z_pass_cpu_s'] / r['z_pass_numel']:.2f}" if r.get("z_pass_numel") else "—",
            f"{load[0]:.1f} / {load[3]:.1f}" if len(load) == 6 else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown table, one line per method; memory ratios against the zero-shot inference peak."""
    base = next((r for r in rows if r["method"] == "zero-shot"), None)
    base_mem = base.get("mem/inference_rss_peak_bytes") if base else None
    gpu = any("mem/train_gpu_allocated_peak_bytes" in r for r in rows)
    head = ["method", "fwd/step", "forward s", "step s", "overhead ratio", "tokens/s",
            "peak train RSS (MiB)", "vs inference", "optimizer state (MiB)"]
    head += ["grad max (MiB)", "state + grad (MiB)", "peak / d", "FOCUS Table 1"]
    if gpu:
        head += ["peak train GPU alloc (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        train_mem = r.get("mem/train_rss_peak_bytes") or r.get("mem/inference_rss_peak_bytes")
        state, grad = r.get("optimizer_state_bytes", 0), r.get("optimizer_grad_bytes_max", 0)
        ratio_d = peak_over_d(r)
        cells = [
            r["method"], str(r.get("forward_passes_per_step", "—")), f"{r['forward_s']:.3f}",
            f"{r['step_s']:.3f}" if "step_s" in r else "—",
            f"{r['overhead_ratio']:.2f}" if "overhead_ratio" in r else "—",
            f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else f"{r['batch_tokens'] / r['forward_s']:.0f}",
            f"{train_mem / 2**20:.0f}",
            f"{train_mem / base_mem:.2f}" if base_mem else "—",
            f"{state / 2**20:.1f}",
            f"{grad / 2**20:.1f}", f"{(state + grad) / 2**20:.1f}",
            f"{ratio_d:.2f}" if ratio_d is not None else "—",
            THEORY.get(r["method"], "—"),
        ]
        if gpu:
            cells.append(f"{r.get('mem/train_gpu_allocated_peak_bytes', r.get('mem/inference_gpu_allocated_peak_bytes', 0)) / 2**20:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


register_tasks()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="bench")
def _main(cfg: DictConfig):
    from rich.console import Console

    from zoexp.results import append_row, git_commit, versions

    child = cfg.bench.get("child")
    if child:
        Path(child).write_text(json.dumps(measure(cfg)))
        return
    console = Console()
    overrides = [a for a in sys.argv[1:] if not a.startswith(("bench.methods", "method=", "hydra."))]
    rows = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for method in cfg.bench.methods:
        console.print(f"[bold]measuring {method}[/bold] ({cfg.model.name}, batch {cfg.run.batch_size}, {cfg.run.dtype})")
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            out = fh.name
        cmd = [sys.executable, "-m", "zoexp.bench", f"method={method}", *overrides, f"+bench.child={out}",
               "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            console.print(f"[red]{method} failed (exit {proc.returncode})")
            continue
        row = json.loads(Path(out).read_text())
        os.unlink(out)
        row.update(bench_id=stamp, git_commit=git_commit(), versions=versions())
        rows.append(row)
        append_row(cfg.bench.output, row)
    md = table(rows)
    Path(cfg.bench.markdown).parent.mkdir(parents=True, exist_ok=True)
    # README-ready: the command, the machine and its load, then the tables
    command = " ".join(["zoexp-bench", *sys.argv[1:]])
    device = rows[0]["device"] if rows else "?"
    commit = rows[0].get("git_commit") if rows else None
    md = (f"`{command}` — {device}, {stamp}" + (f", commit {commit[:8]}" if commit else "") + "\n\n"
          f"{md}\n\n{timing_table(rows)}")
    Path(cfg.bench.markdown).write_text(f"<!-- zoexp-bench {' '.join(sys.argv[1:])} @ {stamp} on {device} -->\n{md}\n")
    console.print(md)
    console.print(f"rows: {cfg.bench.output} · table: {cfg.bench.markdown}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
