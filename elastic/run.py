"""`python -m elastic.run`: the torchrun-compatible command line of the elastic launcher.

Parses and checks the flags once (`elastic.cli`: every error is one line and exit code 2),
starts or joins the job's etcd (embedded when no --rdzv-endpoint is given, hosted by one node for
torchrun's c10d and static command lines), and runs this node's agent until the job ends.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import List, Optional

from elastic.cli import RunConfig, UsageError, parse_args

USAGE_ERROR = 2


def local_address(endpoint_host: str) -> str:
    """The address of this machine that routes to the rendezvous (loopback stays loopback)."""
    if endpoint_host in ("localhost", "::1") or endpoint_host.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((endpoint_host, 9))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise UsageError(f"--master-port {port} is already in use on {host}; pick another "
                             "or leave it out to use a free one") from None


def run(config: RunConfig) -> int:
    from launcher.agent import AgentConfig, ElasticAgent
    from launcher.preemption import NoticeConfig
    from launcher.workers import WorkerSpec
    from rendezvous.api import RendezvousSettings
    from rendezvous.embedded import EmbeddedEtcd
    from rendezvous import registry
    from rendezvous.hosting import linger_for_others, start_or_join
    from rendezvous.store import EtcdStore

    log = logging.getLogger("elastic")
    for note in config.notes:
        log.info("%s", note)
    conf = dict(config.rdzv_conf)
    connect_timeout = conf.pop("connect_timeout", 5.0)
    settings = RendezvousSettings(run_id=config.run_id, min_nodes=config.min_nodes,
                                  max_nodes=config.max_nodes, max_restarts=config.max_restarts,
                                  **conf)
    embedded = store = agent = recorded = None
    gpus = node_gpus(config)  # before etcd: a node whose GPUs cannot serve it never joins
    closers = [gpus.close]
    notices = config.notices
    if gpus.health is not None:
        notices = replace(notices or NoticeConfig(),
                          extra=(*(notices.extra if notices else ()), gpus.health))
    try:
        endpoint = config.endpoint
        plan = config.rendezvous
        if endpoint is None:
            embedded = EmbeddedEtcd()
            endpoint = embedded.start()
            if config.max_nodes > 1:
                log.info("embedded etcd at %s; other nodes join with --rdzv-endpoint %s (the job "
                         "ends if this agent stops)", endpoint, endpoint)
        elif plan.hosting is not None:
            embedded = start_or_join(*plan.endpoint, plan.hosting, connect_timeout,
                                     security=config.security)
        host = config.local_addr or local_address(endpoint.rpartition(":")[0])
        if config.master_port is not None:
            _check_port_free(host, config.master_port)
        store = EtcdStore(endpoint, config.run_id, timeout=connect_timeout,
                          security=config.security)
        recorded = registry.record(config.run_id, endpoint)  # for python -m elastic.job
        events = os.path.join(config.log_dir, "events.jsonl") if config.log_dir else None
        if config.log_dir:
            os.makedirs(config.log_dir, exist_ok=True)
        spec = WorkerSpec(argv=config.argv, nproc=config.nproc, log_dir=config.log_dir,
                          grace_period_s=config.grace_period, role=config.role,
                          console_quiet=config.console_quiet, local_env=gpus.local_env)
        backend, backend_closers = worker_backend(config, store, host)
        closers = backend_closers + closers
        agent = ElasticAgent(AgentConfig(settings=settings, workers=spec, host=host,
                                         monitor_interval=config.monitor_interval,
                                         master_port=config.master_port,
                                         batch_policy=config.batch_policy,
                                         rescale_mode=config.rescale_mode,
                                         hang_timeout=config.hang_timeout,
                                         notices=notices,
                                         rank_hint=config.node_rank, endpoint=endpoint,
                                         labels=config.labels, agreed=agreed_settings(config),
                                         retention_s=config.retention_s,
                                         stay_as_spare=config.stay_as_spare),
                             store, backend, events_path=events)
        return agent.run()
    finally:
        if embedded is not None and store is not None and agent is not None \
                and plan.hosting is not None:
            linger_for_others(store, agent.node_id, settings.lease_ttl + 5.0)
        for close in closers:
            close()
        registry.forget(recorded)
        if store is not None:
            store.close()
        if embedded is not None:
            embedded.stop()


def node_gpus(config: RunConfig):
    """This node's GPUs for its workers (integrations.nvml.node.NodeGpuPlan); says what was
    chosen in one line.

    Raises:
        UsageError: --gpu-probe or a GPU flag this node cannot serve.
        launcher.devices.UnhealthyGpus: too few healthy GPUs; the node must not join.
    """
    from integrations.nvml.node import plan_node
    from launcher.devices import DeviceError, GpuRequest, UnhealthyGpus

    try:
        plan = plan_node(config.gpu_probe, config.nproc, config.gpus or GpuRequest())
    except UnhealthyGpus:
        raise
    except (DeviceError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    logging.getLogger("elastic").info("%s", plan.note)
    return plan


def agreed_settings(config: RunConfig) -> dict:
    """What every node of a job must be started with alike (checked when an agent joins)."""
    policy = config.batch_policy
    return {"nproc_per_node": config.nproc, "backend": config.backend,
            "batch_policy": policy.describe() if policy is not None else None}


def worker_backend(config: RunConfig, store, host: str):
    """The workers this command line asks for, as a factory the agent calls with its worker
    spec, node id and wake-up (launcher.agent.BackendFactory), and what to close after the
    agent. The one place that knows every backend."""
    mode = config.rescale_mode
    if config.backend == "horovod":
        from integrations.horovod.agent import HorovodBackend

        def horovod(spec, node_id, wake):
            return HorovodBackend(store, spec, node_id=node_id, host=host, wake=wake,
                                  in_place=mode != "restart")
        return horovod, []
    from integrations.horovod.guard import HorovodGuard
    from launcher.backend import ProcessBackend
    from launcher.inplace import InPlaceBackend

    guard = HorovodGuard()  # a Horovod script under the torch backend fails at once, and says why
    closers = [guard.close]
    zygote = None
    if config.preload:
        from launcher.zygote import Zygote

        zygote = Zygote(config.preload)
        zygote.start()  # from this (the main) thread: it imports while the rendezvous runs
        closers.insert(0, zygote.close)

    def torch(spec, node_id, wake):
        spec = replace(spec, extra_env={**spec.extra_env, **guard.env}, zygote=zygote)
        if mode == "restart":
            return ProcessBackend(spec, hint=guard.hint)
        return InPlaceBackend(spec, wake, forced=mode == "in-place", hint=guard.hint)
    return torch, closers


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Optional[List[str]] = None) -> int:
    # The agent forks workers while gRPC threads run; the children exec at once and never use
    # gRPC, so its fork handlers are not needed (and would log a warning on every fork).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from launcher.devices import UnhealthyGpus
    from launcher.workers import WorkerStartError
    from rendezvous.api import JobMismatchError, RendezvousError

    logging.basicConfig(level=os.environ.get("ELASTIC_LOG_LEVEL", "INFO").upper(),
                        format="[elastic] %(message)s", stream=sys.stderr)
    try:
        config = parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    # Until the agent installs its own handlers, SIGTERM unwinds like Ctrl-C so that an
    # embedded etcd and its data dir are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(config)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except JobMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except RendezvousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted before the job started", file=sys.stderr)
        return 130
    except WorkerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except UnhealthyGpus as exc:
        print(f"error: not joining the job: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
