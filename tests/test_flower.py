"""The Flower engine: wire translation, client stores, flower-sim = local, loopback deployment
(1 SuperLink with TLS and SuperNode authentication + 4 SuperNodes), a SuperNode killed mid-run.

Everything runs on the tiny random BERT (the model factory "tiny_models:tiny_bert": subprocesses reach
it through the PYTHONPATH conftest.py sets) and the bundled demo data. Skipped when Flower is not
installed (`pip install fedpeft[flower]`).
"""

import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("flwr")

from fedpeft.algorithms.base import Message  # noqa: E402
import flower_hostile as hostile  # noqa: E402  (tests/: the in-process grid and the hostile replies)
from fedpeft.engines.flower.records import (  # noqa: E402
    decode_config, encode_config, from_records, store_from_bytes, store_to_bytes, to_records)

pytestmark = pytest.mark.flower

TASKS = ["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"]
# A deployed node loads a model factory (it imports a module) only when its operator allows it.
NODE_TRUST = {"allow-model-factories": "tiny_models:tiny_bert"}
METRICS = ("accuracy", "f1", "matthews", "loss", "train_loss", "bytes_up", "bytes_down", "bytes_eval_down",
           "experts_per_token")
UPLOAD_PREFIXES = ("lora.", "moe.", "head.")
# LEFF and its baselines on the tiny 2-layer BERT: one task, the server's proxy texts from the demo data
LEFF_FAMILY = dict(tasks=["demo-sentiment"] * 3, proxy_dataset="demo", distill_steps=2, distill_examples=64,
                   importance_examples=16, layer_budgets=["1"])


def _settings(**over):
    base = dict(method="fedlease", model_name="tiny_models:tiny_bert", tasks=TASKS, train_samples=24,
                test_samples=16, global_rounds=2, warmup_rounds=1, local_epochs=1, batch_size=8, eval_batch_size=32,
                max_length=32, rank=2, lr=5e-3, threads=1, quiet=True, device="cpu", precision="fp32")
    base.update(over)
    return base


def _local(tmp_path, name, **over):
    from fedpeft.config import RunConfig
    from fedpeft.run import run

    return run(RunConfig(**_settings(**over), output_dir=str(tmp_path / name))).run_dir


def _records(run_dir):
    data = json.loads((run_dir / "training_history.json").read_text())
    return {(r["round"], r["client"]): r for r in data["records"]}, data


def assert_same_metrics(run_a, run_b, tol=1e-5):
    a, _ = _records(run_a)
    b, _ = _records(run_b)
    assert a.keys() == b.keys()
    for key in a:
        for m in METRICS:
            assert (m in a[key]) == (m in b[key]), (key, m)
            if m in a[key] and a[key][m] is not None:
                assert abs(a[key][m] - b[key][m]) <= tol, (key, m, a[key][m], b[key][m])


def assert_wire_is_upload_only(run_dir, backbone_keys):
    """Every reply carried only the method's upload: adapter/head tensors whose bytes are the run's
    bytes_up, numbers as fit values, metrics from evaluation; no backbone weight, no example text."""
    records, _ = _records(run_dir)
    lines = [json.loads(x) for x in (run_dir / "wire.jsonl").read_text().splitlines()]
    fits = [x for x in lines if x["stage"] == "fit"]
    assert fits
    for line in lines:
        recs = line["records"]
        if line["stage"] == "evaluate":
            assert set(recs) == {"metrics"}
            continue
        assert set(recs) <= {"tensors", "config"}
        tensors = recs.get("tensors", {})
        for key in tensors:
            assert key.startswith(UPLOAD_PREFIXES), key
            assert key.split(".", 1)[1] not in backbone_keys
        sent = sum(torch.Size(t["shape"]).numel() * 4 for t in tensors.values())
        assert sent == records[(line["round"], line["client"])]["bytes_up"]
        for k, v in recs.get("config", {}).items():
            assert isinstance(v, (int, float, bool)), (k, v)  # no strings: no raw example can hide here


# ------------------------------------------------------------ translation and stores (fast)
def test_records_round_trip_is_bit_exact_and_keeps_types():
    t = {"lora.layer.0.query.A": torch.randn(2, 16), "steps": torch.arange(5), "b": torch.randn(3).double()}
    cfg = {"round": 3, "upload": True, "lr": 0.1 + 1e-12, "phase": "train", "sizes": [1, 2], "nest": {"a": [1.5]}}
    back = from_records(to_records(Message(t, cfg)))
    assert back.config == cfg and type(back.config["upload"]) is bool
    for k, v in t.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    assert back.nbytes == Message(t, cfg).nbytes
    with pytest.raises(TypeError, match="non-string key"):
        encode_config({"bad": {1: 2}})
    assert decode_config(encode_config({})) == {}


def test_store_blob_round_trip():
    store = {"head": {"w": torch.randn(2, 3)}, "warmup_step": 7, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}},
             "cluster_losses": [0.5, 0.25], "pair": (1, "x")}
    back = store_from_bytes(store_to_bytes(store))
    assert torch.equal(back["head"]["w"], store["head"]["w"]) and back["warmup_step"] == 7
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2)) and back["pair"] == (1, "x")


class _Ctx:
    def __init__(self):
        from flwr.app import RecordDict

        self.state = RecordDict()


