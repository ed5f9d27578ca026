"""What every benchmark prints about the machine, and whether its figures can be called final.

- `machine_info()`: CPU model, the instruction sets that decide bf16 speed, torch's
  `torch.backends.cpu.get_cpu_capability()`, torch version, thread count, OMP_NUM_THREADS, logical
  CPUs. The CPU model, the flags and `native_bf16` come from `fedpeft.hardware.cpu_info()`, the same
  decision `--precision auto` makes (AVX-512 BF16 or AMX-BF16: without them torch 2.13 runs bf16
  matmuls through slow fallbacks, measured 90x slower than fp32 on an AVX2-only EPYC), so a
  benchmark skips bf16 exactly where a run would not pick it.
- `LoadMonitor`: samples, every few seconds while the benchmark runs, the 1-minute load average and
  (on Linux) the CPU time of every other process: the machine's busy time from /proc/stat minus this
  process's own from /proc/self/stat. A run is **final** only when the others used on average at most
  OTHERS_MEAN_LIMIT of a core and in no interval more than OTHERS_PEAK_LIMIT; otherwise it is
  **PROVISIONAL**: other work shared the cores, so its absolute figures are not the machine's (ratios
  between interleaved passes inside the run are still paired). The load average alone could not tell:
  a benchmark's own torch threads plus its Python thread keep it above the thread count on an idle
  machine (paper_round.py's 2 threads held it at 1.65–2.26 with nothing else running), and it lags by a
  minute. Without /proc the rule falls back to "no load sample above the thread count". `--quick` runs
  are never final.
- `SpeedProbe` / `host_speed` / `host_line`: the matmul speed of the moment, probed beside timed work.
  An idle guest is not an idle host: on this project's KVM guests the same 2048³ product ran at
  115-188 GFLOP/s within one idle minute, and training passes moved with it. A benchmark that brackets
  its timed passes with probes reports their spread, and beyond HOST_SPREAD_LIMIT its figures are not
  final though no other process ran (benchmarks/README.md#throughputpy).
- `one_line_errors`: a benchmark's `main` that turns a user's mistake (FedPeftError) into one line,
  `fedpeft: error: …`, and status 2, as `fedpeft` itself does.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
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


OTHERS_MEAN_LIMIT = 0.1  # cores: other processes' average CPU use over the run that still counts as idle
OTHERS_PEAK_LIMIT = 0.5  # cores: ... and in any one sampling interval


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid → (ppid, utime + stime + cutime + cstime in clock ticks) of every process /proc shows."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        out[int(name)] = (int(f[1]), sum(int(x) for x in f[11:15]))
    return out


def cpu_clock() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process and its
    descendants: torch.compile's workers, a Flower deployment's processes), or None where /proc is
    missing. Busy = user + nice + system + irq + softirq + steal."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
        procs = _proc_stats()
    except (OSError, ValueError, IndexError):
        return None
    tree, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = sum(procs[pid][1] for pid in tree if pid in procs)
    return time.monotonic(), (user + nice + system + irq + softirq + steal) / hz, own / hz


def others_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Cores the other processes used on average between two cpu_clock() readings."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else 0.0


class LoadMonitor:
    """Samples os.getloadavg()[0] and cpu_clock() every `every` seconds in a daemon thread between start()
    and stop()."""

    def __init__(self, threads: int, every: float = 5.0):
        self.threads, self.every = threads, every
        self.samples: list[float] = []
        self.clocks: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.samples.append(os.getloadavg()[0])
        clock = cpu_clock()
        if clock is not None:
            self.clocks.append(clock)

    def start(self) -> "LoadMonitor":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self._sample()
        return self.summary()

    def summary(self, quick: bool = False) -> dict[str, Any]:
        s = sorted(self.samples) or [os.getloadavg()[0]]
        limit = float(self.threads)
        out = {"load_min": s[0], "load_median": s[len(s) // 2], "load_max": s[-1], "samples": len(s), "limit": limit}
        if len(self.clocks) >= 2:
            steps = [others_cores(a, b) for a, b in zip(self.clocks, self.clocks[1:])]
            out.update(others_mean=others_cores(self.clocks[0], self.clocks[-1]), others_peak=max(steps))
            contended = out["others_mean"] > OTHERS_MEAN_LIMIT or out["others_peak"] > OTHERS_PEAK_LIMIT
        else:
            contended = s[-1] > limit
        status = "quick (smoke check, not a measurement)" if quick else ("PROVISIONAL" if contended else "final")
        return {**out, "contended": contended, "status": status}


def status_line(load: dict[str, Any]) -> str:
    load_text = (f"1-minute load average during the run: min {load['load_min']:.2f}, median {load['load_median']:.2f}, "
                 f"max {load['load_max']:.2f} over {load['samples']} samples")
    if "others_mean" in load:
        text = (f"other processes' CPU use during the run: {load['others_mean']:.2f} cores on average, at most "
                f"{load['others_peak']:.2f} in one interval (limits {OTHERS_MEAN_LIMIT} / {OTHERS_PEAK_LIMIT}); "
                f"{load_text} → **{load['status']}**")
    else:
        text = f"{load_text}; limit {load['limit']:.0f} (the thread count) → **{load['status']}**"
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


HOST_SPREAD_LIMIT = 1.25  # fastest / slowest fp32 probe beyond which a run is not called final


def host_speed(probe: "SpeedProbe") -> dict[str, Any]:
    """min / median / max GFLOP/s of the probes per dtype, and the fp32 spread (fastest / slowest)."""
    out: dict[str, Any] = {d: [min(x), statistics.median(x), max(x)] for d, x in probe.samples.items() if x}
    fp32 = probe.samples["float32"]
    out["spread"] = max(fp32) / min(fp32) if fp32 else 1.0
    return out


def host_line(hs: dict[str, Any], where: str = "around the training passes") -> str:
    """The report line for host_speed's dict."""
    ranges = "; ".join(f"{d} {v[0]:.0f} / {v[1]:.0f} / {v[2]:.0f}" for d, v in hs.items() if d != "spread")
    verdict = (f"beyond ×{HOST_SPREAD_LIMIT}: the host's speed moved under the run, so the figures are not final even on "
               "an idle guest" if hs["spread"] > HOST_SPREAD_LIMIT else f"within ×{HOST_SPREAD_LIMIT}")
    return (f"matmul probes {where} (GFLOP/s, min / median / max): {ranges}; fp32 fastest / "
            f"slowest ×{hs['spread']:.2f}, {verdict}")


