"""A SuperNode with its fedpeft ClientApp worker, as one command, with shorter idle polling.

    python -m fedpeft.flower_app supernode --superlink HOST:PORT --port 9094 --node-config '...' [...]

takes `flower-supernode`'s own arguments and:
- starts the SuperNode with `--isolation process` (unless another isolation is given) and, beside
  it, one long-lived fedpeft ClientApp worker (engines/flower/worker.py) on its Runtime API
  (`--port`, local plain HTTP), so the node's model is loaded once, not once per message;
- shortens the SuperNode's fixed waits (engines/flower/polling.py): idle asks for work back off
  from 50 ms to 1 s instead of every 3 s, its ClientApp's reply is checked every 50 ms instead of
  0.5 s, and object retries go from 50 ms to 0.2 s instead of from 1 s (the SuperNode's code is
  Flower's own).
"""

from __future__ import annotations

import os
import subprocess
import sys


def _arg(argv: list[str], name: str, default: str | None = None) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def main(argv: list[str]) -> int:
    """Run a SuperNode (Flower's CLI, these arguments) with its fedpeft ClientApp worker."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT
    from flwr.supernode.cli.flower_supernode import flower_supernode

    argv = list(argv)
    if _arg(argv, "--isolation") is None:
        argv += ["--isolation", "process"]
    worker = None
    if _arg(argv, "--isolation") == "process":
        host = _arg(argv, "--host", "127.0.0.1")
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        port = _arg(argv, "--port", str(SUPERNODE_UVICORN_DEFAULT_PORT))
        cmd = [sys.executable, "-m", "fedpeft.flower_app", "--runtime-api-address", f"{host}:{port}",
               "--parent-pid", str(os.getpid())]
        if _arg(argv, "--ssl-certfile"):
            ca = _arg(argv, "--ssl-ca-certfile")
            if not ca:
                raise SystemExit("fedpeft: error: a Runtime API with --ssl-certfile needs --ssl-ca-certfile for the worker")
            cmd += ["--root-certificates", ca]
        else:
            cmd += ["--insecure"]
        secret = _arg(argv, "--superexec-auth-secret-file")
        if secret:
            cmd += ["--superexec-auth-secret-file", secret]
        threads = os.environ.get("FEDPEFT_WORKER_THREADS")
        if threads:
            cmd += ["--threads", threads]
        worker = subprocess.Popen(cmd)
    from fedpeft.engines.flower import polling

    polling.supernode()
    import logging

    for handler in logging.getLogger("flwr").handlers:  # timestamps on the node's log lines
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
