"""Counter-based Gaussian noise (the ``philox`` noise backend): its definition and its CPU kernel.

Element i of a chunk with 64-bit seed s is a pure function of (s, i): Philox4x32-10 (Salmon et al.,
SC 2011; the generator of cuRAND and of torch's CUDA RNG) turns counter i // 4 (in a 16-lane block
layout) into four 32-bit words, and Box-Muller turns each pair into two float32 normals with
polynomial ln, sin and cos evaluated in float32 in a fixed order. ``philox.c`` states the definition
exactly; ``normal`` below is the same definition in pure torch (any device, slow on CPU), and
``Kernel`` the C implementation (about 1 ns per number per core with AVX-512), which zoexp builds
with the system C compiler on first use and checks against ``normal`` before using it.

Why not torch's ``normal_``: on CPU it produces about 0.25 G numbers/s per core, so regenerating z
three times per MeZO step for a 135M-parameter model costs about as much as the two forward passes;
and a counter-based definition lets any slice of z be produced independently of the rest.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("zoexp")

SOURCE = Path(__file__).with_name("philox.c")
W, BLOCK = 16, 64  # lanes per block, floats per block

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF

# The same float32 constants as philox.c, as exact hexadecimal floats.
LOG_P = tuple(float.fromhex(h) for h in (
    "0x1.555552p-2", "-0x1.0000c8p-2", "0x1.99a14cp-3", "-0x1.54d54ep-3",
    "0x1.22dc46p-3", "-0x1.09abecp-3", "0x1.045944p-3", "-0x1.4bd736p-4"))
SIN_P = tuple(float.fromhex(h) for h in ("-0x1.555554p-3", "0x1.110ccap-7", "-0x1.9b0218p-13"))
COS_P = tuple(float.fromhex(h) for h in ("0x1.555554p-5", "-0x1.6c1354p-10", "0x1.9c05c4p-16"))
LN2 = float.fromhex("0x1.62e430p-1")
SQRT2 = float.fromhex("0x1.6a09e6p+0")
HALF_PI_2M22 = float.fromhex("0x1.921fb6p-22")


# --------------------------------------------------------------------------- the definition, in torch

def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low words of a * m for 32-bit a (int64 tensor) without overflowing int64."""
    lo_part, hi_part = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    hi = (hi_part + (lo_part >> 16)) >> 16
    return hi, lo