class SpeedProbe:
    """The machine's matmul speed *now*: a square product of each dtype repeated for `seconds`.

    On a shared VM the speed of the same product moves with the host (other tenants, the boost
    clock): within one idle run the 2048³ fp32 product measured 115-188 GFLOP/s, and training passes
    moved with it. One peak taken in section 1 then mixes the step's cost with the host's mood at two
    different moments; a probe before and after each training pass pairs the pass with the speed of
    its own minutes (`share_of_adjacent_peak`), and the probes' spread says how much the host varied."""

    def __init__(self, n: int, seconds: float):
        self.seconds = seconds
        self.mats = {d: (torch.randn(n, n).to(d), torch.randn(n, n).to(d)) for d in (torch.float32, torch.bfloat16)}
        self.flop = 2 * n ** 3
        self.samples: dict[str, list[float]] = {"float32": [], "bfloat16": []}

    def __call__(self, dtype: str) -> float:
        a, b = self.mats[torch.float32 if dtype == "float32" else torch.bfloat16]
        k, t = 0, time.perf_counter()
        while k == 0 or time.perf_counter() - t < self.seconds:
            a @ b
            k += 1
        gflops = self.flop * k / (time.perf_counter() - t) / 1e9
        self.samples[dtype].append(gflops)
        return gflops
