"""Where a run computes and in which precision: device and precision resolution, what the CPU can do,
and a small matmul probe.

Devices (`--device`): `auto` (CUDA when a GPU is visible, else the CPU), `cpu`, `cuda`, `cuda:N`,
`mps`. The model, its adapters, heads, batches, generation and LEFF's distillation run on the run's
device; what crosses the wire (messages, the server state, client stores, checkpoints) stays on
`WIRE_DEVICE`, so the server aggregates the same float64 sums whatever device the clients train on.

Precisions (`--precision`): `auto` picks bf16 only where the hardware runs it natively and faster than
float32 (a CUDA GPU with bf16, Ampere and later; a CPU with AVX-512 BF16 or AMX), float32 elsewhere.
`bf16` and `fp16` are autocast (routers, softmax and losses stay float32); `fp16` adds a gradient
scaler and runs on CUDA only. The decision reads the CPU's flags (`/proc/cpuinfo`), never a timing,
so the same machine always resolves the same way; the matmul probe only measures what an explicit
`--precision bf16` costs on a CPU without native bf16, and feeds the benchmarks.

Seeded draws and devices: every draw that defines shared state (common initialisations, masks,
router and head inits, partitions, block draws) is made on the CPU from a derived seed
(`seeding.torch_generator`, numpy), so it is identical on every device. Draws inside the computation
(dropout) come from the compute device's own generator, seeded per (client, round, phase) by
`torch.manual_seed`: a run reproduces on one device type, and a GPU run differs from a CPU run by
its dropout masks and its kernels' rounding, not by its initialisations.

This module imports torch only inside functions, so `RunConfig` can validate `--device` cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from dataclasses import dataclass, field

from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")

CPU = "cpu"  # the CPU as a compute device
WIRE_DEVICE = CPU  # where every tensor that leaves the model lives: messages, server state, stores, checkpoints
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # cuda:N for any GPU index N
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(?::\d+)?)$")
# /proc/cpuinfo flags that give a CPU native bf16 matmuls (oneDNN uses them); the others are shown.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "fma")


# ------------------------------------------------------------------ devices
def check_device(spec: str) -> str:
    """`spec` if it is a device fedpeft knows (syntax only, nothing is probed), else a FedPeftError."""
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec):
        raise FedPeftError(f"unknown --device {spec!r}: choose auto, cpu, cuda, cuda:N (a GPU index) or mps")
    return spec


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(spec: str) -> str:
    """The device a run uses: `auto` → `cuda` when a CUDA GPU is visible, else `cpu`; an explicit
    device must exist here (a clear error otherwise)."""
    check_device(spec)
    if spec == "auto":
        return "cuda" if cuda_available() else CPU
    if spec.startswith("cuda"):
        if not cuda_available():
            raise FedPeftError(f"--device {spec}: no CUDA GPU is visible here (torch {_torch_version()}, "
                               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                               f"use --device cpu or auto")
        import torch

        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise FedPeftError(f"--device {spec}: this machine shows {torch.cuda.device_count()} CUDA GPU(s), "
                               f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if spec == "mps" and not mps_available():
        raise FedPeftError("--device mps: the Apple GPU (MPS) is not available to this torch build: use --device cpu")
    return spec


def device_type(device) -> str:
    """"cpu", "cuda" or "mps" for a device name or torch.device (what autocast and generators key on)."""
    return getattr(device, "type", None) or str(device).split(":")[0]


def simulated_client_device(run_device: str, client_gpus: float) -> str:
    """The device of a flower-sim client: `cuda` with a GPU share (Ray makes the share's GPU the only
    visible one in the client's actor, as cuda:0), the CPU without one (Ray hides every GPU from it)."""
    if client_gpus > 0 and device_type(run_device) == "cuda":
        return "cuda"
    return CPU


# ------------------------------------------------------------------ the CPU
@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC 9654 96-Core Processor", or the platform's processor string
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    flags: frozenset = field(default_factory=frozenset)  # /proc/cpuinfo flags (empty where there is no such file)

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    def describe(self) -> str:
        shown = [f for f in SHOWN_FLAGS if f in self.flags]
        return (f"{self.model}; torch CPU capability {self.capability}; flags {' '.join(shown) or 'unknown'}; "
                f"native bf16: {'yes (' + ', '.join(f for f in NATIVE_BF16_FLAGS if f in self.flags) + ')' if self.native_bf16 else 'no'}")


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    model, flags = "", frozenset()
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """What this process's CPU can do (read once per process)."""
    import platform

    import torch

    model, flags = _read_cpuinfo()
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown CPU",
                   capability=torch.backends.cpu.get_cpu_capability(), flags=flags)


def cuda_native_bf16(device: str = "cuda") -> bool:
    import torch

    with torch.cuda.device(torch.device(device)):
        return torch.cuda.is_bf16_supported(including_emulation=False)


