"""One prepared GPU check (issue #19): what the papers claim on GPUs, measured the first time one is lent.

    bash tools/gpu_check.sh                         # on the lent GPU (the device tool); results in $OUT
    make gpu-check DRY=1                            # the same code path on CPU, tiny shapes, seconds
    python tools/gpu_check.py --dry --out DIR       # what `make gpu-check DRY=1` runs

Five parts, each with its own time budget (an entry that would start after its part's budget, or the
whole budget, is written as skipped, with the reason):

  a  the CUDA test subset: offloaded == plain with streams and pinned memory; fp16 and bf16 steps of
     MeZO, HiZOO, FOCUS and HZO; restore exactness in fp16; upload/compute/offload overlap read from
     CUDA events;
  b  the benchmark on paper-shaped OPT models (OPT-1.3B and OPT-13B dims, random weights, fp16):
     forward and step time, overhead ratio, tokens/s, torch.cuda.max_memory_allocated against
     ``zoexp.memory.predict`` (the fake-tensor prediction; 'prediction unavailable: ...' if absent);
     FOCUS Table 2's runs (OPT-1.3B, ZO batch 8, SGD batch 2) and its claims as ratios to MeZO;
  c  HZO with offloading on the largest OPT shape whose host copy fits the machine's memory: device
     peak and tokens/s, against the non-offloaded run where that fits on the device;
  d  a short real-weights run: SmolLM2-135M truncated to its first layers (its own quantised tensors,
     packed by tools/gpu_pack.py, small enough to travel) on real SST-2 examples;
  e  zoexp.distributed's all-reduce closure on a one-rank nccl group (last: a hang loses nothing).

Paper-shaped models are built from ``transformers.OPTConfig`` on the meta device and materialised
directly on the target device in the target dtype (speed and memory do not depend on weight values);
the offloaded model's host copy gives every layer the values of layer 0 (one layer of host memory
besides the pinned buckets). Batches are synthetic: one token per word through a word tokenizer that
takes the Encoder's slow-tokenizer path, so the real closures (``zoexp.closure.make_closure``, the
offloaded dual forward) run without any tokenizer files.

Everything measured goes to DIR/gpu_check.json and DIR/gpu_check.md, rewritten after every entry: a run
stopped at its time limit still leaves what it had measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

GiB = 2**30
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# OPT dims (hidden, layers, heads, ffn) as in the facebook/opt-* configs; vocabulary 50272, 2048 positions.
OPT_SHAPES = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
    "tiny-opt": (64, 4, 4, 128),  # conf/model/tiny-opt.yaml's dims (its vocabulary is SmolLM2's, 49152; the dry run's 512)
}
OPT_VOCAB = 50272
TINY_VOCAB = 512  # the dry run: a small vocabulary keeps the LM head and the noise passes cheap

# The machine the device tool lends (KINDS.md): one H200, 128 GiB of host memory (its RAM may start
# smaller and grow as used, so MemTotal is not read on it).
LENT_HOST_RAM = 128 * GiB

BENCH_METHODS = ["zero-shot", "mezo", "hizoo", "focus", "hzo", "adam"]
# FOCUS Table 2 (OPT-1.3B, SST-2): ZO methods at batch 8, first-order at batch 2; its runtime column is
# 20,000 steps' wall-clock, and its claims are ratios to MeZO: HiZOO +81.6 % time and +72 % memory,
# FOCUS −7 % time at about MeZO's memory
FOCUS_TABLE2_RUNS = [(["zero-shot", "mezo", "hizoo", "focus"], 8), (["sgd"], 2)]
FOCUS_TABLE2_STEPS = 20000
FOCUS_TABLE2_MINUTES = {"mezo": 54 + 55 / 60, "hizoo": 99 + 44 / 60, "focus": 51 + 38 / 60, "sgd": 4 + 5 / 60}
FOCUS_TABLE2_GB = {"mezo": 7.5 / 1.7225, "hizoo": 7.5, "focus": 4.1}  # MeZO's: HiZOO's 7.5 GB is "+72.25 %"
ZO_METHODS = ["mezo", "hizoo", "focus", "hzo"]

# Hyperparameters of the measurement runs (the papers' values where they give them; they do not change
# speed or memory, and keep random-weight losses finite for a few steps).
METHOD_ARGS = {
    "mezo": {"lr": 1e-6, "eps": 1e-3},
    "hizoo": {"lr": 1e-6, "eps": 1e-3},
    "focus": {"lr": 1e-5, "eps": 1e-3, "active_blocks": 2, "interval": 10},
    "hzo": {"lr": 1e-6, "eps": 1e-3, "rank": 2, "interval": 50, "fo_layers": 1, "fo_lr": 1e-4},
    # Adam's default eps (1e-8) is 0 in fp16: pure-fp16 AdamW then divides 0 by 0 where a gradient is 0
    # and the second step's loss is NaN (seen in the dry run with fp16 weights); 1e-4 is representable
    # (what HZO's FO Adam uses in fp16)
    "adam": {"lr": 1e-5, "eps": 1e-4},
    "zero-shot": {},
}


# ----------------------------------------------------------------------------- settings


class Settings:
    """Shapes and repeats: the GPU run, or the dry run (CPU, tiny shapes, the same code path)."""

    def __init__(self, dry: bool, budget_s: float, parts: str, gguf: Path | None, data_dir: Path | None,
                 host_ram: int | None):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.budget_s = budget_s
        self.parts = parts
        self.gguf = gguf
        self.data_dir = data_dir
        self.live_predictions = dry
        if dry:
            self.vocab = TINY_VOCAB
            self.check_shape, self.overlap_shape = "tiny-opt", "tiny-opt"
            self.bench_shapes = ["tiny-opt"]
            self.focus_shape = "tiny-opt"
            self.offload_shapes = ["tiny-opt"]
            self.batch_size, self.seq_len = 2, 8
            self.warmup, self.repeats = 1, 1
            self.bench_dtype = torch.float32  # fp16 matmuls are slow on CPU; the code path is the same
            self.check_steps = 1
            self.host_ram = host_ram or _mem_total()
            self.part_budget = {"a": 0.3, "b": 0.3, "c": 0.2, "d": 0.15, "e": 0.05}
        else:
            self.vocab = OPT_VOCAB
            self.check_shape, self.overlap_shape = "opt-125m", "opt-1.3b"
            self.bench_shapes = ["opt-1.3b", "opt-13b"]
            self.focus_shape = "opt-1.3b"  # FOCUS Table 2's model
            self.offload_shapes = ["opt-66b", "opt-30b", "opt-13b", "opt-6.7b"]  # the first whose host copy fits
            self.batch_size, self.seq_len = 16, 128  # HZO Table 1's batch; MeZO-style short prompts
            self.warmup, self.repeats = 2, 3
            self.bench_dtype = torch.float16  # HZO Table 4's FP16 columns
            self.check_steps = 4
            self.host_ram = host_ram or LENT_HOST_RAM
            # fractions of the whole budget, in the order the parts run
            self.part_budget = {"a": 0.2, "b": 0.33, "c": 0.33, "d": 0.11, "e": 0.03}


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


# ----------------------------------------------------------------------------- results


class Recorder:
    """Entries (part, name, status, values) written to JSON and markdown after every entry."""

    def __init__(self, out: Path, settings: Settings):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.settings = settings
        self.entries: list[dict] = []
        self.meta = _environment(settings)

    def add(self, part: str, name: str, status: str, **values) -> dict:
        entry = {"part": part, "name": name, "status": status, "t_s": round(time.time() - self.start, 1), **values}
        self.entries.append(entry)
        self.flush()
        line = f"[{entry['t_s']:6.1f}s] {part} {name}: {status}"
        if values.get("reason"):
            line += f" ({values['reason']})"
        print(line, flush=True)
        return entry

    def flush(self) -> None:
        self.meta["elapsed_s"] = round(time.time() - self.start, 1)
        doc = {"meta": self.meta, "entries": self.entries}
        _write_atomic(self.out / "gpu_check.json", json.dumps(doc, indent=1, default=_json_default))
        try:
            md = render_markdown(doc)
        except Exception as exc:  # the JSON is what counts; never lose it to a rendering bug
            md = f"# zoexp GPU check\n\nmarkdown rendering failed ({type(exc).__name__}: {exc}); see gpu_check.json\n"
        _write_atomic(self.out / "gpu_check.md", md)


def _json_default(o):
    if isinstance(o, torch.dtype | torch.device):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment(s: Settings) -> dict:
    import transformers

    meta = {"mode": "dry (CPU, tiny shapes)" if s.dry else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(), "budget_s": s.budget_s, "batch_size": s.batch_size,
            "seq_len": s.seq_len, "warmup": s.warmup, "repeats": s.repeats, "host_ram_bytes": s.host_ram}
    try:
        import subprocess

        meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except Exception:  # the device machine's copy may not be a git checkout
        meta["git_commit"] = None
    for name in ("hydra", "omegaconf", "gguf", "accelerate"):
        try:
            module = __import__(name)
            meta[name] = getattr(module, "__version__", "?")
        except Exception as exc:
            meta[name] = f"missing ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), device_memory_bytes=p.total_memory,
                    multiprocessors=p.multi_processor_count, cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    else:
        from zoexp.measure import device_name

        meta["device"] = device_name(torch.device("cpu"))
    return meta


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, int) and abs(v) >= 2**20 and "bytes" not in str(v):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
    return str(v)


def _gib(n) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def render_markdown(doc: dict) -> str:
    meta, entries = doc["meta"], doc["entries"]
    lines = ["# zoexp GPU check", "",
             f"Mode: {meta['mode']} · device: {meta.get('device')} · torch {meta['torch']} · transformers "
             f"{meta['transformers']} · hydra {meta.get('hydra')} · started {meta['started']} · "
             f"{meta.get('elapsed_s')} s of {meta['budget_s']:.0f} s · commit {str(meta.get('git_commit'))[:10]}",
             f"Batch {meta['batch_size']} × {meta['seq_len']} tokens, {meta['warmup']} warm-up + {meta['repeats']} "
             f"timed steps (medians).", ""]
    bench = [e for e in entries if e["part"] == "b" and e["status"] == "ok" and "method" in e]
    if bench:
        lines += ["## b. Paper-shaped benchmark (random weights)", "",
                  "| model | method | batch | dtype | fwd/step | forward s | step s | overhead ratio | tokens/s | "
                  "peak alloc GiB | predicted GiB | measured / predicted |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in bench:
            pred = e.get("predicted_peak_bytes")
            ratio = f"{e['peak_allocated_bytes'] / pred:.2f}" if pred and e.get("peak_allocated_bytes") else "—"
            lines.append("| " + " | ".join([
                e["model"], e["method"], str(e.get("batch_size", "")), e["dtype"], _fmt(e.get("forward_passes_per_step", 1)),
                _fmt(e["forward_s"]), _fmt(e.get("step_s", "—")), _fmt(e.get("overhead_ratio", "—")),
                f"{e['tokens_per_s']:.0f}", _gib(e["peak_allocated_bytes"]), _gib(pred), ratio]) + " |")
        lines.append("")
    off = [e for e in entries if e["part"] == "c" and e["status"] == "ok" and "offload" in e]
    if off:
        lines += ["## c. HZO with offloading", "",
                  "| model | offload | step s | tokens/s | peak alloc GiB | device param GiB (formula) | host copy GiB |",
                  "|---|---|---|---|---|---|---|"]
        for e in off:
            lines.append("| " + " | ".join([
                e["model"], _fmt(e["offload"]), _fmt(e["step_s"]), f"{e['tokens_per_s']:.0f}",
                _gib(e["peak_allocated_bytes"]), _gib(e.get("offload/device_param_bytes")),
                _gib(e.get("host_bytes"))]) + " |")
        lines.append("")
    lines += ["## All entries", "", "| part | name | status | details |", "|---|---|---|---|"]
    skip = {"part", "name", "status", "traceback"}
    for e in entries:
        details = "; ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in skip)
        lines.append(f"| {e['part']} | {e['name']} | {e['status']} | {details.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- budget


class OutOfTime(Exception):
    pass


class Budget:
    """The whole run's deadline and each part's; ``check`` raises OutOfTime before work that would overrun."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.total_s = total_s
        self.part_end = self.start + total_s

    def begin_part(self, fraction: float, spent_before: float) -> None:
        # a part gets its share plus whatever earlier parts left unused
        self.part_end = min(self.start + self.total_s, self.start + (spent_before + fraction) * self.total_s)

    def left(self) -> float:
        return min(self.part_end, self.start + self.total_s) - time.monotonic()

    def check(self, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            raise OutOfTime(f"time budget: {self.left():.0f} s left in this part, about {need_s:.0f} s needed")


# ----------------------------------------------------------------------------- models and batches


class WordTokenizer:
    """One token per whitespace-separated word (crc32 mod the vocabulary): the Encoder's slow path."""

    is_fast = False

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.bos_token_id = self.eos_token_id = 2
        self.pad_token_id = 1
        self.pad_token, self.eos_token, self.bos_token = "<pad>", "</s>", "</s>"

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        ids = [4 + zlib.crc32(w.encode()) % (self.vocab - 4) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def synthetic_batch(n: int, seq_len: int, seed: int):
    """n examples of exactly ``seq_len`` tokens (BOS, seq_len − 2 prompt words, one target word)."""
    from zoexp.tasks import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(seq_len - 2))
        out.append(Example(id=i, prompt=words, candidates=[" terrible", " great"], label=i % 2))
    return out


def opt_config(shape: str, vocab: int):
    """The published OPT config of ``shape`` (dropout 0.1 acts only in train mode: the FO baselines)."""
    from transformers import OPTConfig

    h, layers, heads, ffn = OPT_SHAPES[shape]
    return OPTConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, word_embed_proj_dim=h, max_position_embeddings=2048, do_layer_norm_before=True,
                     dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, enable_bias=True,
                     tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def param_count(shape: str, vocab: int) -> int:
    h, layers, _, ffn = OPT_SHAPES[shape]
    per_layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 4 * h
    return vocab * h + (2048 + 2) * h + layers * per_layer + 2 * h


@torch.no_grad()
def _normal_(t: torch.Tensor, std: float = 0.02) -> None:
    """N(0, std²) in place; a host tensor on a GPU machine is filled from the GPU (fp16 normal_ on the
    CPU is slow, and the host copies of part c are tens of GB)."""
    if t.device.type != "cpu" or not torch.cuda.is_available():
        t.normal_(0.0, std)
        return
    flat, step = t.view(-1), 1 << 27
    for a in range(0, flat.numel(), step):
        n = min(step, flat.numel() - a)
        flat[a:a + n].copy_(torch.empty(n, dtype=t.dtype, device="cuda").normal_(0.0, std))


@torch.no_grad()
def _init_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            _normal_(m.weight)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def build_model(shape: str, dtype: torch.dtype, device: torch.device, vocab: int, share_layers: bool = False):
    """A random-weight OPT of ``shape``, built on the meta device and materialised on ``device`` in ``dtype``.

    ``share_layers``: every layer's parameters are views of layer 0's (distinct Parameters, one storage):
    the host copy of a model to offload then costs one layer, the offloader's buckets the rest.
    """
    from transformers import OPTForCausalLM

    from zoexp.models import block_view

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = OPTForCausalLM(opt_config(shape, vocab))
    finally:
        torch.set_default_dtype(previous)
    layers = block_view(model).layers
    inside = {id(m) for layer in layers for m in layer.modules()}
    for m in model.modules():
        if id(m) not in inside and m is not layers:
            m.to_empty(device=device, recurse=False)
    for i, layer in enumerate(layers):
        if share_layers and i > 0:
            for m, t in zip(layer.modules(), layers[0].modules()):
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = nn.Parameter(t._parameters[name].detach(), requires_grad=True)
        else:
            layer.to_empty(device=device)
            _init_(layer)
    model.tie_weights()
    for m in model.modules():
        if id(m) not in inside and isinstance(m, nn.Linear | nn.Embedding | nn.LayerNorm):
            _init_(m)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    model.eval()
    model.config.pad_token_id = 1
    return model


def method_cfg(name: str, **overrides):
    """conf/method/<name>.yaml with overrides (the configs the CLI uses)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, {**METHOD_ARGS.get(name, {}), **overrides})


def make_method(name: str, model, seed: int = 0, **overrides):
    from zoexp.methods import build_method

    return build_method(method_cfg(name, **overrides), model, seed=seed)


def free() -> None:
    """Release device memory between measurements, after the caller dropped its references (a CPU run
    leaves it to reference counting: a full collection over transformers' objects costs more than the
    dry run's steps)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        from zoexp.measure import _status_field

        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "rss_peak_bytes": _status_field("VmHWM")}
    torch.cuda.synchronize(device)
    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}


