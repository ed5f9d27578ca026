"""A run on Flower: the server side (`serve`), a node's client side (`node_setup`) and `--engine flower-sim`.

The server side is the local engine's round loop with fit and evaluate sent through a Flower Grid
(engines/flower/server.py); the client side answers with the algorithm's own `fit`/`evaluate` on
the node's own data (engines/flower/client.py). Both are assembled here as every run is
(run/assemble.py). The deployed ServerApp and ClientApp objects are in fedpeft/flower_app.py.

flower-sim: one virtual SuperNode per client (partition-id = client id), `--client-cpus` /
`--client-gpus` reserved per ClientApp; a client with a GPU share trains on it (`cuda`: Ray makes its
share's GPU the only visible one), a client without one on the CPU. The ServerApp runs in this process
and writes the run folder; client stores are also kept under RUN_DIR/client_state (a client-side
setting of the simulated ClientApp, never a path in a server message) so `--resume` continues with them.

A deployed node trusts no server: it reads its data from its own data root, writes only under its
own `state-dir`, and loads a model factory (`module:function`, which imports a module) only when
its operator allows that name in the node config (`allow-model-factories`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.run.assemble import build_algorithm, load_run_backbone, open_history

log = logging.getLogger("fedpeft")

_NODE_CACHE: dict[tuple, Any] = {}  # per process: (run key, partition) → (algorithm, client);
#                                     (run key, "run") → (algorithm, backbone, every client's data part)


# ------------------------------------------------------------ client side
def node_config_of(cfg_dict: dict[str, Any], node_config, *, simulated: bool = False) -> RunConfig:
    """The server's (resolved) settings with this machine's own data root, threads and device. A
    deployed node reads its data from its own `data-dir` (node config) or $FEDPEFT_DATA_DIR, never
    from a path the server names, and computes on its own `device` (node config; default auto: its
    GPU if it has one); a simulated node is the same machine and uses the run's data root, and
    computes where its Ray resources put it: with a GPU share (--client-gpus) on `cuda`, the one GPU
    Ray leaves visible to its actor, without one on the CPU. The precision is the run's."""
    from fedpeft.errors import FedPeftError
    from fedpeft.hardware import simulated_client_device
    from fedpeft.models.backbone import is_model_factory

    if not isinstance(cfg_dict, dict):
        raise FedPeftError("the server sent no run config")
    cfg = RunConfig.from_dict({**cfg_dict, "resume": None}, source="the server's run config")
    if not simulated and is_model_factory(cfg.model_name):
        allowed = str(node_config.get("allow-model-factories", "")).replace(",", " ").split()
        if cfg.model_name not in allowed:
            raise FedPeftError(f"the server asks for the model factory {cfg.model_name!r}, which imports and runs "
                               "code on this node: allow it with --node-config "
                               f"'allow-model-factories=\"{cfg.model_name}\"' if you trust it")
    if node_config.get("data-dir"):
        cfg.data_dir = str(node_config["data-dir"])
    elif not simulated:
        cfg.data_dir = None
    if node_config.get("threads"):
        cfg.threads = int(node_config["threads"])
    if simulated:
        cfg.device = simulated_client_device(cfg.device, cfg.client_gpus)
    else:
        cfg.device = str(node_config.get("device") or "auto")
    return cfg


def node_setup(ctl: dict[str, Any], node_config, *, simulated: bool = False):
    """This node's (algorithm, client) for the run in the control record: built once per process
    (one model in memory, as on the local engine) and re-bound to the federation the server sends."""
    from fedpeft.algorithms.base import ClientInfo
    from fedpeft.engines.flower.client import partition_id
    from fedpeft.errors import FedPeftError
    from fedpeft.run.federation import federation_parts, make_client

    key, pid = str(ctl.get("run_key", "")), partition_id(node_config)
    if (key, pid) not in _NODE_CACHE:
        cfg = node_config_of(ctl["config"], node_config, simulated=simulated)
        if not 0 <= pid < len(cfg.tasks):
            raise FedPeftError(f"partition-id {pid} is out of range: the run has {len(cfg.tasks)} clients "
                               f"(0..{len(cfg.tasks) - 1})")
        if (key, "run") not in _NODE_CACHE:
            # A long-lived process (a Ray actor, a SuperNode's ClientApp worker) serves one run at a
            # time: a new run frees the previous run's model and clients.
            for old in [k for k in _NODE_CACHE if k[0] != key]:
                del _NODE_CACHE[old]
            if cfg.threads:
                import torch

                torch.set_num_threads(cfg.threads)
            backbone = load_run_backbone(cfg)
            _NODE_CACHE[(key, "run")] = (build_algorithm(cfg, backbone), backbone, federation_parts(cfg))
        alg, backbone, parts = _NODE_CACHE[(key, "run")]
        # the local engine's partition code and seed (server reserve and validation hold-out
        # included), so this node's examples are the ones the local engine would give client pid;
        # one backbone, one algorithm and one partition per process, whatever partitions it serves
        _NODE_CACHE[(key, pid)] = (alg, make_client(cfg, parts[pid], backbone.tokenizer))
    alg, client = _NODE_CACHE[(key, pid)]
    if ctl.get("federation"):
        try:
            federation = [ClientInfo(**i) for i in ctl["federation"]]
        except TypeError as exc:
            raise FedPeftError(f"the server sent a malformed federation: {exc}") from None
        alg.bind(alg.runtime, federation)
    return alg, client


