"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun`` or a multi-task SLURM job).

Every rank holds the whole model, samples the same global batch and the same step seeds, and runs the
forward passes on its own shard of the batch. For a zeroth-order method a step then needs only the
loss of the global batch, so only loss scalars cross the network: O(1) bytes per forward pass,
whatever the model size. Methods stay oblivious: the runner's closure does the all-reduce.

Exactness. The training loss is a mean over answer tokens (or examples), and shards hold different
numbers of tokens, so the mean of the ranks' means is not the full-batch loss. Every rank knows the
whole batch, hence the total weight W (tokens or examples); rank r all-reduces ``L_r * w_r`` and
divides the sum by W: the full-batch loss up to float rounding, and bit-identical on every rank (the
ZO update depends on it, so replicas never drift apart).

First-order parts (hybrid methods, FO baselines) backpropagate through the returned loss, whose
gradient on rank r is ``(w_r / W) * grad L_r``; a hook on every parameter the optimizer owns sums
those across ranks, which is the full-batch gradient (what DDP does, per parameter, unbucketed).

Evaluation is sharded too (each rank scores ``examples[rank::world]``); the metrics -- accuracy, F1,
exact match -- are means over examples, combined exactly by weighting with each shard's ``n``.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def loss_weight(encoder, batch, loss: str = "lm") -> int:
    """What the training loss of ``batch`` averages over: answer tokens (``lm``) or examples."""
    if loss == "classification":
        return len(batch)
    return sum(encoder.encode(ex.prompt, ex.target, ex.passage)[1] for ex in batch)