def device_memory(s: Settings) -> int:
    if s.device.type == "cuda":
        return torch.cuda.get_device_properties(s.device).total_memory
    return s.host_ram


def closure_for(model, tok, batch, counters=None):
    from zoexp.closure import Counters, make_closure
    from zoexp.scoring import Encoder

    return make_closure(model, Encoder(tok, max_length=4096), batch, tok.pad_token_id, counters or Counters())


def timed_steps(opt, closure, device, warmup: int, repeats: int, budget: Budget | None = None) -> dict:
    """Median step time after ``warmup`` untimed steps; the losses of every step."""
    times, losses = [], []
    counters = closure.counters
    passes = None
    for i in range(warmup + repeats):
        before = counters.forward_passes
        sync(device)
        t0 = time.perf_counter()
        loss = opt.step(closure)
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
            passes = counters.forward_passes - before
        if budget is not None and i + 1 < warmup + repeats:
            budget.check(dt)
    return {"step_s": statistics.median(times), "step_s_all": [round(t, 4) for t in times],
            "forward_passes_per_step": passes, "losses": [round(x, 5) for x in losses]}


def timed_forward(closure, device, warmup: int, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            closure()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


PACKED_PREDICTIONS = REPO / ".gpucheck" / "predictions.json"
# the dry run exercises the prediction path twice (MeZO, offloaded HZO); each costs seconds of CPU
DRY_UNPREDICTED = {"prediction": "prediction unavailable: the dry run predicts only MeZO's and offloaded HZO's peaks"}
_PACKED: dict | None = None


def predicted_peak(overrides: list[str], packed: bool = True, live: bool = True) -> dict:
    """``zoexp.memory.predict`` (the fake-tensor prediction), or why it is unavailable (never silent).

    The prediction needs no GPU, only CPU time (1-22 s per paper-scale model on a development machine):
    ``make gpu-pack`` computes the GPU run's predictions beforehand into .gpucheck/predictions.json and
    the device run reads them from there. An override list not found there is predicted on the spot
    only if ``live`` (``--live-predictions``): nineteen of them would eat minutes of the device's time."""
    global _PACKED
    if packed:
        if _PACKED is None:
            try:
                _PACKED = json.loads(PACKED_PREDICTIONS.read_text())
            except (OSError, ValueError):
                _PACKED = {}
        hit = _PACKED.get(" ".join(overrides))
        if hit is not None:
            return {**hit, "prediction_source": "packed (.gpucheck/predictions.json)"}
        if not live:
            return {"prediction": "prediction unavailable: not in .gpucheck/predictions.json (make gpu-pack "
                                  "computes it; --live-predictions computes it on the device)"}
    t0 = time.perf_counter()
    out = _predict_now(overrides)
    out["prediction_s"] = round(time.perf_counter() - t0, 2)
    return out


def _predict_now(overrides: list[str]) -> dict:
    try:
        from zoexp import memory
    except Exception as exc:
        return {"prediction": f"prediction unavailable: zoexp.memory cannot be imported ({type(exc).__name__}: {exc})"}
    predict = getattr(memory, "predict", None)
    if predict is None:
        return {"prediction": "prediction unavailable: zoexp.memory has no predict()"}
    try:
        row = predict(list(overrides))
    except Exception as exc:
        return {"prediction": f"prediction unavailable: predict({overrides}) raised {type(exc).__name__}: {exc}"[:400]}
    out = {"prediction": "ok", "prediction_overrides": list(overrides),
           "predicted_peak_bytes": row.get("memory/predicted_peak_bytes")}
    out.update({k.replace("memory/predicted/", "predicted/"): v for k, v in row.items()
                if k.startswith("memory/predicted/")})
    if out["predicted_peak_bytes"] is None:
        out["prediction"] = "prediction unavailable: predict() returned no memory/predicted_peak_bytes"
    return out


def planned_predictions(s: Settings) -> list[list[str]]:
    """The override lists parts b and c will ask ``zoexp.memory.predict`` for (tools/gpu_pack.py packs them)."""
    out = [prediction_overrides(s, shape, m) for shape in s.bench_shapes for m in BENCH_METHODS]
    for methods, bs in FOCUS_TABLE2_RUNS:
        out += [prediction_overrides(s, s.focus_shape, m, batch_size=bs) for m in methods]
    chosen = next((x for x in s.offload_shapes if pinned_host_bytes(s, x) <= 0.7 * s.host_ram), None)
    if chosen is not None:
        out += [prediction_overrides(s, chosen, "hzo", offload=o) for o in (True, False)]
    return out


def prediction_overrides(s: Settings, shape: str, method: str, offload: bool = False,
                         batch_size: int | None = None) -> list[str]:
    return [f"model={shape}", f"method={method}", f"run.dtype={DTYPE_NAMES[s.bench_dtype]}",
            f"run.batch_size={batch_size or s.batch_size}",
            f"run.max_length={s.seq_len}", f"run.device={s.device.type}", f"run.offload={str(offload).lower()}"]


# ----------------------------------------------------------------------------- part a: CUDA test subset


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x``'s dtype at each value of x (as float32)."""
    bits = {torch.float16: (10, -24), torch.bfloat16: (7, -133), torch.float32: (23, -149)}[x.dtype]
    _, exponent = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (exponent - 1 - bits[0]).clamp(min=bits[1]))