def philox4x32_10(counters: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of int64 tensors holding 32-bit words (the Random123 reference algorithm)."""
    c0, c1, c2, c3 = counters
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & _M32, (k1 + W1) & _M32
    return [c0, c1, c2, c3]


def _f32(x: float, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=device)


def _box_muller(xu: torch.Tensor, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 normals from two 32-bit words, operation for operation as in philox.c."""
    dev = xu.device
    c = lambda v: _f32(v, dev)  # noqa: E731 - exact float32 constants
    u = ((xu >> 9) * 2 + 1).to(torch.float32) * c(2.0**-24)
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    big = m > c(SQRT2)
    m = torch.where(big, m * c(0.5), m)
    e = e + big.to(torch.int32)
    f = m - c(1.0)
    f2 = f * f
    p = torch.full_like(f, LOG_P[7])
    for coef in reversed(LOG_P[:7]):
        p = p * f + c(coef)
    ln = f + ((f * f2) * p - c(0.5) * f2)
    ln = ln + e.to(torch.float32) * c(LN2)
    # torch's float32 sqrt is not correctly rounded on every CPU; sqrt in float64 rounded to float32 is
    # (53 >= 2 x 24 + 2 bits), i.e. equals the IEEE float32 sqrt of the kernel
    rad = torch.sqrt((c(-2.0) * ln).double()).float()
    k = xa >> 9
    jq = (k + (1 << 20)) >> 21
    rem = k - (jq << 21)
    x = (2 * rem + 1).to(torch.float32) * c(HALF_PI_2M22)
    x2 = x * x
    sp, cp = torch.full_like(x, SIN_P[2]), torch.full_like(x, COS_P[2])
    for i in (1, 0):
        sp = sp * x2 + c(SIN_P[i])
        cp = cp * x2 + c(COS_P[i])
    sn = x + (x * x2) * sp
    cs = (c(1.0) - c(0.5) * x2) + (x2 * x2) * cp
    q = jq & 3
    swap = (q & 1) == 1
    cv, sv = torch.where(swap, sn, cs), torch.where(swap, cs, sn)
    cv = torch.where(((q + 1) & 2) != 0, -cv, cv)
    sv = torch.where((q & 2) != 0, -sv, sv)
    return rad * cv, rad * sv


def normal(s: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """z[start:start + n] (float32) of the chunk with seed ``s``: the definition, in pure torch."""
    if n <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    b0, b1 = start // BLOCK, -(-(start + n) // BLOCK)
    j = torch.arange(b0 * W, b1 * W, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(j)
    x = philox4x32_10((j & _M32, j >> 32, zeros, zeros), (s & _M32, (s >> 32) & _M32))
    n0, n1 = _box_muller(x[0], x[1])
    n2, n3 = _box_muller(x[2], x[3])
    blocks = torch.stack([n0, n1, n2, n3]).view(4, b1 - b0, W).transpose(0, 1).reshape(-1)
    off = start - b0 * BLOCK
    return blocks[off:off + n].clone()


# --------------------------------------------------------------------------- the C kernel

class Kernel:
    """ctypes binding of the compiled ``philox.c``; calls release the GIL."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        lib.zo_philox_normal.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.zo_philox_normal.restype = None
        lib.zo_philox_axpy.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                       ctypes.c_void_p]
        lib.zo_philox_axpy.restype = None
        lib.zo_philox_scale_axpy.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                             ctypes.c_float, ctypes.c_void_p]
        lib.zo_philox_scale_axpy.restype = None
        lib.zo_philox4x32_10.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
        lib.zo_philox4x32_10.restype = None
        self.lib, self.path = lib, path
        #: whether the fused kernels round exactly like torch's ``add_(z, alpha=)`` and
        #: ``mul_(scale).add_(z, alpha=)`` here (checked on load; if not, zoexp does not use them)
        self.axpy_matches_torch = False

    def normal_(self, s: int, start: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous float32 CPU tensor ``out`` with z[start:start + out.numel()]."""
        self.lib.zo_philox_normal(s, start, out.numel(), out.data_ptr())
        return out

    def axpy_ptr(self, s: int, start: int, n: int, alpha: float, ptr: int) -> None:
        """p[0:n] = fma(alpha, z[start:start + n], p[0:n]) for the float32 array at address ``ptr``."""
        self.lib.zo_philox_axpy(s, start, n, alpha, ptr)

    def scale_axpy_ptr(self, s: int, start: int, n: int, scale: float, alpha: float, ptr: int) -> None:
        """p[0:n] = fma(alpha, z[start:start + n], scale * p[0:n]) (scale * p rounded first)."""
        self.lib.zo_philox_scale_axpy(s, start, n, scale, alpha, ptr)

    def block_words(self, ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
        out = (ctypes.c_uint32 * 4)()
        self.lib.zo_philox4x32_10((ctypes.c_uint32 * 4)(*ctr), (ctypes.c_uint32 * 2)(*key), out)
        return tuple(out)

    def check(self) -> str | None:
        """Why this build must not be used (None if it reproduces the definition)."""
        # Random123's known answer for Philox4x32-10, counter = key = 0
        if self.block_words((0, 0, 0, 0), (0, 0)) != (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8):
            return "Philox4x32-10 known-answer test failed"
        for s, start, n in ((0x243F6A8885A308D3, 0, 256), (12345, 37, 300), ((1 << 63) - 1, 1 << 33, 77)):
            got = self.normal_(s, start, torch.empty(n))
            if not torch.equal(got, normal(s, start, n)):
                return "kernel output differs from the torch definition"
        p, q = torch.linspace(-3, 3, 999), torch.linspace(-3, 3, 999)
        alpha, scale = -0.0123456789, 0.9999876
        z = normal(7, 5, p.numel())
        ref_p, ref_q = p.clone().add_(z, alpha=alpha), q.clone().mul_(scale).add_(z, alpha=alpha)
        self.axpy_ptr(7, 5, p.numel(), alpha, p.data_ptr())
        self.scale_axpy_ptr(7, 5, q.numel(), scale, alpha, q.data_ptr())
        self.axpy_matches_torch = torch.equal(p, ref_p) and torch.equal(q, ref_q)
        return None


_lock = threading.Lock()
_kernel: Kernel | None = None
_failure: str | None = None


def kernel() -> Kernel | None:
    """The compiled kernel (built on first use, cached per source, compiler and CPU), or None."""
    global _kernel, _failure
    if _kernel is not None or _failure is not None:
        return _kernel
    with _lock:
        if _kernel is None and _failure is None:
            try:
                k = Kernel(build())
                why = k.check()
            except Exception as exc:  # no compiler, failed build, unloadable library
                k, why = None, f"{type(exc).__name__}: {exc}"
            if why is None:
                _kernel = k
            else:
                _failure = why
                log.warning("zoexp: the C noise kernel is not available (%s); CPU noise uses torch's "
                            "generator instead (noise backend 'torch', about 5x slower)", why)
    return _kernel


def failure() -> str | None:
    """Why ``kernel()`` returned None (after it was called)."""
    return _failure


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]


def build(verbose: bool = False) -> Path:
    """Compile philox.c into the zoexp cache (``$ZOEXP_CACHE_DIR/kernels``) unless already there.

    -ffp-contract=off and no -ffast-math keep every float operation IEEE (no FMA contraction, no
    reassociation), so -march=native changes speed, never results; the cache key includes the CPU's
    feature flags so a shared home directory never loads a binary built for another CPU.
    """
    from zoexp.paths import cache_dir

    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    out_dir = cache_dir() / "kernels"
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-march=native"], []):
        flags = BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode() if extra else b""])).hexdigest()[:16]
        target = out_dir / f"philox-{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent builders never load a torn file
            if verbose:
                print(" ".join(cmd))
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
    raise RuntimeError("compiling philox.c failed: " + " | ".join(errors))


def describe() -> str:
    """One line for logs and ``make setup``: which kernel is in use, or why none is."""
    k = kernel()
    if k is None:
        return f"philox kernel: not available ({_failure}); CPU noise falls back to torch's generator"
    fused = "fused add_" if k.axpy_matches_torch else "add_ not fused (torch rounds differently here)"
    return f"philox kernel: {k.path} ({fused})"