# ------------------------------------------------------------------ precision
def check_precision(spec: str) -> str:
    if spec not in PRECISIONS:
        raise FedPeftError(f"unknown --precision {spec!r}: choose one of {', '.join(PRECISIONS)}")
    return spec


def native_bf16(device: str) -> bool:
    """Does `device` (resolved) run bf16 matmuls natively, i.e. faster than float32?"""
    kind = device_type(device)
    if kind == "cuda":
        return cuda_native_bf16(device)
    if kind == CPU:
        return cpu_info().native_bf16
    return False  # MPS: bf16 works on recent macOS, but auto keeps float32 there


def resolve_precision(spec: str, device: str) -> str:
    """The precision a run uses on the (resolved) `device`: `auto` → bf16 where the hardware runs it
    natively, else fp32; an explicit choice is kept, except fp16 off CUDA (an error)."""
    check_precision(spec)
    kind = device_type(device)
    if spec == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if spec == "fp16" and kind != "cuda":
        raise FedPeftError(f"--precision fp16 (float16 autocast with a gradient scaler) runs on CUDA GPUs only, "
                           f"and this run's device is {device}: use --precision auto, bf16 or fp32")
    return spec


def precision_note(device: str, precision: str) -> str:
    """Why `precision` suits `device`, in words, for the run log."""
    kind = device_type(device)
    where = "this CPU" if kind == CPU else f"this GPU ({device})" if kind == "cuda" else device
    native = native_bf16(device)
    if precision == "bf16":
        return f"bf16 autocast: {where} runs bf16 natively" if native else f"bf16 autocast, NOT native on {where}"
    if precision == "fp16":
        return "fp16 autocast with a gradient scaler"
    if native:
        return f"float32 (bf16 would be native on {where}: --precision auto or bf16 uses it)"
    return f"float32: {where} has no native bf16"


def autocast(precision: str, device):
    """The autocast context of `precision` on `device`'s type (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be resolved (fp32, bf16 or fp16), got {precision!r}")
    return torch.autocast(device_type(device), dtype=dtype)


def half_dtype(precision: str):
    """The half dtype frozen weights may be stored in for `precision`, or None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def accumulation_dtype(device):
    """float64 for sums of squares on `device`, float32 where it has no float64 (MPS)."""
    import torch

    return torch.float32 if device_type(device) == "mps" else torch.float64


# ------------------------------------------------------------------ the matmul probe
def matmul_gflops(dtype_name: str = "fp32", *, n: int = 512, device: str = CPU, repeats: int = 5,
                  min_seconds: float = 0.05) -> float:
    """Best-of-`repeats` GFLOP/s of an n×n by n×n matmul in `dtype_name` (fp32, bf16, fp16) on `device`,
    each repeat timing enough matmuls to last `min_seconds`. Uses torch's current thread count."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device_type(device) == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel choice, caches
    sync()
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, 2 * n ** 3 * count / elapsed / 1e9)
    return best


@functools.lru_cache(maxsize=None)
def bf16_cost_on_cpu(n: int = 256) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of one small matmul on this CPU, measured once per process."""
    return matmul_gflops("fp32", n=n, repeats=3), matmul_gflops("bf16", n=n, repeats=3)


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return None


def machine_summary() -> str:
    """One line for benchmark headers and logs: CPU model, instruction sets, threads, load."""
    import torch

    load = load_average()
    return (f"{cpu_info().describe()}; torch {_torch_version()}, {torch.get_num_threads()} thread(s), "
            f"{os.cpu_count()} logical CPU(s); load average {'/'.join(f'{x:.2f}' for x in load) if load else 'n/a'}")


# ------------------------------------------------------------------ what a run says
def announce(device: str, precision: str) -> None:
    """The run log's line on where and in which precision the run computes, and a warning with the
    measured cost when bf16 runs on a CPU without native bf16."""
    kind = device_type(device)
    if kind == CPU:
        where = f"device cpu ({cpu_info().describe()})"
    elif kind == "cuda":
        import torch

        where = f"device {device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        where = f"device {device}"
    log.info("hardware: %s; precision %s", where, precision_note(device, precision))
    if precision == "bf16" and not native_bf16(device):
        if kind == CPU:
            fp32, bf16 = bf16_cost_on_cpu()
            log.warning("--precision bf16 on a CPU without native bf16 (no %s flag): a 256³ matmul measured "
                        "%.1f GFLOP/s in bf16 against %.1f in float32 here, %.1f× slower; --precision auto "
                        "(or fp32) trains in float32 on this machine", " or ".join(NATIVE_BF16_FLAGS), bf16, fp32,
                        fp32 / max(bf16, 1e-9))
        else:
            log.warning("--precision bf16 on %s, which has no native bf16: it may run slower than float32 "
                        "(--precision auto picks float32 here%s)", device,
                        "; fp16 with a gradient scaler is native on older GPUs" if kind == "cuda" else "")


def _torch_version() -> str:
    import torch

    return torch.__version__