def restore_error(model: nn.Module, start: list[torch.Tensor], eps: float, reach: float) -> float:
    """Largest |θ − θ₀| of one lr=0 step over its rounding bound. Three rounded passes (+εd, −2εd, +εd
    fused with the zero update) each err by at most half an ulp of an intermediate of size at most
    |θ₀| + ε|d|, so |θ − θ₀| ≤ 1.5 ulp(|θ₀| + ε·reach) where ``reach`` bounds |d| (taken twice over).
    A ratio ≤ 1 is a correct restore; a wrong z, sign or scale in a pass leaves an error of order ε|d|,
    several times the bound even at HZO's reach."""
    worst = 0.0
    for p, p0 in zip(model.parameters(), start):
        bound = 1.5 * _ulp((p0.float().abs() + reach * eps).to(p0.dtype))
        worst = max(worst, float(((p.detach().float() - p0.float()).abs() / bound).max()))
    return worst


# |d| bounds for restore_error, doubled: z ~ N(0, 1) stays under 6 on 1e8 draws; an entry of HZO's U Vᵀ
# is a sum of r = 2 products of Gaussians, which reaches about 30 on a paper-sized matrix
RESTORE_REACH = {"mezo": 12.0, "hizoo": 12.0, "focus": 12.0, "hzo": 64.0}


