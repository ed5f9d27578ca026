"""A long-lived ClientApp process for a deployed SuperNode: the backbone stays loaded across messages.

Flower's default (`flower-supernode`, `--isolation subprocess`) starts a new `flwr-clientapp` process
for every message, which imports torch and fedpeft and loads the model each time: about a minute per
round of overhead on a small CPU machine. With `--isolation process` the SuperNode starts no
executor and waits for one to ask it for tasks on its Runtime API (its `--port`). Flower's own
`flower-superexec` would again start one `flwr-clientapp` process per task (in the pinned Flower,
1.41–1.42, `flwr-clientapp` serves exactly one task and exits). This module is the executor instead:
one process that asks the SuperNode for ClientApp tasks and runs each in-process with fedpeft's
ClientApp, so imports, the backbone and the client's encoded data (run/flower.py's per-process
cache) are paid once per SuperNode, not once per message.

    flower-supernode --isolation process --port 9094 ...       # the SuperNode, as usual otherwise
    python -m fedpeft.flower_app --runtime-api-address 127.0.0.1:9094 --insecure   # its ClientApp worker

Per task it does what `flwr-clientapp` does (Flower's run_clientapp): pull the task's message,
Context and run, keep a task heartbeat, call the ClientApp, push the reply and the Context. It runs
only fedpeft's ClientApp (`fedpeft.flower_app:client_app`) and installs nothing: a run whose Flower
App names another ClientApp gets an error reply. It stops with its SuperNode (`--parent-pid`) or
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import fedpeft.engines.flower  # noqa: F401  (telemetry defaults before flwr is imported)

log = logging.getLogger("fedpeft")

FEDPEFT_CLIENTAPP = "fedpeft.flower_app:client_app"


def _app_component(fab_content: bytes) -> str | None:
    """The ClientApp a Flower App (FAB, a zip holding pyproject.toml) names, or None."""
    import tomllib

    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as zf:
            data = tomllib.loads(zf.read("pyproject.toml").decode())
        return str(data["tool"]["flwr"]["app"]["components"]["clientapp"])
    except Exception:  # noqa: BLE001 - whatever the FAB holds, it is not a fedpeft app then
        return None


def pull_task_input(client):
    """Flower's run_clientapp.pull_task_input, with the message's objects retried from 50 ms."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.app import Message

    from fedpeft.engines.flower.polling import OBJECT_BACKOFF, OBJECT_BACKOFF_CAP

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def run_task(address: str, token: str, *, insecure: bool, certificates: bytes | None, client_app) -> str:
    """One ClientApp task, in this process: Flower's `run_clientapp` without installing the app or
    exiting. Returns the task's final status ("completed" or "failed")."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    marks = [time.perf_counter()]
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks.append(time.perf_counter())
        component = _app_component(fab.content)
        if component != FEDPEFT_CLIENTAPP:
            raise RuntimeError(f"this worker runs only {FEDPEFT_CLIENTAPP}; the run's Flower App names "
                               f"{component!r}")
        reply = client_app(message=message, context=context)
        marks.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - a failed task is an error reply, never the end of the worker
        log.warning("ClientApp task failed: %s: %s", type(exc).__name__, exc)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not push the reply: %s", exc)
            status = SubStatus.FAILED
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        marks.append(time.perf_counter())
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        steps = ("pull", "app", "push")
        log.info("task phases: %s", ", ".join(f"{steps[i]} {b - a:.2f} s" for i, (a, b) in enumerate(zip(marks, marks[1:]))))
    return status


def serve_tasks(address: str, client_app, *, insecure: bool = True, root_certificates: str | None = None,
                poll: float = 0.05, max_poll: float = 0.2, max_tasks: int | None = None, parent_pid: int | None = None,
                auth_secret: bytes | None = None) -> int:
    """Ask the SuperNode at `address` (its Runtime API) for ClientApp tasks and run them, until stopped
    (or `max_tasks` ran). Returns the number of tasks run. `auth_secret`: the SuperNode's
    `--superexec-auth-secret-file` content, so that only this worker can take its tasks.

    The asks start `poll` apart after a task and back off by 1.5× to `max_poll` while none comes: asking
    every 50 ms kept an idle node (worker and SuperNode answering it) at about 8 % of a core, 16 idle
    nodes at more than one of this machine's two cores (benchmarks/README.md, flower_overhead.py)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certificates = Path(root_certificates).read_bytes() if root_certificates else None
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                         protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates, interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())
    from fedpeft.engines.flower.polling import Backoff

    done, waits = 0, Backoff(poll, max_poll)
    log.info("fedpeft ClientApp worker: serving the SuperNode at %s", address)
    try:
        while max_tasks is None or done < max_tasks:
            if parent_pid is not None and not _alive(parent_pid):
                log.info("the SuperNode (pid %d) is gone: stopping", parent_pid)
                break
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                t0 = time.perf_counter()
                status = run_task(address, res.token, insecure=insecure, certificates=certificates,
                                  client_app=client_app)
                done += 1
                waits.reset()  # the next task of a round tends to follow soon
                log.info("task %d: %s in %.2f s", res.task.task_id, status, time.perf_counter() - t0)
            else:
                time.sleep(waits.next())
    finally:
        client.close()
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(client_app, argv: list[str] | None = None) -> int:
    """`python -m fedpeft.flower_app ...`: serve `client_app` (fedpeft's) to one SuperNode."""
    ap = argparse.ArgumentParser(prog="python -m fedpeft.flower_app",
                                 description="A long-lived fedpeft ClientApp for a SuperNode started with "
                                             "--isolation process: the model stays loaded across messages.")
    ap.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the SuperNode's Runtime API (its --port)")
    tls = ap.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (same machine)")
    tls.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API certificate")
    ap.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) is gone")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between asks for a task right after one "
                                                             "(default 0.05)")
    ap.add_argument("--max-poll", type=float, default=0.2, help="the asks back off by 1.5x to this many seconds "
                                                                "while no task comes (default 0.2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of this process")
    ap.add_argument("--superexec-auth-secret-file", default=None,
                    help="the file the SuperNode was given with --superexec-auth-secret-file (raw bytes): only a "
                         "process holding it can take the node's tasks")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        secret = Path(args.superexec_auth_secret_file).read_bytes() if args.superexec_auth_secret_file else None
        serve_tasks(args.runtime_api_address, client_app, insecure=args.insecure, root_certificates=args.root_certificates,
                    poll=args.poll, max_poll=args.max_poll, parent_pid=args.parent_pid, auth_secret=secret)
    except KeyboardInterrupt:
        pass
    return 0

