"""A whole Flower deployment on this machine: one SuperLink and N SuperNodes as separate processes,
driven with Flower's own commands (the README's multi-machine steps, on 127.0.0.1).

For the deployment tests (test_flower.py) and benchmarks/flower_overhead.py, which imports it from
this folder (it is not part of the fedpeft package). Every process is started in its own session and
stopped with its descendants (Flower detaches its SuperExec processes).

SuperNodes run as the docs recommend: `python -m fedpeft.flower_app supernode`, a SuperNode with
`--isolation process` and one long-lived fedpeft ClientApp worker, so the model is loaded once per node.
`isolation="subprocess"` gives Flower's default instead (a new `flwr-clientapp` process per
message); its SuperExecs then look for new tasks every 0.1 s instead of Flower's 1 s
(`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`), a cost paid on every message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process we started and everything it started, then reap it."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Loopback:
    """`state="file"` (default): the SuperLink keeps its state in `superlink.db` (`--database`, as the
    docs' TLS recipe does, so registrations and runs survive a SuperLink restart); `"memory"`: Flower's
    default in-memory state, which skips a SQLite commit per message object (faster rounds)."""

    def __init__(self, root: str | Path, *, tls: bool = False, auth: bool = False, env: dict[str, str] | None = None,
                 state: str = "file"):
        if state not in ("file", "memory"):
            raise ValueError(f"state must be 'file' or 'memory', not {state!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth, self.state = tls, auth, state
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        bindir = str(Path(sys.executable).parent)
        # the processes run in self.root: relative PYTHONPATH entries (PYTHONPATH=src) would not reach fedpeft
        pythonpath = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
        self.env = {**os.environ, "PYTHONPATH": pythonpath, "FLWR_HOME": str(self.root / "flwr-home"),
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                    "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
        self.bin = Path(bindir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.certs: dict[str, Path] = {}
        if tls:
            from fedpeft.engines.flower.deploy import write_certificates

            self.certs = write_certificates(self.root / "certs")
        from fedpeft.engines.flower.deploy import write_app, write_connection

        self.app_dir = write_app(self.root / "app")
        write_connection(self.env["FLWR_HOME"], "loopback", self.address,
                         root_certificates=str(self.certs["ca"]) if tls else None, insecure=not tls)

    # ------------------------------------------------------------ processes
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def tls_args(self) -> list[str]:
        return ["--insecure"] if not self.tls else []

    def start_superlink(self) -> subprocess.Popen:
        args = [str(self.bin / "flower-superlink"), "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.state == "file":
            args += ["--database", str(self.root / "superlink.db")]
        if self.tls:
            args += ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                     "--ssl-ca-certfile", str(self.certs["ca"])]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        proc = self._start("superlink", args)
        self.wait_for_log("superlink", "Fleet HTTP API", 60)
        return proc

    def start_supernode(self, index: int, node_config: dict[str, Any], *, key: Path | None = None,
                        name: str | None = None, extra: list[str] | None = None,
                        heartbeat: float | None = None, isolation: str = "process") -> subprocess.Popen:
        """`isolation="process"` (default): `python -m fedpeft.flower_app supernode`, the documented way:
        a SuperNode with its long-lived fedpeft ClientApp worker (a child process) and short polls.
        `"subprocess"`: Flower's `flower-supernode` as it comes (a ClientApp process per message).
        `heartbeat`: the interval the node announces and keeps to, instead of Flower's 30 s (at least
        10, the SuperLink's minimum). The SuperLink takes a node for gone 2 intervals after its last
        heartbeat, and then fails its pending messages: a killed node is noticed within 2·heartbeat s
        instead of 60 s. Flower has no flag for it, so the node's CLI runs with the interval set in the
        two modules that send node heartbeats (the ClientApps' task heartbeats keep Flower's)."""
        conf = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
        start = ("from fedpeft.engines.flower.supernode import main; sys.exit(main(sys.argv[1:]))"
                 if isolation == "process" else
                 "from flwr.supernode.cli import flower_supernode; sys.exit(flower_supernode())")
        if heartbeat is None and isolation == "process":
            cmd = [sys.executable, "-m", "fedpeft.flower_app", "supernode"]
        elif heartbeat is None:
            cmd = [str(self.bin / "flower-supernode")]
        else:
            code = ("import sys; import flwr.supernode.fleet_http_connection as f, flwr.supercore.heartbeat as h; "
                    "f.HEARTBEAT_DEFAULT_INTERVAL = h.HEARTBEAT_DEFAULT_INTERVAL = float(sys.argv.pop(1)); " + start)
            cmd = [sys.executable, "-c", code, str(heartbeat)]
        args = cmd + ["--superlink", self.address, "--port", str(free_port()), "--node-config", conf,
                      "--isolation", isolation]
        args += ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        args += extra or []
        return self._start(name or f"supernode{index}", args)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        return self.flwr("supernode", "register", str(public_key), "loopback")

    def submit(self, run_config: dict[str, Any]) -> str:
        """`flwr run APP loopback -c ...`: the run id (the run continues on the SuperLink)."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        res = self.flwr("run", str(self.app_dir), "loopback", "--run-config", overrides, "--format", "json")
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}\n{res.stderr}")
        return str(json.loads(res.stdout).get("run-id", ""))

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        path = self.root / f"{name}.log"
        while time.time() < deadline:
            if path.is_file() and text in path.read_text(errors="replace"):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.tail(name)}")
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not log {text!r} within {timeout:.0f} s: {self.tail(name)}")

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def check(self) -> None:
        """Raise if the SuperLink has died."""
        proc = self.procs.get("superlink")
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {proc.returncode}: {self.tail('superlink')}")

    def kill(self, name: str) -> None:
        """Kill a process and everything it started (a SuperNode: its ClientApp worker too)."""
        kill_tree(self.procs.pop(name))

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_file(path: Path, timeout: float, *, alive: Loopback | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            return
        if alive is not None:
            alive.check()
        time.sleep(0.5)
    detail = alive.tail("superlink") if alive else ""
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s. SuperLink log:\n{detail}")