def check_offload_equals_plain(s: Settings, rec: Recorder, budget: Budget) -> None:
    from zoexp.closure import Counters
    from zoexp.models import param_groups  # noqa: F401 (build_method binds the groups)
    from zoexp.offload import enable_offload

    tok = WordTokenizer(s.vocab)
    for method in ("mezo", "hzo"):
        name = f"offloaded == plain ({method}, fp32, ring 2)"
        budget.check(5)
        torch.manual_seed(0)
        plain = build_model(s.check_shape, torch.float32, s.device, s.vocab)
        model = copy.deepcopy(plain).to("cpu")
        start = [p.detach().clone() for p in plain.parameters()]
        kwargs = {"lr": 1e-4, "eps": 1e-3}
        if method == "hzo":
            kwargs.update(interval=2, fo_layers=1, fo_optimizer="sgd", fo_lr=1e-3)
        a, b = make_method(method, plain, seed=3, **kwargs), make_method(method, model, seed=3, **kwargs)
        off = enable_offload(model, b, s.device, ring=2)
        pinned = all(bk.is_pinned() for bk in off._buckets.values())
        reset_peak(s.device)
        worst, counters = 0.0, Counters()
        for t in range(2 + 2 * (not s.dry)):
            batch = synthetic_batch(s.batch_size, s.seq_len, seed=t)
            a.step(closure_for(plain, tok, batch, counters))
            b.step(closure_for(model, tok, batch, counters))
            ma, mb = a.metrics(), b.metrics()
            for key in ("loss_plus", "loss_minus", "fo_loss"):
                if key in ma and key in mb:
                    worst = max(worst, abs(mb[key] - ma[key]) / max(abs(ma[key]), 1e-12))
        b.flush()
        mem = peaks(s.device)
        # tests/test_offload.py's criterion: the two paths round differently (fused vs deferred update),
        # so each weight agrees to 1e-3 of the distance it moved, plus 1e-6
        weight_err, worst_param = -1.0, None
        for (pname, p), q, p0 in zip(plain.named_parameters(), model.parameters(), start):
            moved = (p.detach() - p0).norm().item()
            err = (p.detach() - q.detach().to(p.device)).norm().item()
            excess = err - (1e-3 * moved + 1e-6)
            if excess > weight_err:
                weight_err, worst_param = excess, (pname, err, moved)
        ok = worst <= 1e-4 and weight_err <= 0 and (pinned or s.device.type != "cuda") and off.max_in_ring <= 2
        rec.add("a", name, "ok" if ok else "FAIL", model=s.check_shape, max_rel_loss_diff=worst,
                worst_weight=worst_param, pinned_buckets=pinned, streams=off.sync.cuda,
                uploads=off.uploads, offloads=off.offloads, max_in_ring=off.max_in_ring,
                peak_allocated_bytes_both_models=mem["peak_allocated_bytes"],  # the plain model shares the device
                **{k: v for k, v in off.device_bytes().items() if k in ("offload/device_param_bytes", "offload/block_bytes")})
        off.close()
        del plain, model, a, b, off
        free()


def check_half_steps(s: Settings, rec: Recorder, budget: Budget) -> None:
    tok = WordTokenizer(s.vocab)
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = build_model(s.check_shape, dtype, s.device, s.vocab)
        for method in ZO_METHODS:
            budget.check(3)
            start = [p.detach().clone() for p in model.parameters()]
            lr = {"focus": 1e-3}.get(method, 1e-4)  # big enough that fp16 updates exceed an ulp
            opt = make_method(method, model, seed=1, lr=lr, **({"interval": 2} if method == "hzo" else {}))
            batch = synthetic_batch(s.batch_size, s.seq_len, seed=7)
            steps = timed_steps(opt, closure_for(model, tok, batch), s.device, warmup=1, repeats=s.check_steps)
            finite = all(math.isfinite(x) for x in steps["losses"])
            kept = all(p.dtype == dtype for p in model.parameters())
            nan_weights = any(not torch.isfinite(p).all() for p in model.parameters())
            changed = sum(int((p.detach() != p0).sum()) for p, p0 in zip(model.parameters(), start))
            total = sum(p.numel() for p in model.parameters())
            ok = finite and kept and not nan_weights and changed > 0
            rec.add("a", f"{dtype_name} steps ({method})", "ok" if ok else "FAIL", model=s.check_shape, dtype=dtype_name,
                    losses=steps["losses"], step_s=steps["step_s"], dtype_kept=kept, finite_weights=not nan_weights,
                    changed_fraction=changed / total)
            del opt
            free()
        del model
        free()


def check_restore_fp16(s: Settings, rec: Recorder, budget: Budget) -> None:
    """lr = 0: after a step the weights must be back where they were (to rounding); MeZO on zero weights
    with ε a power of two is exact arithmetic, so bit for bit (the same z regenerated on the device)."""
    tok = WordTokenizer(s.vocab)
    batch = synthetic_batch(s.batch_size, s.seq_len, seed=11)
    torch.manual_seed(0)
    model = build_model(s.check_shape, torch.float16, s.device, s.vocab)
    for method in ZO_METHODS:
        budget.check(3)
        start = [p.detach().clone() for p in model.parameters()]
        extra = {"fo_layers": 0} if method == "hzo" else {}
        opt = make_method(method, model, seed=5, lr=0.0, **extra)
        opt.step(closure_for(model, tok, batch))
        ratio = restore_error(model, start, eps=METHOD_ARGS[method]["eps"], reach=RESTORE_REACH[method])
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start):
                p.copy_(p0)
        rec.add("a", f"fp16 restore with lr=0 ({method})", "ok" if ratio <= 1 else "FAIL",
                error_over_rounding_bound=ratio)
        del opt
        free()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = make_method("mezo", model, seed=5, lr=0.0, eps=1.0)
    for _ in range(3):
        opt.step(closure_for(model, tok, batch))
    exact = all(torch.equal(p.detach(), torch.zeros_like(p)) for p in model.parameters())
    rec.add("a", "fp16 restore bit-exact (mezo, zero weights, eps=1)", "ok" if exact else "FAIL", bit_exact=exact)
    del opt, model
    free()


