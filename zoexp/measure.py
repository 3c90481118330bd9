"""Wall-clock, CPU time and peak memory per phase (load, train, eval, ...).

Host memory: the peak resident set size of the process, reset at each phase start by writing 5 to
/proc/self/clear_refs (Linux), so the training peak is not the loading peak; where that is not
possible a sampling thread (every 5 ms) measures the phase's peak instead. Accelerator memory: torch's
peak allocated / reserved bytes, reset at each phase start. CPU time: the process's user + system
seconds over the phase (all threads), ``cpu/<phase>_s``; divided by wall-clock x ``threads`` it says
how much of the phase the process had its cores (below 1: the machine was shared), which the report
uses to say when wall-clocks in one table were measured under different conditions.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch


def current_rss() -> int:
    return _status_field("VmRSS")


def _status_field(name: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        if name == "VmHWM":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover - non-POSIX
        pass
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self, period: float = 0.005):
        super().__init__(daemon=True)
        self.period, self.peak, self._stop_event = period, current_rss(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss())


class Meter:
    """Collects per-phase measurements into a flat dict: time/<phase>_s, mem/<phase>_rss_peak_bytes, ..."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.devices = [self.device]  # all the devices a device-mapped model spans (set by the runner)
        self.values: dict[str, float | int] = {}

    def _cuda(self) -> list[torch.device]:
        if not torch.cuda.is_available():
            return []
        return [d for d in self.devices if d.type == "cuda"]

    @contextmanager
    def phase(self, name: str):
        sampler = None
        if not _reset_hwm():
            sampler = _Sampler()
            sampler.start()
        for d in self._cuda():
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            for d in self._cuda():
                torch.cuda.synchronize(d)
            elapsed = time.perf_counter() - start
            self.values[f"time/{name}_s"] = self.values.get(f"time/{name}_s", 0.0) + elapsed
            self.values[f"cpu/{name}_s"] = self.values.get(f"cpu/{name}_s", 0.0) + time.process_time() - cpu_start
            peak = sampler.stop() if sampler else _status_field("VmHWM")
            key = f"mem/{name}_rss_peak_bytes"
            self.values[key] = max(self.values.get(key, 0), peak)
            cuda = self._cuda()
            for kind, fn in (("allocated", torch.cuda.max_memory_allocated),
                             ("reserved", torch.cuda.max_memory_reserved)):
                if not cuda:
                    break
                # several devices (device map): the key is their total, the per-device peaks come beside it
                peaks = [int(fn(d)) for d in cuda]
                k = f"mem/{name}_gpu_{kind}_peak_bytes"
                self.values[k] = max(self.values.get(k, 0), sum(peaks))
                if len(cuda) > 1:
                    old = self.values.get(k + "_per_device", [0] * len(peaks))
                    self.values[k + "_per_device"] = [max(a, b) for a, b in zip(old, peaks)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    import platform

    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