# ------------------------------------------------------------ server side
def serve(grid, cfg: RunConfig, run_dir: Path, *, resume: bool, stop_after: int | None = None,
          backbone=None, quiet: bool | None = None):
    """The whole server side of a Flower run (settings already resolved); returns the RunHistory.
    Clients choose where they keep their stores: no path crosses the wire."""
    from fedpeft.engines.flower.client import run_key
    from fedpeft.engines.flower.server import FlowerEngine, discover
    from fedpeft.records.progress import Progress

    backbone = load_run_backbone(cfg, backbone)
    algorithm = build_algorithm(cfg, backbone)
    control = {"config": cfg.to_dict() | {"output_dir": None, "resume": None},
               "run_key": run_key(cfg.to_dict(), run_dir)}
    node_of, infos, rejected = discover(grid, cfg, control, cfg.round_timeout)
    control["federation"] = [vars(i) for i in infos]
    algorithm.bind(algorithm.runtime, infos)
    history = open_history(run_dir, cfg, infos, resume=resume)
    for bad in rejected:  # nodes that were not let in (malformed answer, a partition another node holds)
        history.add_event(kind="rejected_node", round=0, **bad)
    progress = Progress(algorithm.num_rounds, enabled=not (cfg.quiet if quiet is None else quiet))
    try:
        FlowerEngine(algorithm, grid, node_of, control, history, run_dir, timeout=cfg.round_timeout,
                     progress=progress, max_reply_bytes=cfg.max_reply_bytes,
                     max_round_bytes=cfg.max_round_bytes).run(resume=resume, stop_after=stop_after)
    finally:
        progress.close()
        history.save()
    history.finish()
    return history


def serve_deployment(grid, run_config) -> None:
    """The deployed ServerApp's main: settings from the app's run config (`config`, `output-dir`,
    `resume`), assembled and served like any run."""
    from fedpeft.errors import FedPeftError
    from fedpeft.run.assemble import open_run_dir, settle

    settings = {}
    if run_config.get("config"):
        settings = RunConfig.load(str(run_config["config"])).to_dict()
    elif not run_config.get("resume"):
        raise FedPeftError("no fedpeft settings: flwr run APP_DIR SUPERLINK -c 'config=\"/path/run.toml\"'")
    cfg = RunConfig.from_dict({**settings, "engine": "flower",
                               "output_dir": str(run_config.get("output-dir") or "") or settings.get("output_dir"),
                               "resume": str(run_config.get("resume") or "") or None})
    cfg, backbone = settle(cfg)
    run_dir, resume = open_run_dir(cfg)
    try:
        serve(grid, cfg, run_dir, resume=resume, backbone=backbone)
    except Exception as exc:  # into the run log too, not only Flower's
        log.error("the run stopped: %s", exc)
        raise


def run_flower_sim(cfg: RunConfig, run_dir: Path, *, resume: bool, stop_after: int | None = None, backbone=None):
    """Run the federation on Flower's Simulation Engine; returns the RunHistory."""
    from fedpeft.engines.flower import require_flower

    require_flower()
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedpeft.engines.flower.client import make_client_app

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            outcome["history"] = serve(grid, cfg, run_dir, resume=resume, stop_after=stop_after, backbone=backbone)
        except BaseException as exc:  # re-raised below: Flower would only log it
            outcome["error"] = exc

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if cfg.quiet:
        flwr_log.setLevel(logging.ERROR)  # also run_simulation's deprecation notice
    try:
        backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}}
        if cfg.quiet:  # client failures still reach the run log as error replies
            backend["init_args"] = {"log_to_driver": False}
        setup = functools.partial(node_setup, simulated=True)
        client_app = make_client_app(setup, state_dir=str(run_dir.resolve() / "client_state"))
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(cfg.tasks),
                       backend_config=backend)
    finally:
        flwr_log.setLevel(level)
    if "error" in outcome:
        raise outcome["error"]
    if "history" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the fedpeft ServerApp (see Flower's log above)")
    return outcome["history"]