class _Timeline:
    """Wraps an offloader's _Sync: a timing event after every wait (start of the work that waited) and
    after every upload / compute / offload completion record, per stream."""

    def __init__(self, base, offloader, event_factory=None):
        self.base, self.off = base, offloader
        self.new_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self.marks: list[tuple[str, str, object]] = []  # (stream, start|end, event)
        self.ends = {id(e): "end" for e in (*offloader._loaded, *offloader._done, *offloader._host_ready.values())}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _stream_name(self, stream) -> str:
        if stream == self.base.upload:
            return "upload"
        if stream == self.base.offload:
            return "offload"
        return "compute"

    def _mark(self, stream, kind: str) -> None:
        ev = self.new_event()
        ev.record(stream)
        self.marks.append((self._stream_name(stream), kind, ev))

    def wait(self, stream, event) -> None:
        self.base.wait(stream, event)
        if event is not None:
            self._mark(stream, "start")

    def record(self, event, stream) -> None:
        self.base.record(event, stream)
        if event is not None and id(event) in self.ends:
            self._mark(stream, "end")

    def intervals(self, t0) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {"upload": [], "compute": [], "offload": []}
        last_start: dict[str, float] = {}
        for stream, kind, ev in self.marks:
            t = t0.elapsed_time(ev)
            if kind == "start":
                last_start[stream] = t
            elif stream in last_start:
                out[stream].append((last_start.pop(stream), t))
        return out


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(iv):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(iv) -> float:
    return sum(b - a for a, b in _union(iv))


def _intersection(x, y) -> float:
    total, ux, uy = 0.0, _union(x), _union(y)
    for a, b in ux:
        for c, d in uy:
            total += max(0.0, min(b, d) - max(a, c))
    return total


def check_overlap(s: Settings, rec: Recorder, budget: Budget) -> None:
    """HZO offloaded (ring 3, fp16): intervals of every upload, layer compute and offload from CUDA events."""
    from zoexp.offload import enable_offload

    budget.check(20)
    tok = WordTokenizer(s.vocab)
    torch.manual_seed(0)
    model = build_model(s.overlap_shape, torch.float16, torch.device("cpu"), s.vocab, share_layers=True)
    opt = make_method("hzo", model, seed=0, interval=1000)  # no FO step after step 0
    off = enable_offload(model, opt, s.device, ring=3)
    closure = closure_for(model, tok, synthetic_batch(s.batch_size, s.seq_len, seed=3))
    for _ in range(2):  # step 0 has the FO step; step 1 warms the ring
        opt.step(closure)
    if s.device.type != "cuda":
        opt.step(closure)
        rec.add("a", "upload/compute/offload overlap (CUDA events)", "skipped",
                reason="dry run on CPU: no streams or events (the offloaded step itself ran)")
        off.close()
        del model, opt, off
        free()
        return
    timeline = _Timeline(off.sync, off)
    off.sync = timeline
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(s.device)
    t0.record()
    steps = 2
    for _ in range(steps):
        opt.step(closure)
    t1.record()
    sync(s.device)
    off.sync = timeline.base
    wall = t0.elapsed_time(t1)
    iv = timeline.intervals(t0)
    busy = {k: _length(v) for k, v in iv.items()}
    transfers = iv["upload"] + iv["offload"]
    hidden = _intersection(transfers, iv["compute"])
    layer_bytes = off.device_bytes()["offload/block_bytes"]
    n_up = len(iv["upload"])
    rec.add("a", "upload/compute/offload overlap (CUDA events)", "ok" if n_up else "FAIL",
            model=s.overlap_shape, dtype="fp16", ring=off.ring, steps=steps, wall_ms=wall,
            upload_busy_ms=busy["upload"], compute_busy_ms=busy["compute"], offload_busy_ms=busy["offload"],
            uploads=n_up, offloads=len(iv["offload"]), computes=len(iv["compute"]),
            transfer_time_under_compute=hidden / max(_length(transfers), 1e-9),
            compute_time_under_transfer=hidden / max(busy["compute"], 1e-9),
            streams_concurrency=(busy["upload"] + busy["offload"] + busy["compute"]) / max(wall, 1e-9),
            pipeline_efficiency=max(busy.values()) / max(wall, 1e-9),
            upload_GBps=(n_up * layer_bytes / 1e9) / max(sum(b - a for a, b in iv["upload"]) / 1e3, 1e-9),
            block_bytes=layer_bytes)
    off.close()
    del model, opt, off, timeline
    free()


def check_collectives(s: Settings, rec: Recorder, budget: Budget) -> None:
    """zoexp.distributed's data-parallel closure on a one-rank process group (nccl on the GPU, gloo in
    the dry run): the all-reduced loss equals the local one, and a hybrid step's gradient hooks run."""
    import socket

    import torch.distributed as dist

    from zoexp.distributed import DataParallel

    budget.check(10)
    backend = "gloo" if s.device.type == "cpu" else "nccl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one process on one machine: loopback is enough
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        tok = WordTokenizer(s.vocab)
        torch.manual_seed(0)
        model = build_model(s.check_shape, torch.float32, s.device, s.vocab)
        dp = DataParallel(s.device, backend)
        closure = closure_for(model, tok, synthetic_batch(s.batch_size, s.seq_len, seed=2))
        total = float(sum(closure.weights))
        wrapped = dp.wrap_closure(closure, total, total)
        with torch.no_grad():
            local, reduced = closure(), wrapped()
        opt = make_method("hzo", model, seed=0, interval=1)  # a first-order step every step
        dp.sync_gradients(opt)
        loss = float(opt.step(wrapped))
        sync(s.device)
        same = abs(float(local) - float(reduced)) <= 1e-6 * abs(float(local))
        rec.add("e", f"{backend} one-rank all-reduce (zoexp.distributed)", "ok" if same and math.isfinite(loss) else "FAIL",
                backend=backend, local_loss=float(local), reduced_loss=float(reduced), step_loss=loss,
                allreduce_calls=dp.calls, loss_bytes=dp.bytes["loss"], grad_bytes=dp.bytes["grad"])
        dp.close()
        del model, opt, closure, wrapped
    finally:
        dist.destroy_process_group()
        free()


# ----------------------------------------------------------------------------- part b: benchmark


def estimate_peak(s: Settings, shape: str, method: str, batch_size: int | None = None) -> int:
    """A rough peak (weights, method state, activations) used only to skip what cannot fit; the fake-tensor
    prediction replaces it when ``zoexp.memory`` is there."""
    n = param_count(shape, s.vocab)
    h, layers, heads, ffn = OPT_SHAPES[shape]
    bs = batch_size or s.batch_size
    tokens = bs * s.seq_len
    act_fwd = tokens * max(ffn, 4 * h) * 2 * 4 + bs * heads * s.seq_len**2 * 2
    act_bwd = layers * tokens * (16 * h + 2 * ffn) * 2 + bs * heads * s.seq_len**2 * 2 * layers
    per = {"zero-shot": 2 * n, "mezo": 2 * n, "focus": 2 * n + 2 * 12 * h * h * 4,
           "hizoo": 2 * n + 4 * n, "hzo": 2 * n + 12 * h * h * 2 * 3,
           "adam": 2 * n * 4, "sgd": 2 * n * 2}
    return per[method] + (act_bwd if method in ("adam", "sgd") else act_fwd)