class Single:
    """One process: no communication (the default)."""

    enabled = False
    world_size = 1
    rank = 0
    is_main = True
    backend = None

    def __init__(self, device: torch.device):
        self.device = device
        self.local_stop = lambda: False  # set by the runner: has this process received a stop signal?

    def shard(self, items: list) -> list:
        return items

    def wrap_closure(self, closure, local_weight: float, total_weight: float):
        return closure

    def sync_gradients(self, optimizer) -> None:
        return None

    def stop_requested(self) -> bool:
        return bool(self.local_stop())

    def evaluate(self, fn, examples):
        return fn(examples)

    def shared_run_dir(self, run_dir: Path) -> Path:
        return Path(run_dir)

    def best_file(self) -> str:
        return "best.safetensors"

    def broadcast(self, obj):
        return obj

    def all_gather(self, obj) -> list:
        return [obj]

    def sum(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None

    def check_replicas(self, model) -> None:
        return None

    def reduce_measurements(self, row: dict) -> None:
        return None

    def row_fields(self, steps_run: int) -> dict:
        return {}

    def close(self, barrier: bool = True) -> None:
        return None


class _GlobalLoss(torch.autograd.Function):
    """Value: the global loss (identical on every rank). Gradient: ``scale`` times the local loss's."""

    @staticmethod
    def forward(ctx, local, total, scale):
        ctx.scale = scale
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


class DataParallel(Single):
    """One rank of a data-parallel run (see the module docstring)."""

    enabled = True

    def __init__(self, device: torch.device, backend: str):
        super().__init__(device)
        self.backend = backend
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.comm_device = device if backend == "nccl" else torch.device("cpu")
        self.bytes = {"loss": 0, "grad": 0}
        self.calls = 0
        self.comm_s = 0.0
        self._votes = 0
        self._hooks: list = []
        self.owns_group = False  # set by setup() when it created the process group

    # -- training ---------------------------------------------------------------------------------

    def _all_reduce(self, tensor: torch.Tensor, kind: str) -> None:
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        self.comm_s += time.perf_counter() - t0
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.calls += 1

    def shard(self, items: list) -> list:
        if len(items) < self.world_size:
            raise ValueError(f"a batch of {len(items)} examples cannot be split over {self.world_size} "
                             "processes: run.batch_size must be at least the number of processes")
        return items[self.rank::self.world_size]

    def wrap_closure(self, closure, local_weight: float, total_weight: float):
        scale = float(local_weight) / float(total_weight)

        def global_loss(*args):  # args: (part, parts) of gradient accumulation, passed through
            local = closure(*args)
            (total,) = self._global_losses([local], local_weight, total_weight)
            if torch.is_grad_enabled() and local.requires_grad:
                return _GlobalLoss.apply(local, total, scale)
            return total

        dual = getattr(closure, "dual", None)
        if dual is not None:  # offloaded ZO steps: (L+, L-) from one pass, reduced together (zoexp.offload)
            global_loss.dual = lambda *args, **kwargs: self._global_losses(dual(*args, **kwargs), local_weight,
                                                                           total_weight)
        return global_loss

    def _global_losses(self, losses, local_weight: float, total_weight: float) -> tuple:
        """The global mean of each of this rank's ``losses`` (weighted by ``local_weight`` of ``total_weight``),
        and every rank's stop vote, from one all-reduce of float64s."""
        values = [v.detach().reshape(()).to(torch.float64) * float(local_weight) for v in losses]
        stop = torch.tensor(float(bool(self.local_stop())), dtype=torch.float64)
        buf = torch.stack([*(v.to(self.comm_device) for v in values), stop.to(self.comm_device)])
        self._all_reduce(buf, "loss")
        self._votes = int(buf[-1].item())
        return tuple((buf[i] / float(total_weight)).to(device=v.device, dtype=v.dtype) for i, v in enumerate(losses))

    def sync_gradients(self, optimizer) -> None:
        """All-reduce (sum) the gradient of every parameter the optimizer owns as backward produces it.

        Hooks are registered whatever ``requires_grad`` is now (hybrid methods switch it per step).
        """
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.is_floating_point():
                    continue
                seen.add(id(p))
                flag = p.requires_grad
                p.requires_grad_(True)
                self._hooks.append(p.register_hook(self._reduce_grad))
                p.requires_grad_(flag)

    def _reduce_grad(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        self._all_reduce(grad, "grad")
        return grad

    def stop_requested(self) -> bool:
        """Whether any rank had received a stop signal at the last forward pass (the same answer on
        every rank, so all of them stop after the same step)."""
        return self._votes > 0

    # -- evaluation, bookkeeping --------------------------------------------------------------------

    def evaluate(self, fn, examples):
        examples = list(examples)
        shard = examples[self.rank::self.world_size]
        results = self.all_gather(fn(shard) if shard else {"n": 0})
        filled = [r for r in results if r.get("n")]
        if not filled:
            return results[0]
        n = sum(r["n"] for r in filled)
        combined = {}
        for key, value in filled[0].items():
            if key == "n":
                combined[key] = n
            elif isinstance(value, int | float) and not isinstance(value, bool):
                combined[key] = sum(r[key] * r["n"] for r in filled) / n
            elif isinstance(value, list):  # per-example records (run.save_predictions): every shard's
                combined[key] = [x for r in filled for x in r[key]]
            else:
                combined[key] = value
        return combined

    def shared_run_dir(self, run_dir: Path) -> Path:
        """Rank 0's run directory for everyone (Hydra's timestamped directories can differ across ranks;
        another rank's own directory is removed if it is empty)."""
        main_dir = Path(self.broadcast(str(Path(run_dir).resolve()) if self.is_main else None))
        own = Path(run_dir).resolve()
        if not self.is_main and own != main_dir and own != Path.cwd().resolve():
            for empty in (own, own.parent):  # its job directory, and the sweep directory it claimed
                try:
                    if empty == own.parent and [p.name for p in empty.iterdir()] == ["multirun.yaml"]:
                        (empty / "multirun.yaml").unlink()
                    empty.rmdir()
                except OSError:
                    break
        return main_dir

    def best_file(self) -> str:
        return "best.safetensors" if self.is_main else f"best.rank{self.rank}.safetensors"

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        t = torch.tensor(float(value), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        dist.barrier()

    def check_replicas(self, model) -> None:
        """Every rank must start from the same weights (same seed and source); checked by a checksum."""
        total = sum(p.detach().sum(dtype=torch.float64).item() for p in model.parameters())
        count = sum(p.numel() for p in model.parameters())
        sums = self.all_gather((count, total))
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"model replicas differ across ranks (parameter checksums {sums}); every rank "
                               "must load the same model with the same run.seed")

    def reduce_measurements(self, row: dict) -> None:
        """Wall-clock and peak memory of the row: the maximum over ranks; per-rank values kept too."""
        local = {k: v for k, v in row.items() if k.startswith(("time/", "mem/")) and isinstance(v, int | float)}
        per_rank = self.all_gather(local)
        for key in set().union(*per_rank):
            row[key] = max(d[key] for d in per_rank if key in d)
        shown = ("time/train_s", "time/eval_s", "time/total_s", "time/allreduce_s", "mem/train_rss_peak_bytes",
                 "mem/train_gpu_allocated_peak_bytes")
        row["dist/per_rank"] = [{k: d[k] for k in shown if k in d} for d in per_rank]

    def row_fields(self, steps_run: int) -> dict:
        steps = max(int(steps_run), 1)
        return {
            "dist/world_size": self.world_size,
            "dist/backend": self.backend,
            "dist/allreduce_calls": self.calls,
            "dist/allreduce_bytes_per_step": (self.bytes["loss"] + self.bytes["grad"]) / steps,
            "dist/loss_allreduce_bytes_per_step": self.bytes["loss"] / steps,
            "dist/grad_allreduce_bytes_per_step": self.bytes["grad"] / steps,
            "time/allreduce_s": self.comm_s,
        }

    def close(self, barrier: bool = True) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        # the end of the run: the group it created ends with it (a multirun's jobs share one; zoexp.cli.main
        # ends it when the command ends)
        if self.owns_group and not _in_multirun():
            shutdown(barrier)


def _submitit_world() -> int:
    """Inside a SLURM (or local) submitit job with several tasks: export torch.distributed's env:// variables."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    try:
        import submitit
    except ImportError:
        return 1
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return 1
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.num_tasks


def setup(cfg, device: torch.device) -> Single:
    """``Single`` for a plain run; ``DataParallel`` (process group initialised) when launched with several
    processes and ``run.distributed`` is ``auto`` or ``true``. Backend: nccl on CUDA, gloo on CPU."""
    mode = str(cfg.run.get("distributed", "auto")).lower()
    if mode in ("false", "off", "no", "0", "none"):
        return Single(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        world = _submitit_world()
    if world <= 1:
        if mode in ("true", "on", "yes", "1"):
            raise ValueError("run.distributed=true needs several processes: launch with "
                             "torchrun --nproc_per_node=N -m zoexp ... (or a SLURM job with N tasks)")
        return Single(device)
    if cfg.get("model") is not None and cfg.model.get("device_map") is not None:
        raise ValueError("model.device_map shards one model over this process's devices; with several "
                         "processes use one device per rank (drop model.device_map) or one process")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = str(cfg.run.get("dist_backend") or "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Imported before the group exists: its functions bind `group=group.WORLD` as default arguments
        # when the module is first imported (transformers' from_config imports it lazily); bound to a
        # live group they keep it alive past destroy_process_group, and a gloo worker thread then
        # aborts the process at interpreter exit (SIGABRT, "terminate called without an active
        # exception"), so torchrun reports a successful run as failed.
        importlib.import_module("torch.distributed.nn.functional")

        timeout = timedelta(minutes=float(cfg.run.get("dist_timeout_min") or 30))
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(shutdown)
        created = True
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group uses {dist.get_backend()}, this run needs {backend}")
    else:
        created = False
    group = DataParallel(device, backend)
    group.owns_group = created
    return group


def _in_multirun() -> bool:
    """Whether this process runs a Hydra multirun: its jobs reuse one process group (torchrun's store cannot
    host a second group of the same ranks), destroyed when the process ends."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def shutdown(barrier: bool = False) -> None:
    """Destroy the default process group, if any (the end of a data-parallel run; also at exit).

    ``barrier``: after a run that ended normally on every rank, wait for all of them first, so no rank
    tears down its gloo pairs while another still sends (never after a failure: the others may not come).
    Python threads left behind are reported (there should be none).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        try:
            dist.barrier()
        except Exception as exc:  # a peer died: tear down anyway
            log.warning("barrier before destroying the process group failed: %s", exc)
    dist.destroy_process_group()
    gc.collect()  # drop the last references to the group's C++ objects now, not at interpreter shutdown
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if left:
        log.warning("threads still running after the process group was destroyed: %s", ", ".join(left))