def test_client_store_follows_the_local_sequence_and_survives_a_new_context(tmp_path):
    from fedpeft.engines.flower.client import _load_store, _save_store

    ctx, key, sd = _Ctx(), "k1", tmp_path / "state"
    assert _load_store(ctx, "fit", 1, 0, sd, key) == {}
    _save_store(ctx, "fit1", {"v": 1}, key)
    assert _load_store(ctx, "evaluate", 1, 0, sd, key) == {"v": 1}  # evaluation sees what fit left
    _save_store(ctx, "round1", {"v": 2}, key, state_dir=sd, pid=0, rnd=1)
    assert _load_store(ctx, "fit", 2, 0, sd, key) == {"v": 2}
    _save_store(ctx, "fit2", {"v": 3}, key)
    assert _load_store(ctx, "evaluate", 3, 0, sd, key) == {"v": 2}  # missed fit 3: last round end
    # A fresh Context (new run after the server restarted) reads the client's state folder.
    assert _load_store(_Ctx(), "fit", 2, 0, sd, key) == {"v": 2}
    assert _load_store(_Ctx(), "fit", 2, 1, sd, key) == {}  # another partition's files are not ours


def test_reply_with_nan_crossing_the_wire_is_rejected(tiny_cfg, tiny_backbone, caplog):
    from fedpeft.algorithms.fedit import LORA_PREFIX, FedIT
    from fedpeft.run.assemble import build_algorithm
    from fedpeft.run.federation import prepare_clients

    cfg = tiny_cfg()
    infos, _ = prepare_clients(cfg, tiny_backbone.tokenizer)
    alg = build_algorithm(cfg, tiny_backbone, infos)
    state = alg.init()
    before = {k: v.clone() for k, v in state["lora"].items()}
    bad = {LORA_PREFIX + k: torch.full_like(v, float("inf")) for k, v in state["lora"].items()}
    reply = from_records(to_records(Message(bad, {"num_examples": 10})))
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        logging.getLogger("fedpeft").propagate = True
        state = alg.aggregate(state, 1, {0: reply})
    assert all(torch.equal(state["lora"][k], before[k]) for k in before)
    assert "rejected the reply of client 0" in caplog.text


def test_partition_id_out_of_range_is_a_user_error(tiny_backbone):
    from fedpeft.config import RunConfig
    from fedpeft.engines.flower.client import partition_id
    from fedpeft.errors import FedPeftError
    from fedpeft.run.flower import node_setup

    cfg = RunConfig(**_settings())
    with pytest.raises(FedPeftError, match="partition-id 7 is out of range"):
        node_setup({"run_key": "k", "config": cfg.to_dict()}, {"partition-id": 7, **NODE_TRUST})
    with pytest.raises(FedPeftError, match="--node-config"):
        partition_id({})


def test_engine_flower_is_started_by_flwr_run_not_fedpeft_run(tmp_path):
    from fedpeft.config import RunConfig
    from fedpeft.errors import FedPeftError
    from fedpeft.run import run

    with pytest.raises(FedPeftError, match="flwr run"):
        run(RunConfig(**_settings(), engine="flower", output_dir=str(tmp_path / "x")))