def bench_shape(s: Settings, rec: Recorder, budget: Budget, shape: str, methods=BENCH_METHODS,
                batch_size: int | None = None, label: str = "") -> None:
    """Forward and step time, overhead ratio, tokens/s and device peak per method on one random-weight
    model of ``shape`` (one build; each method's peak from a reset of the peak counters)."""
    bs = batch_size or s.batch_size
    budget.check(30)
    tok = WordTokenizer(s.vocab)
    capacity = device_memory(s)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(shape, s.bench_dtype, s.device, s.vocab)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(bs, s.seq_len, seed=0)
    tokens = bs * s.seq_len
    reset_peak(s.device)
    closure = closure_for(model, tok, batch)
    forward_s = timed_forward(closure, s.device, s.warmup, s.repeats)
    inference = peaks(s.device)
    n_params = sum(p.numel() for p in model.parameters())
    for method in methods:
        name = f"{shape}{label} {method}"
        pred = (DRY_UNPREDICTED if s.dry and method != "mezo"
                else predicted_peak(prediction_overrides(s, shape, method, batch_size=bs), packed=not s.dry,
                                    live=s.live_predictions))
        need = pred.get("predicted_peak_bytes") or estimate_peak(s, shape, method, bs)
        if need > 0.97 * capacity:
            rec.add("b", name, "skipped", model=shape, method=method, reason=f"would need {need / GiB:.1f} GiB "
                    f"of {capacity / GiB:.1f} GiB ({'predicted' if pred.get('predicted_peak_bytes') else 'estimated'})",
                    **pred)
            continue
        held: dict = {}  # the method, so that every exit path can drop it
        try:
            budget.check(max(10.0, 3 * forward_s * (s.warmup + s.repeats) * 4))
            row = {"model": shape, "method": method, "dtype": DTYPE_NAMES[s.bench_dtype], "params": n_params,
                   "batch_size": bs, "tokens_per_batch": tokens, "forward_s": forward_s, "build_s": round(build_s, 2),
                   "label": label.strip()}
            if method == "zero-shot":
                row.update(tokens_per_s=tokens / forward_s, forward_passes_per_step=1, **inference)
            else:
                reset_peak(s.device)
                opt = held["opt"] = make_method(method, model, seed=0)
                model.train(opt.train_mode)
                steps = timed_steps(opt, closure_for(model, tok, batch), s.device, s.warmup, s.repeats, budget)
                passes = steps["forward_passes_per_step"]
                row.update(steps, finite_losses=all(math.isfinite(x) for x in steps["losses"]),
                           overhead_ratio=steps["step_s"] / (passes * forward_s),
                           tokens_per_s=passes * tokens / steps["step_s"], state_bytes=opt.state_bytes(),
                           grad_bytes_max=getattr(opt, "grad_bytes_max", 0), **peaks(s.device))
                del opt
            row.update(pred)
            if pred.get("predicted_peak_bytes") and row.get("peak_allocated_bytes"):
                row["measured_over_predicted"] = row["peak_allocated_bytes"] / pred["predicted_peak_bytes"]
            row["estimated_peak_bytes"] = estimate_peak(s, shape, method, bs)
            rec.add("b", name, "ok", **row)
        except OutOfTime as exc:
            rec.add("b", name, "skipped", model=shape, method=method, reason=str(exc), **pred)
        except torch.cuda.OutOfMemoryError as exc:
            rec.add("b", name, "oom", model=shape, method=method, reason=str(exc).splitlines()[0][:300],
                    estimated_peak_bytes=estimate_peak(s, shape, method, bs), **pred)
        finally:
            model.train(False)
            held.clear()
            for p in model.parameters():  # a first-order step stopped half-way leaves its gradients
                p.grad = None
            free()
    del model, closure
    free()


def focus_table2(s: Settings, rec: Recorder, budget: Budget) -> None:
    """FOCUS Table 2's runs on OPT-1.3B's shape (ZO at batch 8, SGD at batch 2), then its claims as
    ratios to MeZO beside the paper's (its RTX 4090 minutes for 20,000 steps, its GB)."""
    for methods, bs in FOCUS_TABLE2_RUNS:
        bench_shape(s, rec, budget, s.focus_shape, methods=methods, batch_size=bs, label=f" FOCUS-T2 bs{bs}")
    rows = {e["method"]: e for e in rec.entries if e["part"] == "b" and e["status"] == "ok"
            and str(e.get("label", "")).startswith("FOCUS-T2") and "step_s" in e}
    if "mezo" not in rows:
        rec.add("b", "FOCUS Table 2 ratios", "skipped", reason="no MeZO row to compare with")
        return
    mezo = rows["mezo"]
    out = {"model": s.focus_shape, "minutes_for_20000_steps": {k: round(r["step_s"] * FOCUS_TABLE2_STEPS / 60, 1)
                                                              for k, r in rows.items()}}
    for k, r in rows.items():
        if k == "mezo":
            continue
        out[f"{k}_time_over_mezo"] = r["step_s"] / mezo["step_s"]
        out[f"{k}_time_over_mezo_paper"] = FOCUS_TABLE2_MINUTES[k] / FOCUS_TABLE2_MINUTES["mezo"]
        if r.get("peak_allocated_bytes") and mezo.get("peak_allocated_bytes"):
            out[f"{k}_peak_over_mezo"] = r["peak_allocated_bytes"] / mezo["peak_allocated_bytes"]
        if k in FOCUS_TABLE2_GB:
            out[f"{k}_memory_over_mezo_paper"] = FOCUS_TABLE2_GB[k] / FOCUS_TABLE2_GB["mezo"]
    rec.add("b", "FOCUS Table 2 ratios (random weights)", "ok", **out)


# ----------------------------------------------------------------------------- part c: offloaded HZO


def pinned_host_bytes(s: Settings, shape: str) -> int:
    """Host bytes of an offloaded model: one pinned bucket per offloaded layer, each rounded up to a power
    of two by torch's pinned-memory allocator (CachingHostAllocator), plus the template layer and the
    embeddings while the model is built."""
    h, layers, _, ffn = OPT_SHAPES[shape]
    size = torch.tensor([], dtype=s.bench_dtype).element_size()
    layer = (4 * (h * h + h) + 2 * h * ffn + ffn + h + 4 * h) * size
    bucket = 1 << (layer - 1).bit_length()
    return (layers - 1) * bucket + layer + (s.vocab + 2050) * h * size  # the FO layer stays on the device


def host_memory() -> dict:
    """Process RSS and, where torch has it, its pinned-memory allocator's counters."""
    from zoexp.measure import current_rss

    out = {"host_rss_bytes": current_rss()}
    with contextlib.suppress(Exception):
        stats = torch.cuda.host_memory_stats()
        out.update({f"pinned/{k}": v for k, v in stats.items() if "bytes" in k and "current" in k})
    return out



