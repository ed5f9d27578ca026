"""The fedpeft ServerApp and ClientApp, as Flower loads them in a deployment (`flwr run`).

The Flower App folder (`fedpeft flower app DIR`) names `fedpeft.flower_app:server_app` and
`fedpeft.flower_app:client_app` as its components. Run config of the app (set with `flwr run -c`):
`config` (a fedpeft TOML/JSON settings file on the server machine), `output-dir` (run folder on the
server machine) and `resume` (a run folder to continue). Both apps are assembled by the run layer
(run/flower.py), as every run is.

Run as a program it serves a deployed client machine:
- `python -m fedpeft.flower_app supernode FLOWER-SUPERNODE-ARGS...`: a SuperNode (`--isolation process`)
  with its long-lived fedpeft ClientApp worker and shorter idle polling (engines/flower/supernode.py);
- `python -m fedpeft.flower_app --runtime-api-address HOST:PORT --insecure`: only the worker, for a
  SuperNode started by hand with `flower-supernode --isolation process` (engines/flower/worker.py).
"""

from __future__ import annotations

import fedpeft.engines.flower  # noqa: F401  (telemetry defaults before flwr is imported)
from flwr.serverapp import ServerApp

from fedpeft.engines.flower.client import make_client_app
from fedpeft.run.flower import node_setup, serve_deployment

client_app = make_client_app(node_setup)
server_app = ServerApp()


@server_app.main()
def _main(grid, context) -> None:
    serve_deployment(grid, context.run_config)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["supernode"]:
        from fedpeft.engines.flower.supernode import main as supernode_main

        sys.exit(supernode_main(sys.argv[2:]))
    from fedpeft.engines.flower.worker import main

    sys.exit(main(client_app))