def test_import_fedpeft_does_not_import_flower():
    code = ("import sys, fedpeft, fedpeft.config, fedpeft.run, fedpeft.cli, fedpeft.engines.flower; "
            "assert 'flwr' not in sys.modules and 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ Simulation Engine (Ray)
@pytest.fixture(scope="module")
def local_fedlease(tmp_path_factory):
    return _local(tmp_path_factory.mktemp("local"), "run", global_rounds=3)


@pytest.fixture(scope="class")
def one_ray_instance():
    """The class's flower-sim runs share one Ray instance: the first run starts it as every user run
    does (Flower's backend starts Ray when none runs, with fedpeft's init args) and Flower's shutdown
    at the end of each run is held back until the class is done. Every run still starts and ends its
    own actors, so no client process is shared between runs."""
    import ray

    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


@pytest.mark.usefixtures("one_ray_instance")
class TestSimulation:
    def test_flower_sim_gives_the_local_numbers_and_sends_only_uploads(self, local_fedlease, tmp_path, tiny_backbone):
        from fedpeft.config import RunConfig
        from fedpeft.run import run

        res = run(RunConfig(**_settings(global_rounds=3), engine="flower-sim", client_cpus=1.0,
                            output_dir=str(tmp_path / "sim")))
        assert_same_metrics(local_fedlease, res.run_dir)
        _, data = _records(res.run_dir)
        assert [e["kind"] for e in data["events"]] == [e["kind"] for e in _records(local_fedlease)[1]["events"]]
        assert {"checkpoint.pt", "metrics.csv", "summary.md", "clustering.json"} <= {p.name for p in res.run_dir.iterdir()}
        assert_wire_is_upload_only(res.run_dir, set(tiny_backbone.model.state_dict()))

    def test_flower_sim_resumes_after_the_server_stopped(self, local_fedlease, tmp_path):
        from fedpeft.config import RunConfig
        from fedpeft.run import run

        out = tmp_path / "sim"
        run(RunConfig(**_settings(global_rounds=3), engine="flower-sim", output_dir=str(out)), stop_after=2)
        assert len(_records(out)[1]["rounds"]) == 3  # rounds 0..2
        run(RunConfig(resume=str(out), quiet=True))
        assert_same_metrics(local_fedlease, out)

    def test_flower_sim_leff_scores_the_global_model_as_local_does(self, tmp_path):
        """LEFF scores the global model Θ_g after every round, which the training broadcast does not carry:
        the evaluate message does, so the Ray clients score what the local engine scores (FedAvg-full is
        this class, L_i = L)."""
        from fedpeft.config import RunConfig
        from fedpeft.run import run

        local = _local(tmp_path, "local", method="leff", **LEFF_FAMILY)
        res = run(RunConfig(**_settings(method="leff", **LEFF_FAMILY), engine="flower-sim",
                            output_dir=str(tmp_path / "sim")))
        assert_same_metrics(local, res.run_dir)
        records, data = _records(res.run_dir)
        assert records[(1, 0)]["bytes_eval_down"] > 0
        assert [e["kind"] for e in data["events"]] == [e["kind"] for e in _records(local)[1]["events"]]


# ------------------------------------------------------------ deployment on loopback
def _settings_file(path, **over):
    lines = []
    for k, v in _settings(**over).items():
        lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tls_deployment(tmp_path_factory):
    """One federation on this machine serving several tests: a SuperLink with TLS and SuperNode
    authentication, 4 registered SuperNodes, and an unregistered intruder claiming partition-id 0
    (were it let in, the run would stop: two nodes claim one partition). It runs the FedLEASE run.
    Its wall time is Flower's latency per message (a new ClientApp process, 3 s polls on both ends),
    so the registrations run side by side and one federation serves the tests."""
    from fedpeft.engines.flower.deploy import write_node_key
    from flower_loopback import Loopback, wait_for_file

    tmp = tmp_path_factory.mktemp("deploy")
    out = {"local": _local(tmp, "local"), "run_dir": tmp / "run"}
    settings = _settings_file(tmp / "run.toml", round_timeout=300.0)
    with Loopback(tmp / "deploy", tls=True, auth=True) as lb:
        lb.start_superlink()
        out["superlink_log"] = lb.tail("superlink")
        keys = [write_node_key(tmp / "keys" / f"node{i}") for i in range(len(TASKS))]
        with ThreadPoolExecutor(len(keys)) as pool:
            for reg in pool.map(lb.register, [pub for _, pub in keys]):
                assert reg.returncode == 0, reg.stdout + reg.stderr
        for i, (key, _) in enumerate(keys):
            lb.start_supernode(i, {"partition-id": i, "state-dir": str(tmp / f"node{i}"), **NODE_TRUST}, key=key)
        bad, _ = write_node_key(tmp / "keys" / "bad")
        intruder = lb.start_supernode(4, {"partition-id": 0, **NODE_TRUST}, key=bad, name="bad")
        lb.submit({"config": str(settings), "output-dir": str(out["run_dir"])})
        out["intruder_exit"] = intruder.wait(timeout=120)
        out["intruder_log"] = lb.tail("bad")
        wait_for_file(out["run_dir"] / "summary.md", 900, alive=lb)
        out["nodes"] = json.loads(lb.flwr("supernode", "list", "loopback", "--format", "json").stdout)["nodes"]
        out["worker_logs"] = [(lb.root / f"supernode{i}.log").read_text() for i in range(len(TASKS))]
    return out


def test_loopback_deployment_4_supernodes_fedlease_gives_the_local_numbers(tls_deployment, tiny_backbone):
    run_dir = tls_deployment["run_dir"]
    assert_same_metrics(tls_deployment["local"], run_dir)  # the same algorithm code, across processes
    records, data = _records(run_dir)
    assert all(r["participated"] for (rnd, _), r in records.items() if rnd > 0)
    assert not [e for e in data["events"] if e["kind"] == "missing_clients"]
    assert_wire_is_upload_only(run_dir, set(tiny_backbone.model.state_dict()))


def test_each_supernode_keeps_one_clientapp_process_with_the_model_loaded(tls_deployment):
    """--isolation process + the fedpeft worker: every message of a node ran in one process, which
    loaded the backbone once (query, then 2 fits and 2 evaluations)."""
    for text in tls_deployment["worker_logs"]:
        assert text.count("loaded backbone") == 1, text[-2000:]
        assert text.count(": completed in") == 5, text[-2000:]


def test_tls_and_supernode_authentication_refuse_an_unregistered_node(tls_deployment):
    assert "insecure" not in tls_deployment["superlink_log"].lower()
    assert tls_deployment["intruder_exit"] != 0  # refused: not registered
    assert "Failed to initialize the connection" in tls_deployment["intruder_log"]
    assert len(tls_deployment["nodes"]) == len(TASKS)


def test_loopback_killed_supernode_round_completes_and_is_logged(tmp_path):
    """SIGKILL a SuperNode once it joined (plain gRPC, no TLS here; Flower's default isolation, a
    ClientApp process per message). Its node heartbeat is 10 s, so the SuperLink fails its messages
    within 20 s of the kill; the round timeout stays long enough for the live client on a loaded machine."""
    from flower_loopback import Loopback, wait_for_file

    settings = _settings_file(tmp_path / "run.toml", method="fedit", tasks=TASKS[:2], round_timeout=120.0)
    run_dir = tmp_path / "run"
    with Loopback(tmp_path / "deploy") as lb:
        lb.start_superlink()
        for i in range(2):
            lb.start_supernode(i, {"partition-id": i, **NODE_TRUST}, heartbeat=10, isolation="subprocess")
        lb.submit({"config": str(settings), "output-dir": str(run_dir)})
        log = run_dir / "training_log.txt"
        deadline = time.time() + 300
        while not (log.is_file() and "client 1 " in log.read_text()):  # the node has joined: the run is on
            assert time.time() < deadline, lb.tail("superlink")
            time.sleep(0.2)
        lb.kill("supernode1")
        wait_for_file(run_dir / "summary.md", 900, alive=lb)
    records, data = _records(run_dir)
    missing = [e for e in data["events"] if e["kind"] == "missing_clients"]
    assert missing and missing[0]["round"] == 1 and missing[0]["clients"] == [1]
    assert {r["round"] for r in data["rounds"]} == {0, 1, 2}
    assert records[(1, 0)]["participated"] and not records[(1, 1)]["participated"]
    assert records[(2, 0)]["participated"] and "accuracy" in records[(2, 0)]
    text = log.read_text()
    assert "no reply from clients [1]" in text and "within 120 s" not in text  # noticed by heartbeat, not by timeout


# ------------------------------------------------------------ the server loop on an in-process grid (fast)
class InProcessGrid(hostile.InProcessGrid):
    """The real ClientApp handler in this process, every node trusting the tiny test model's factory
    (tests/flower_hostile.py: nodes go down, come back, fail or lie)."""

    def __init__(self, n, state_root=None):
        super().__init__(n, NODE_TRUST)


def _serve(tmp_path, grid, backbone, **over):
    from fedpeft.config import RunConfig
    from fedpeft.run.assemble import open_run_dir, settle
    from fedpeft.run.flower import serve

    cfg, backbone = settle(RunConfig(**_settings(**over), engine="flower-sim", output_dir=str(tmp_path / "grid")),
                           backbone)
    run_dir, resume = open_run_dir(cfg)
    serve(grid, cfg, run_dir, resume=resume, backbone=backbone)
    return run_dir


def test_server_loop_on_an_in_process_grid_equals_local(tmp_path, tiny_backbone):
    local = _local(tmp_path, "local", method="fedit")
    run_dir = _serve(tmp_path, InProcessGrid(4, tmp_path), tiny_backbone, method="fedit")
    assert_same_metrics(local, run_dir)
    assert_wire_is_upload_only(run_dir, set(tiny_backbone.model.state_dict()))


@pytest.mark.parametrize("method, over", [("fedavg-full", {}), ("fedbitfit", {}),
                                          ("slora", {"slora_stage1_fraction": 0.5})])  # round 1 sparse, then LoRA
def test_leff_family_on_an_in_process_grid_equals_local(tmp_path, tiny_backbone, method, over):
    """The server and every client hold separate algorithm objects and models: the client scores what
    the evaluate message carries (FedAvg-full: the global model) on the data local cuts."""
    local = _local(tmp_path, "local", method=method, **LEFF_FAMILY, **over)
    run_dir = _serve(tmp_path, InProcessGrid(3, tmp_path), tiny_backbone, method=method, **LEFF_FAMILY, **over)
    assert_same_metrics(local, run_dir)
    records, _ = _records(run_dir)
    assert (records[(1, 0)].get("bytes_eval_down", 0) > 0) == (method == "fedavg-full")


def test_missing_crashed_and_returning_clients(tmp_path, tiny_backbone):
    """Round 1: node of client 3 is gone (no reply) and client 1 crashes in fit (still evaluated);
    round 2: client 3 is back under a new node id and is found again by its partition-id."""

    class Timeline(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            from fedpeft.engines.flower.records import control_of

            msgs = list(messages)
            out = super().send_and_receive(msgs, timeout=timeout)
            ctl = control_of(msgs[0].content) if msgs else {}
            if ctl.get("stage") == "query" and 2000 not in self.nodes:
                self.down = {1003}  # after joining, client 3's SuperNode dies
            if (ctl.get("stage"), ctl.get("round")) == ("evaluate", 1):
                self.add(2000, 3)  # and is restarted: a new node id, its Context lost
            return out

    grid = Timeline(4, tmp_path)
    grid.fail_at[("fit", 1, 1001)] = RuntimeError("out of memory")
    run_dir = _serve(tmp_path, grid, tiny_backbone, method="fedit")
    records, data = _records(run_dir)
    missing = [(e["round"], e["clients"]) for e in data["events"] if e["kind"] == "missing_clients"]
    assert missing == [(1, [1, 3])]
    assert "accuracy" in records[(1, 1)] and not records[(1, 1)]["participated"]  # crashed, still scored
    assert "accuracy" not in records[(1, 3)]  # unreachable: not scored
    assert records[(2, 3)]["participated"] and "accuracy" in records[(2, 3)]
    log_text = (run_dir / "training_log.txt").read_text()
    assert "client 1 failed during fit: RuntimeError: out of memory" in log_text
    assert "client 3 is back as node 2000" in log_text


# ------------------------------------------------------------ deployment files (fast)
def test_fedpeft_flower_commands_write_valid_files(tmp_path, monkeypatch, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.cli.config_utils import load_and_validate

    from fedpeft.cli import main

    assert main(["flower", "app", str(tmp_path / "app")]) == 0
    config, _ = load_and_validate(tmp_path / "app" / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "fedpeft.flower_app:client_app"
    assert main(["flower", "certs", str(tmp_path / "certs"), "--hosts", "server.lan", "10.0.0.5"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert main(["flower", "node-key", str(tmp_path / "keys" / "n0")]) == 0
    priv = load_ssh_private_key((tmp_path / "keys" / "n0").read_bytes(), None)
    pub = load_ssh_public_key((tmp_path / "keys" / "n0.pub").read_bytes())
    assert isinstance(priv.curve, ec.SECP384R1) and pub.public_numbers() == priv.public_key().public_numbers()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["flower", "connection", "lab", "10.0.0.5:9093", "--root-certificates",
                 str(tmp_path / "certs" / "ca.crt")]) == 0
    assert main(["flower", "connection", "loop", "127.0.0.1:9093", "--insecure"]) == 0
    import tomllib

    links = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]
    assert links["default"] == "lab" and links["loop"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert links["lab"]["root-certificates"].endswith("ca.crt")


def test_missing_flower_is_a_user_error(monkeypatch):
    import importlib.util

    from fedpeft.engines.flower import require_flower
    from fedpeft.errors import FedPeftError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(FedPeftError, match=r"pip install \"fedpeft\[flower\]\""):
        require_flower()


@pytest.mark.skipif(not __import__("os").environ.get("FEDPEFT_FLOWER_LONG"),
                    reason="≈4 min: set FEDPEFT_FLOWER_LONG=1 (flower-sim resume is tested above in CI)")
def test_loopback_server_stopped_and_resumed_gives_the_local_numbers(tmp_path):
    """`flwr stop` the run after round 2 of 3, submit it again with resume=RUN_DIR: the SuperNodes
    (still running, new Flower run so new Contexts) continue from their state-dir stores."""
    from flower_loopback import Loopback, wait_for_file

    over = dict(tasks=["demo-sentiment", "demo-topic", "demo-topic"], global_rounds=3)
    local = _local(tmp_path, "local", **over)
    settings = _settings_file(tmp_path / "run.toml", **over, round_timeout=300.0)
    run_dir = tmp_path / "run"
    with Loopback(tmp_path / "deploy") as lb:
        lb.start_superlink()
        for i in range(3):
            lb.start_supernode(i, {"partition-id": i, "state-dir": str(tmp_path / f"state{i}"), **NODE_TRUST})
        run_id = lb.submit({"config": str(settings), "output-dir": str(run_dir)})
        log = run_dir / "training_log.txt"
        deadline = time.time() + 600
        while not (log.is_file() and "round 2/3" in log.read_text()):
            assert time.time() < deadline, lb.tail("superlink")
            time.sleep(0.5)
        assert lb.flwr("stop", run_id, "loopback").returncode == 0
        time.sleep(3)
        assert not (run_dir / "summary.md").exists()
        lb.submit({"resume": str(run_dir)})
        wait_for_file(run_dir / "summary.md", 900, alive=lb)
    assert "resuming after round 2 of 3" in log.read_text()
    assert_same_metrics(local, run_dir)


# ------------------------------------------------------------ hostile SuperNodes (in-process grid, real records)
HOSTILE_SETTINGS = dict(method="fedit", global_rounds=2)


@pytest.fixture(scope="module")
def hostile_references(tmp_path_factory, tiny_backbone):
    """One reference run per (stage, settings): the hostile client simply missing from that step."""
    cache = {}

    def get(case):
        stage, _, extra = hostile.CASES[case]
        key = (stage, tuple(sorted(extra.items())))
        if key not in cache:
            settings = _settings(**HOSTILE_SETTINGS, **extra)
            cache[key] = hostile.serve_on(hostile.reference_grid(case, len(TASKS), NODE_TRUST), settings,
                                          tmp_path_factory.mktemp("ref") / "run", tiny_backbone)
        return cache[key]

    return get


@pytest.mark.parametrize("case", list(hostile.CASES))
def test_hostile_reply_is_rejected_and_the_run_ends_with_the_honest_result(case, hostile_references, tmp_path,
                                                                           tiny_backbone):
    """Each hand-made hostile reply (through Flower's records, as a SuperNode would send it) is
    rejected and recorded; the run completes and every record equals the run where that client
    was simply missing."""
    result = hostile.run_case(case, _settings(**HOSTILE_SETTINGS), tmp_path, NODE_TRUST, tiny_backbone,
                              hostile_references(case))
    assert result["error"] is None, result["error"]
    assert result["rejected"], "no rejected_reply / rejected_node event"
    assert result["lost"] == 0
    stage = hostile.CASES[case][0]
    event = result["rejected"][0]
    if stage == "query":
        assert event["kind"] == "rejected_node" and event["node"] == hostile.STRANGER
        expected = {"wrong partition id (another client's)": "claims partition-id 2, which node 1002 holds",
                    "wrong partition id (out of range)": "claims partition-id 99",
                    "wrong task and label count": "the run gives client 3 'demo-topic'"}[case]
        assert expected in event["reason"], event["reason"]
    else:
        assert (event["kind"], event["round"], event["client"], event.get("stage", "fit")) == (
            "rejected_reply", hostile.HOSTILE_ROUND, hostile.HOSTILE_CLIENT, stage)


# ------------------------------------------------------------ robust aggregation (Yin et al. 2018)
@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
def test_one_scaled_update_moves_the_robust_aggregate_less_than_the_mean(tiny_cfg, tiny_backbone, robust):
    """Five honest FedIT uploads and one scaled by 1000, through the records: the coordinate-wise
    median / trimmed mean stays near the honest aggregate, the weighted mean is dragged away."""
    from fedpeft.algorithms.fedit import LORA_PREFIX
    from fedpeft.run.assemble import build_algorithm
    from fedpeft.run.federation import prepare_clients

    shifts = {}
    for how in ("mean", robust):
        cfg = tiny_cfg(aggregation=how, trim_fraction=0.2, tasks=["demo-sentiment"] * 6)
        infos, _ = prepare_clients(cfg, tiny_backbone.tokenizer)
        alg = build_algorithm(cfg, tiny_backbone, infos)
        gen = torch.Generator().manual_seed(0)
        state = alg.init()
        honest = {cid: {LORA_PREFIX + k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state["lora"].items()}
                  for cid in range(6)}
        replies = {cid: from_records(to_records(Message(t, {"num_examples": 24}))) for cid, t in honest.items()}
        clean = alg.aggregate({**state, "lora": dict(state["lora"])}, 1, {c: r for c, r in replies.items() if c != 5})
        clean = {k: v.clone() for k, v in clean["lora"].items()}
        replies[5] = from_records(to_records(Message({k: 1000 * v for k, v in honest[5].items()}, {"num_examples": 24})))
        attacked = alg.aggregate({**alg.init(), "lora": dict(alg.init()["lora"])}, 1, replies)["lora"]
        shifts[how] = max(float((attacked[k] - clean[k]).abs().max()) for k in clean)
    assert shifts[robust] < shifts["mean"] / 50, shifts


def test_robust_aggregates_on_plain_tensors():
    from fedpeft.algorithms.tensors import aggregate_states, coordinate_median, trimmed_mean

    states = [{"w": torch.tensor([float(v), -float(v)])} for v in (1, 2, 3, 4, 1000)]
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([3.0, -3.0]))
    assert torch.allclose(trimmed_mean(states, 0.2)["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(coordinate_median(states[:4])["w"], torch.tensor([2.5, -2.5]))  # even count: middle two
    assert torch.allclose(aggregate_states(states, [1] * 5, "mean")["w"], torch.tensor([202.0, -202.0]))
    with pytest.raises(ValueError):
        trimmed_mean(states, 0.5)


# ------------------------------------------------------------ fuzzing the reply decoding
def _schema_for_fuzz():
    from fedpeft.algorithms.base import ClientInfo
    from fedpeft.engines.flower import schema

    return schema.ReplySchema(client=ClientInfo(0, "demo-sentiment", 2, 24), dtypes=frozenset({"float32"}),
                              heads={"head.out_proj.weight": ((2, 16), "float32")}, max_numel=4096,
                              max_reply_bytes=1 << 20)


def test_fuzzed_replies_give_a_message_or_a_rejection_never_another_exception():
    """Any records a node can put in a reply, decoded by the server's checks: a Message (or metrics,
    or ClientInfo) or `Rejected`; nothing else escapes."""
    hyp = pytest.importorskip("hypothesis")
    import io

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from hypothesis import strategies as st

    from fedpeft.engines.flower import schema

    names = st.one_of(st.sampled_from(["tensors", "tensor_index", "config", "metrics", "fedpeft", "packed", "index",
                                       "num_examples", "json:train_loss", "json:x", "client", "accuracy", "task",
                                       "client_id", "num_labels", "train_loss"]), st.text(max_size=12))
    finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
    tensor_names = st.one_of(st.sampled_from(["head.out_proj.weight", "head.out_proj.bias", "lora.a", "lora.a"]),
                             st.text(max_size=8))
    dims = st.one_of(st.integers(0, 20), st.integers(-3, 2 ** 45), st.floats(), st.text(max_size=2), st.booleans())
    entry = st.one_of(st.tuples(tensor_names, st.sampled_from(["float32", "float64", "bfloat16", "int64", "bool", "x"]),
                                st.lists(dims, max_size=4)).map(list),
                      st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=4))
    index_text = st.one_of(st.lists(entry, max_size=4).map(json.dumps), st.text(max_size=40),
                           st.sampled_from(["[", "{}", "null", "[[" * 3000]))
    scalars = st.one_of(st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1), finite_or_not, st.booleans(),
                        st.text(max_size=30), st.binary(max_size=30), index_text,
                        st.sampled_from(["{not json", "null", "[1e999]", '{"a": [1, 2]}', "1" * 5000, "[" * 2000]))
    config_values = st.one_of(scalars, st.lists(st.integers(min_value=-5, max_value=5), max_size=4))

    @st.composite
    def arrays(draw):
        if draw(st.booleans()):  # a real .npy payload (the packed bytes), maybe cut or relabelled
            dtype = draw(st.sampled_from(["uint8", "uint8", "float32", "int64", "<U3"]))
            shape = tuple(draw(st.lists(st.integers(0, 40), min_size=1, max_size=2)))
            buf = io.BytesIO()
            np.save(buf, np.frombuffer(draw(st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                                       dtype="uint8").reshape(shape).astype(dtype), allow_pickle=False)
            data = buf.getvalue()
            if draw(st.booleans()):
                data = data[: draw(st.integers(0, len(data)))]
            dtype = draw(st.one_of(st.just(dtype), st.sampled_from(["uint8", "x", ""])))
            shape = draw(st.one_of(st.just(shape), st.lists(st.integers(-3, 10 ** 6), max_size=2).map(tuple)))
        else:
            dtype = draw(st.sampled_from(["uint8", "float32", "foo"]))
            shape = tuple(draw(st.lists(st.integers(-3, 64), max_size=2)))
            data = draw(st.binary(max_size=200))
        stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", ""]))
        return Array(dtype=dtype, shape=shape, stype=stype, data=data)

    @st.composite
    def records(draw):
        kind = draw(st.sampled_from(["array", "config", "metric", "index"]))
        try:
            if kind == "array":
                return ArrayRecord(draw(st.dictionaries(st.one_of(st.just("packed"), names), arrays(), max_size=2)))
            if kind == "index":
                return ConfigRecord(draw(st.dictionaries(st.one_of(st.just("index"), names), index_text,
                                                         min_size=1, max_size=2)))
            if kind == "config":
                return ConfigRecord(draw(st.dictionaries(names, config_values, max_size=5)))
            return MetricRecord(draw(st.dictionaries(names, st.one_of(finite_or_not, st.integers(-10, 10)), max_size=4)))
        except Exception:  # a record Flower itself would not build (nor deserialise) is no input
            hyp.assume(False)

    @st.composite
    def contents(draw):
        if draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from([None, {}, [], "tensors", RecordDict()]))
        chosen = draw(st.dictionaries(names, records(), max_size=3))
        if draw(st.booleans()):  # the shape of an honest reply, with hostile contents
            chosen.update({"tensors": draw(records()), "tensor_index": draw(records()), "config": draw(records())})
        return RecordDict(chosen)

    sch = _schema_for_fuzz()
    real = to_records(Message({"head.out_proj.weight": torch.randn(2, 16), "lora.a": torch.randn(3)},
                              {"num_examples": 3}))
    assert schema.check_fit(real, sch).tensors.keys() == {"head.out_proj.weight", "lora.a"}  # the honest shape passes

    @hyp.settings(max_examples=200, deadline=None, suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(contents())
    def check(content):
        for fn in (lambda c: schema.check_fit(c, sch), schema.check_metrics,
                   lambda c: schema.check_query(c, 7, 4, lambda cid: ("demo-sentiment", 2, 24))):
            try:
                fn(content)
            except schema.Rejected:
                pass

    check()


# ------------------------------------------------------------ deployment helpers refuse to clobber keys
def test_keys_are_never_overwritten_without_force_and_private_keys_are_0600_from_the_start(tmp_path, monkeypatch,
                                                                                            capsys):
    import os
    import stat

    from fedpeft.cli import main
    from fedpeft.engines.flower import deploy
    from fedpeft.errors import FedPeftError

    created = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **k):  # the mode a key file is created with, before any byte
        if flags & os.O_CREAT:
            created.append((str(path), mode))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        priv, pub = deploy.write_node_key(tmp_path / "k" / "n0")
        certs = deploy.write_certificates(tmp_path / "certs")
    finally:
        os.umask(old_umask)
    modes = dict(created)
    assert modes[str(priv)] == 0o600 and modes[str(certs["key"])] == 0o600
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and stat.S_IMODE(certs["key"].stat().st_mode) == 0o600
    before = priv.read_bytes()
    with pytest.raises(FedPeftError, match="--force"):
        deploy.write_node_key(priv)
    with pytest.raises(FedPeftError, match="--force"):
        deploy.write_certificates(tmp_path / "certs")
    assert priv.read_bytes() == before
    assert main(["flower", "node-key", str(priv)]) == 2  # one line, exit 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["flower", "node-key", str(priv), "--force"]) == 0 and priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["flower", "connection", "lab", "10.0.0.5:9093"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert main(["flower", "connection", "lab", "127.0.0.1:9093", "--insecure"]) == 0
    assert "INSECURE" in capsys.readouterr().err


def test_client_paths_are_the_nodes_own(tmp_path):
    """The store folder is the node's state-dir (over the ClientApp's default), named by a hash of the run
    key: a server-sent key such as '../../etc' never becomes a path."""
    from fedpeft.engines.flower.client import _state_dir

    d = _state_dir({"state-dir": str(tmp_path / "node")}, str(tmp_path / "default"), "../../etc/x")
    assert d.parent == tmp_path / "node" and d.name.startswith("run-") and ".." not in d.name
    assert _state_dir({}, str(tmp_path / "default"), "k").parent == tmp_path / "default"
    assert _state_dir({}, None, "k") is None


def test_a_deployed_node_refuses_a_model_factory_its_operator_did_not_allow():
    from fedpeft.config import RunConfig
    from fedpeft.errors import FedPeftError
    from fedpeft.run.flower import node_config_of

    cfg = RunConfig(**_settings()).to_dict()
    with pytest.raises(FedPeftError, match="allow-model-factories"):
        node_config_of(cfg, {"partition-id": 0})
    with pytest.raises(FedPeftError, match="allow-model-factories"):
        node_config_of(cfg, {"partition-id": 0, "allow-model-factories": "other:thing"})
    assert node_config_of(cfg, {"partition-id": 0, **NODE_TRUST}).model_name == "tiny_models:tiny_bert"
    assert node_config_of(cfg, {"partition-id": 0}, simulated=True).model_name == "tiny_models:tiny_bert"


def test_exchange_pulls_replies_early_and_stops_at_the_timeout():
    """The server's push/pull loop: replies that arrive after a few pulls are taken without Flower's
    fixed 3-s wait; a reply that never comes ends the wait at the timeout."""
    from types import SimpleNamespace

    from fedpeft.engines.flower.server import exchange

    class Grid:
        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = ["m0"] if self.pulls >= 3 and "m0" in ids else []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    t0 = time.time()
    got = exchange(Grid(), [object()], timeout=30)
    assert len(got) == 1 and time.time() - t0 < 1.0
    t0 = time.time()
    got = exchange(Grid(), [object(), object()], timeout=1.5)
    assert len(got) == 1 and 1.4 < time.time() - t0 < 3.0


def test_exchange_pulls_back_off_to_a_fifth_of_a_second(monkeypatch):
    """The server's pulls start 50 ms apart and back off by 1.5× to at most 0.2 s: a reply that comes
    late waits at most 0.2 s for the next pull (with 1 s it waited up to a second, twice per round)."""
    from types import SimpleNamespace

    from fedpeft.engines.flower import server

    waits = []
    monkeypatch.setattr(server.time, "sleep", waits.append)

    class Grid:
        pulls = 0

        def push_messages(self, messages):
            return ["m0"]

        def pull_messages(self, ids):
            self.pulls += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))] if self.pulls == 30 else []

    assert len(server.exchange(Grid(), [object()], timeout=3600)) == 1
    assert len(waits) == 29 and waits[0] == pytest.approx(0.05) and max(waits) == pytest.approx(0.2)
    assert waits[1] == pytest.approx(0.075) and waits[-1] == pytest.approx(0.2)


def test_supernode_idle_asks_back_off_to_a_second_and_restart_after_work(monkeypatch):
    """Inside a SuperNode, Flower's 3-s idle wait becomes 50 ms growing 1.5× to 1 s, restarting at 50 ms
    once the node has worked (more than 1.5 s since its last idle wait); its 0.5-s reply check becomes
    50 ms; every other wait is left as Flower asked."""
    from types import SimpleNamespace

    from fedpeft.engines.flower import polling

    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(polling, "_time", SimpleNamespace(sleep=sleep, monotonic=lambda: now[0]))
    clock = polling.PollingClock()
    for _ in range(10):
        clock.sleep(3)
    assert waits == pytest.approx([0.05 * 1.5 ** i for i in range(8)] + [1.0, 1.0])
    clock.sleep(3)  # straight after: still idle, still a second
    now[0] += 5.0  # a message took five seconds
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(2)
    assert waits[10:] == pytest.approx([1.0, 0.05, 0.05, 2])


def test_a_rejected_fit_reply_rolls_the_nodes_store_back(tmp_path, tiny_backbone):
    """A SuperNode whose fit reply the server rejects keeps, after the round, the store it would have
    had without that fit (FedSA-LoRA: its local B): the same bytes as when its fit failed outright."""
    import torch

    from fedpeft.engines.flower.client import STATE_RECORD
    from fedpeft.engines.flower.records import store_from_bytes

    settings = _settings(method="fedsa-lora", global_rounds=2, head_policy="local")
    stores = {}
    for name, grid in (("reference", hostile.reference_grid("wrong dtype", len(TASKS), NODE_TRUST)),
                       ("hostile", hostile.hostile_grid("wrong dtype", len(TASKS), NODE_TRUST))):
        hostile.serve_on(grid, settings, tmp_path / name, tiny_backbone)
        tags = dict(grid.nodes[hostile.HOSTILE_NODE].state.config_records[STATE_RECORD])
        stores[name] = store_from_bytes(tags[f"round{hostile.HOSTILE_ROUND}"])
    ref, got = stores["reference"], stores["hostile"]
    assert ref.keys() == got.keys() and any(isinstance(v, dict) and v for v in ref.values())

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(ref, got)


def test_worker_asks_back_off_while_idle_and_restart_after_a_task(monkeypatch):
    """The ClientApp worker asks its SuperNode for a task 50 ms apart right after a task and backs off
    by 1.5× to 0.2 s while none comes (asking every 50 ms kept an idle node busy); a task resets it."""
    from types import SimpleNamespace

    import flwr.supercore.runtime as runtime

    from fedpeft.engines.flower import worker

    class Idle(Exception):
        pass

    asks, waits = [], []

    class FakeClient:
        def AcquireTask(self, request):  # noqa: N802 - Flower's name
            asks.append(len(waits))
            if len(asks) == 8:  # one task after seven empty asks
                return SimpleNamespace(HasField=lambda f: True, token="t", task=SimpleNamespace(task_id=1))
            return SimpleNamespace(HasField=lambda f: False, token="")

        def close(self):
            pass

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 12:
            raise Idle

    monkeypatch.setattr(runtime.RuntimeHttpClient, "from_server_address", classmethod(lambda cls, **kw: FakeClient()))
    monkeypatch.setattr(worker, "run_task", lambda *a, **k: "completed")
    monkeypatch.setattr(worker.time, "sleep", sleep)
    with pytest.raises(Idle):
        worker.serve_tasks("127.0.0.1:1", client_app=None)
    expected = [0.05 * 1.5 ** i for i in range(4)] + [0.2] * 3  # 7 empty asks, then the task
    assert waits[:7] == pytest.approx(expected)
    assert waits[7:] == pytest.approx([0.05, 0.075, 0.1125, 0.16875, 0.2])  # restarted after the task