def offload_runs(s: Settings, rec: Recorder, budget: Budget) -> None:
    from zoexp.offload import enable_offload

    tok = WordTokenizer(s.vocab)
    chosen = None
    for shape in s.offload_shapes:
        host = pinned_host_bytes(s, shape)
        if host <= 0.7 * s.host_ram:
            chosen = shape
            break
        rec.add("c", f"{shape} offloaded hzo", "skipped", model=shape, host_bytes=host,
                reason=f"pinned host copy {host / GiB:.0f} GiB > 70% of {s.host_ram / GiB:.0f} GiB host memory "
                       f"(model {2 * param_count(shape, s.vocab) / GiB:.0f} GiB; torch rounds each pinned bucket "
                       "up to a power of two)")
    if chosen is None:
        return
    shape, host = chosen, pinned_host_bytes(s, chosen)
    batch = synthetic_batch(s.batch_size, s.seq_len, seed=0)
    tokens = s.batch_size * s.seq_len
    for offload in (True, False):
        name = f"{shape} hzo {'offloaded (ring 3)' if offload else 'on the device'}"
        pred = (DRY_UNPREDICTED if s.dry and not offload
                else predicted_peak(prediction_overrides(s, shape, "hzo", offload=offload), packed=not s.dry,
                                    live=s.live_predictions))
        if not offload:
            need = pred.get("predicted_peak_bytes") or estimate_peak(s, shape, "hzo")
            if need > 0.95 * device_memory(s):
                rec.add("c", name, "skipped", model=shape, reason=f"would need {need / GiB:.1f} GiB on the device", **pred)
                continue
        held: dict = {}  # model, method, offloader: dropped on every exit path
        try:
            budget.check(30)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if offload:
                model = held["model"] = build_model(shape, s.bench_dtype, torch.device("cpu"), s.vocab, share_layers=True)
                opt = held["opt"] = make_method("hzo", model, seed=0)
                t1 = time.perf_counter()
                off = held["off"] = enable_offload(model, opt, s.device, ring=3)
                setup = {"build_s": round(t1 - t0, 1), "offload_setup_s": round(time.perf_counter() - t1, 1),
                         **off.device_bytes(), "pinned_buckets": all(b.is_pinned() for b in off._buckets.values()),
                         "bucket_bytes_total": sum(b.numel() * b.element_size() for b in off._buckets.values()),
                         **host_memory()}
            else:
                model = held["model"] = build_model(shape, s.bench_dtype, s.device, s.vocab)
                opt = held["opt"] = make_method("hzo", model, seed=0)
                off, setup = None, {"build_s": round(time.perf_counter() - t0, 1)}
            budget.check(10)
            reset_peak(s.device)
            steps = timed_steps(opt, closure_for(model, tok, batch), s.device, s.warmup, s.repeats, budget)
            row = {"model": shape, "offload": offload, "host_bytes": host, "tokens_per_batch": tokens, **setup,
                   **steps, "tokens_per_s": steps["forward_passes_per_step"] * tokens / steps["step_s"],
                   **peaks(s.device), **pred}
            if off is not None:
                row.update(uploads=off.uploads, offloads=off.offloads, max_in_ring=off.max_in_ring)
            if pred.get("predicted_peak_bytes") and row.get("peak_allocated_bytes"):
                row["measured_over_predicted"] = row["peak_allocated_bytes"] / pred["predicted_peak_bytes"]
            rec.add("c", name, "ok", **row)
        except OutOfTime as exc:
            rec.add("c", name, "skipped", model=shape, reason=str(exc), **pred)
        except torch.cuda.OutOfMemoryError as exc:
            rec.add("c", name, "oom", model=shape, reason=str(exc).splitlines()[0][:300], **pred)
        finally:
            if held.get("off") is not None:
                held["off"].close()
            held.clear()
            model = opt = off = None
            free()
    done = {e["offload"]: e for e in rec.entries if e["part"] == "c" and e["status"] == "ok" and "offload" in e}
    if True in done and False in done:
        a, b = done[True], done[False]
        rec.add("c", f"{shape} offloaded vs on the device", "ok", tokens_per_s_ratio=a["tokens_per_s"] / b["tokens_per_s"],
                peak_ratio=(a["peak_allocated_bytes"] / b["peak_allocated_bytes"]) if b.get("peak_allocated_bytes") else None)


# HZO Table 4, FP16 columns: GPU memory (GB) and throughput (tokens/s) of MeZO and HZO (offloaded)
HZO_TABLE4_FP16 = {
    "opt-1.3b": {"mezo_gb": 5.68, "hzo_gb": 3.64, "mezo_tokens_per_s": 6629, "hzo_tokens_per_s": 6448},
    "opt-2.7b": {"mezo_gb": 8.84, "hzo_gb": 4.04, "mezo_tokens_per_s": 4229, "hzo_tokens_per_s": 4220},
    "opt-6.7b": {"mezo_gb": 16.20, "hzo_gb": 4.88, "mezo_tokens_per_s": 2349, "hzo_tokens_per_s": 2270},
    "opt-13b": {"mezo_gb": 28.99, "hzo_gb": 6.04, "mezo_tokens_per_s": 1326, "hzo_tokens_per_s": 1251},
    "opt-30b": {"mezo_gb": 62.40, "hzo_gb": 8.65, "mezo_tokens_per_s": 641, "hzo_tokens_per_s": 514},
    "opt-66b": {"mezo_gb": 126.33, "hzo_gb": 11.79, "mezo_tokens_per_s": 325, "hzo_tokens_per_s": 273},
}


def hzo_table4_summary(rec: Recorder) -> None:
    """Our MeZO (part b) and offloaded HZO (part c, else part b's HZO on the device) beside HZO Table 4's
    FP16 columns; the paper gives neither its sequence length nor its GPU, so the ratios compare best."""
    measured = {e.get("model") for e in rec.entries if e["part"] in "bc" and e["status"] == "ok"} - {None}
    for shape in sorted(measured, key=lambda x: param_count(x, OPT_VOCAB)):
        paper = HZO_TABLE4_FP16.get(shape, {})  # the dry run's tiny model has no paper row
        mezo = next((e for e in rec.entries if e["part"] == "b" and e["status"] == "ok" and e.get("model") == shape
                     and e.get("method") == "mezo" and not e.get("label")), None)
        hzo = next((e for e in rec.entries if e["part"] == "c" and e["status"] == "ok" and e.get("model") == shape
                    and e.get("offload") is True), None)
        where = "offloaded (part c)"
        if hzo is None:
            hzo = next((e for e in rec.entries if e["part"] == "b" and e["status"] == "ok" and e.get("model") == shape
                        and e.get("method") == "hzo" and not e.get("label")), None)
            where = "on the device (part b)"
        if mezo is None and hzo is None:
            continue
        row = {"model": shape, "hzo_run": where if hzo else None, **{f"paper_{k}": v for k, v in paper.items()}}
        for name, e in (("mezo", mezo), ("hzo", hzo)):
            if e is not None:
                row[f"{name}_tokens_per_s"] = e["tokens_per_s"]
                if e.get("peak_allocated_bytes"):
                    row[f"{name}_gb"] = e["peak_allocated_bytes"] / 1e9
        if mezo and hzo:
            row["hzo_over_mezo_tokens_per_s"] = hzo["tokens_per_s"] / mezo["tokens_per_s"]
            if paper:
                row["paper_hzo_over_mezo_tokens_per_s"] = paper["hzo_tokens_per_s"] / paper["mezo_tokens_per_s"]
                row["paper_hzo_over_mezo_memory"] = paper["hzo_gb"] / paper["mezo_gb"]
            if row.get("mezo_gb") and row.get("hzo_gb"):
                row["hzo_over_mezo_memory"] = row["hzo_gb"] / row["mezo_gb"]
        rec.add("c", f"HZO Table 4 FP16 beside the paper ({shape})", "ok", **row)


# ----------------------------------------------------------------------------- part d: real weights


