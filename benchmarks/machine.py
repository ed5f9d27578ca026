"""What every benchmark prints about the machine, and whether its figures can be called final.

- `machine_info()`: CPU model, the instruction sets that decide bf16 speed, torch's
  `torch.backends.cpu.get_cpu_capability()`, torch version, thread count, OMP_NUM_THREADS, logical
  CPUs. The CPU model, the flags and `native_bf16` come from `fedpeft.hardware.cpu_info()`, the same
  decision `--precision auto` makes (AVX-512 BF16 or AMX-BF16: without them torch 2.13 runs bf16
  matmuls through slow fallbacks, measured 90x slower than fp32 on an AVX2-only EPYC), so a
  benchmark skips bf16 exactly where a run would not pick it.
- `LoadMonitor`: samples the 1-minute load average every few seconds while the benchmark runs. A
  run is **final** only when no sample exceeds the thread count (the benchmark's own threads count
  toward the load, so an idle machine sits near it); otherwise it is **PROVISIONAL**: other work
  shared the cores, so its absolute figures are not the machine's (ratios between interleaved passes
  inside the run are still paired). `--quick` runs are never final.
- `one_line_errors`: a benchmark's `main` that turns a user's mistake (FedPeftError) into one line,
  `fedpeft: error: …`, and status 2, as `fedpeft` itself does.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import threading
import time
from typing import Any, Callable

import torch

from fedpeft import hardware
from fedpeft.errors import FedPeftError

ISA_FLAGS = hardware.SHOWN_FLAGS


def cpu_model() -> str:
    return hardware.cpu_info().model


def machine_info() -> dict[str, Any]:
    cpu = hardware.cpu_info()
    return {"cpu": cpu.model, "isa": {f: f in cpu.flags for f in ISA_FLAGS}, "torch_cpu_capability": cpu.capability,
            "native_bf16": cpu.native_bf16, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "logical_cpus": os.cpu_count(), "python": platform.python_version()}


def isa_line(info: dict[str, Any]) -> str:
    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["isa"].items())
    return (f"{flags}; torch CPU capability {info['torch_cpu_capability']}; native bf16: "
            f"{'yes' if info['native_bf16'] else 'no (bf16 figures skipped)'}")


class LoadMonitor:
    """Samples os.getloadavg()[0] every `every` seconds in a daemon thread between start() and stop()."""

    def __init__(self, threads: int, every: float = 5.0):
        self.threads, self.every = threads, every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "LoadMonitor":
        self.samples.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.samples.append(os.getloadavg()[0])
        return self.summary()

    def summary(self, quick: bool = False) -> dict[str, Any]:
        s = sorted(self.samples) or [os.getloadavg()[0]]
        limit = float(self.threads)
        contended = s[-1] > limit
        status = "quick (smoke check, not a measurement)" if quick else ("PROVISIONAL" if contended else "final")
        return {"load_min": s[0], "load_median": s[len(s) // 2], "load_max": s[-1], "samples": len(s),
                "limit": limit, "contended": contended, "status": status}


def status_line(load: dict[str, Any]) -> str:
    text = (f"1-minute load average during the run: min {load['load_min']:.2f}, median {load['load_median']:.2f}, "
            f"max {load['load_max']:.2f} over {load['samples']} samples; limit {load['limit']:.0f} "
            f"(the thread count) → **{load['status']}**")
    if load["status"] == "PROVISIONAL":
        text += (": the absolute figures are provisional (other processes shared the cores); "
                 "ratios between interleaved passes are still paired. Rerun on an idle machine for final figures.")
    return text


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, with a FedPeftError printed as `fedpeft: error: …` on stderr and returned as status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except FedPeftError as e:
            print(f"fedpeft: error: {e}", file=sys.stderr)
            return 2

    return wrapped