def _sst2_dir(s: Settings, tmp: Path) -> tuple[Path, str]:
    for candidate in (s.data_dir, REPO / ".gpucheck" / "data", os.environ.get("ZOEXP_DATA_DIR")):
        if candidate and (Path(candidate) / "sst2" / "train.jsonl").is_file():
            return Path(candidate), "real SST-2 rows"
    folder = tmp / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [("a gripping , beautifully acted drama ", 1), ("the plot is a mess and the jokes fall flat ", 0),
            ("one of the most charming films of the year ", 1), ("tedious , overlong and forgettable ", 0)]
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(32):
                fh.write(json.dumps({"idx": i, "sentence": rows[i % 4][0], "label": rows[i % 4][1]}) + "\n")
    return tmp, "a 4-sentence fixture (no SST-2 rows found)"


def _accuracy(model, enc, examples, pad_id: int) -> float:
    from zoexp.scoring import score_candidates

    scores = score_candidates(model, enc, examples, pad_id, batch_size=32)
    return sum(int(max(range(len(sc)), key=sc.__getitem__) == ex.label) for sc, ex in zip(scores, examples)) / len(examples)


def real_weights(s: Settings, rec: Recorder, budget: Budget) -> None:
    import tempfile

    import yaml
    from omegaconf import OmegaConf

    from zoexp.closure import Counters, make_closure
    from zoexp.models import load_model
    from zoexp.scoring import Encoder
    from zoexp.tasks import Task

    # the GPU run takes the packed GGUF by default; the dry run only when --gguf names one (the test suite's
    # dry run stays independent of whether a pack exists)
    gguf = s.gguf or (None if s.dry else next(iter(sorted((REPO / ".gpucheck").glob("*.gguf"))), None))
    if gguf is not None and Path(gguf).is_file():
        gguf = Path(gguf)
        cfg = OmegaConf.create({"name": gguf.stem, "source": "gguf", "path": str(gguf.parent), "gguf_file": gguf.name,
                                "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
        what = f"{gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB)"
    elif s.dry:
        cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny-opt.yaml")
        what = "tiny-opt (random weights, SmolLM2 tokenizer): the dry run's stand-in; the GPU run uses .gpucheck/*.gguf"
    else:
        rec.add("d", "real weights", "skipped", reason="no .gpucheck/*.gguf: run `make gpu-pack` before the device call")
        return
    budget.check(15)
    tmp = Path(tempfile.mkdtemp(prefix="zoexp-gpu-check-"))
    data_dir, data_what = _sst2_dir(s, tmp)
    task = Task.from_config(yaml.safe_load((REPO / "tasks" / "sst2.yaml").read_text()))
    n_train, n_eval = (16, 8) if s.dry else (64, 200)
    data = task.sample(0, data_dir=str(data_dir), num_train=n_train, num_dev=0, num_test=n_eval)
    for dtype in ("fp16",) if s.dry else ("fp16", "bf16"):
        budget.check(10)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, tok = load_model(cfg, dtype=dtype, device=s.device)
        load_s = time.perf_counter() - t0
        enc = Encoder(tok, max_length=256)

        acc0 = _accuracy(model, enc, data.test, tok.pad_token_id)
        opt = make_method("mezo", model, seed=0, lr=1e-6)  # MeZO's OPT learning rate
        losses, bs = [], 4 if s.dry else 16
        steps = 2 if s.dry else 20
        reset_peak(s.device)
        t1 = time.perf_counter()
        for t in range(steps):
            batch = [data.train[(t * bs + i) % len(data.train)] for i in range(bs)]
            losses.append(float(opt.step(make_closure(model, enc, batch, tok.pad_token_id, Counters()))))
        sync(s.device)
        train_s = time.perf_counter() - t1
        acc1 = _accuracy(model, enc, data.test, tok.pad_token_id)
        finite = all(math.isfinite(x) for x in losses)
        rec.add("d", f"real weights MeZO ({dtype})", "ok" if finite else "FAIL", model=what, data=data_what,
                dtype=dtype, params=sum(p.numel() for p in model.parameters()), load_s=round(load_s, 2),
                steps=steps, batch_size=bs, train_s=round(train_s, 2), losses=[round(x, 4) for x in losses],
                acc_before=acc0, acc_after=acc1, eval_examples=len(data.test), **peaks(s.device))
        del model, opt
        free()


# ----------------------------------------------------------------------------- main


PARTS = [
    ("a", [("offloaded == plain", check_offload_equals_plain), ("fp16/bf16 steps", check_half_steps),
           ("fp16 restore", check_restore_fp16), ("overlap", check_overlap)]),
    ("b", None),
    ("c", [("offloaded hzo", offload_runs), ("HZO Table 4 summary", lambda s, rec, budget: hzo_table4_summary(rec))]),
    ("d", [("real weights", real_weights)]),
    # last: should NCCL hang or abort the process in the lent machine's sandbox, nothing else is lost
    ("e", [("collectives", check_collectives)]),
]


def run_check(name: str, part: str, fn, rec: Recorder) -> None:
    try:
        fn()
    except OutOfTime as exc:
        rec.add(part, name, "skipped", reason=str(exc))
    except Exception as exc:
        rec.add(part, name, "ERROR", reason=f"{type(exc).__name__}: {exc}"[:500],
                traceback=traceback.format_exc()[-3000:])
        with contextlib.suppress(Exception):
            free()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / gpu_check.md")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, no CUDA checks (seconds)")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run time budget (default 420 s, dry 300 s)")
    ap.add_argument("--parts", default="abcde", help="which parts to run (default abcde)")
    ap.add_argument("--gguf", type=Path, default=None, help="real-weights GGUF (default .gpucheck/*.gguf)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with sst2/{train,validation}.jsonl")
    ap.add_argument("--host-ram-gib", type=float, default=None, help="host memory for part c (default 128 GiB on GPU)")
    ap.add_argument("--live-predictions", action="store_true",
                    help="predict memory on the device where .gpucheck/predictions.json lacks an entry (slow)")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry (or `make gpu-check DRY=1`)", file=sys.stderr)
        return 2
    s = Settings(args.dry, args.budget_s or (300.0 if args.dry else 420.0), args.parts, args.gguf, args.data_dir,
                 int(args.host_ram_gib * GiB) if args.host_ram_gib else None)
    s.live_predictions = args.live_predictions or args.dry
    if args.dry:
        torch.set_num_threads(1)  # tiny shapes: threads only wait for each other (and for a loaded machine)
    rec = Recorder(args.out, s)
    budget = Budget(s.budget_s)
    spent = 0.0
    chosen = [part for part, _ in PARTS if part in s.parts]
    share = sum(s.part_budget[p] for p in chosen) or 1.0  # the parts run share the whole budget
    for part, checks in PARTS:
        if part not in s.parts:
            continue
        budget.begin_part(s.part_budget[part] / share, spent)
        if part == "b":
            checks = [(f"bench {shape}", lambda shape=shape: bench_shape(s, rec, budget, shape)) for shape in s.bench_shapes]
            checks.append(("FOCUS Table 2", lambda: focus_table2(s, rec, budget)))
            for name, fn in checks:
                run_check(name, part, fn, rec)
        else:
            for name, fn in checks:
                run_check(name, part, lambda fn=fn: fn(s, rec, budget), rec)
        spent = (time.monotonic() - budget.start) / s.budget_s
    failed = [e for e in rec.entries if e["status"] in ("FAIL", "ERROR")]
    rec.meta["summary"] = {k: sum(e["status"] == k for e in rec.entries) for k in ("ok", "FAIL", "ERROR", "skipped", "oom")}
    rec.flush()
    print(f"gpu check: {rec.meta['summary']} in {rec.meta['elapsed_s']} s -> {args.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
