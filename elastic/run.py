"""`python -m elastic.run`: the torchrun-compatible command line of the elastic launcher.

Parses and checks the flags once (every error is one line and exit code 2), starts the embedded
etcd when no --rdzv-endpoint is given, and runs this node's agent until the job ends.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from elastic.torchrun_compat import (BACKENDS, IGNORED_CONF, TLS_CONF, CompatError,
                                     RendezvousPlan, add_torchrun_flags, console_quiet,
                                     ignored_note, parse_bool, rendezvous_plan, resolve_nproc)

USAGE_ERROR = 2
HOSTED_CONNECT_TIMEOUT_S = 60.0  # joining a rendezvous that another node starts: wait for it

RDZV_CONF_KEYS = {
    "join_timeout": float,
    "last_call_timeout": float,
    "join_settle": float,
    "lease_ttl": float,
    "connect_timeout": float,
    "blacklist_after": int,
    "blacklist_cooldown": float,
    "blacklist_max_cooldown": float,
}


class UsageError(ValueError):
    """Bad command-line input; the message says what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and a hint, instead of argparse's usage text
        raise UsageError(f"{message}; run `{self.prog} --help` to see the flags")


@dataclass(frozen=True)
class RunConfig:
    min_nodes: int
    max_nodes: int
    nproc: int
    endpoint: Optional[str]
    run_id: str
    rdzv_conf: dict
    max_restarts: int
    monitor_interval: float
    log_dir: Optional[str]
    local_addr: Optional[str]
    master_port: Optional[int]
    grace_period: float
    argv: Tuple[str, ...]
    batch_policy: object = None  # elastic.policy.BatchPolicy
    rescale_mode: str = "auto"
    hang_timeout: Optional[float] = None
    notices: object = None  # launcher.preemption.NoticeConfig
    backend: str = "torch"
    rendezvous: RendezvousPlan = RendezvousPlan(None)
    node_rank: Optional[int] = None
    role: str = "default"
    console_quiet: Mapping[int, FrozenSet[str]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()  # said once at start: what torchrun flags did and did not do


def parse_nnodes(text: str) -> Tuple[int, int]:
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--nnodes {text!r} is not N or MIN:MAX (for example 2 or 1:4)") from None
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise UsageError(f"--nnodes {text!r} is not N or MIN:MAX (for example 2 or 1:4)")
    low, high = numbers
    if low < 1:
        raise UsageError(f"--nnodes {text}: the minimum must be at least 1")
    if low > high:
        raise UsageError(f"--nnodes {text}: MIN is larger than MAX; write it as {high}:{low}")
    return low, high


def parse_rdzv_conf(text: str) -> dict:
    """Our rendezvous settings from --rdzv-conf; torchrun's own keys are read by
    `torchrun_conf` (torchrun's `timeout` is our join_timeout)."""
    conf = {}
    for key, value in _conf_items(text):
        if key == "timeout":
            key = "join_timeout"
        if key in IGNORED_CONF or key == "is_host":
            continue
        try:
            conf[key] = RDZV_CONF_KEYS[key](value)
        except ValueError:
            raise UsageError(f"--rdzv-conf {key}={value!r} is not a number") from None
        if conf[key] < 0:
            raise UsageError(f"--rdzv-conf {key} must not be negative")
    return conf


def torchrun_conf(text: str) -> Tuple[Optional[bool], Dict[str, str]]:
    """(is_host, {ignored key: why}) from torchrun's keys in --rdzv-conf."""
    is_host, ignored = None, {}
    for key, value in _conf_items(text):
        if key == "is_host":
            try:
                is_host = parse_bool(key, value)
            except CompatError as exc:
                raise UsageError(str(exc)) from None
        elif key in IGNORED_CONF:
            ignored[key] = IGNORED_CONF[key]
    return is_host, ignored


def _conf_items(text: str):
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key in TLS_CONF:
            raise UsageError(f"--rdzv-conf {key}: TLS to etcd is not supported yet; reach etcd "
                             "over a private network or an SSH tunnel")
        known = key in RDZV_CONF_KEYS or key in IGNORED_CONF or key in ("timeout", "is_host")
        if not sep or not known:
            keys = ", ".join(sorted(RDZV_CONF_KEYS))
            raise UsageError(f"--rdzv-conf {item!r}: expected KEY=VALUE with KEY one of {keys}")
        yield key, value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m elastic.run",
        description="Start this node's elastic agent: it joins the job's etcd rendezvous and runs "
                    "--nproc-per-node workers of the training script in the current world, growing "
                    "and shrinking it as nodes join, leave or fail.",
    )
    p.add_argument("--nnodes", default="1:1", help="nodes in the job: N, or MIN:MAX for an elastic "
                   "job (default 1:1)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1",
                   help="worker processes on this node: a number, or as torchrun auto (one per "
                        "GPU or other accelerator, else per CPU), cpu, gpu, xpu (default 1)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None,
                   help="etcd v3 endpoint shared by all nodes, host:port or etcd://host:port; "
                        "omit it to start an embedded etcd on 127.0.0.1 for a one-machine job")
    p.add_argument("--rdzv-backend", "--rdzv_backend", default=None, choices=BACKENDS,
                   help="etcd (default; etcd-v2 and etcd-v3 are the same here: the etcd v3 API), "
                        "or torchrun's c10d (the agent on the endpoint's host hosts an etcd "
                        "there) or static (node rank 0 hosts an etcd at "
                        "MASTER_ADDR:MASTER_PORT; the default when --master-addr or "
                        "--node-rank is given without --rdzv-endpoint)")
    p.add_argument("--rdzv-id", "--rdzv_id", default="default",
                   help="job id: all nodes of a job use the same one; jobs sharing an etcd use "
                        "different ones (default: default)")
    p.add_argument("--rdzv-conf", "--rdzv_conf", default="",
                   help="KEY=VALUE,... with join_timeout (s a job may stay below min nodes, "
                        "default 600), last_call_timeout (s to wait for more nodes once min are "
                        "present, default 3), join_settle (s over which joins are coalesced, "
                        "default 0.2), lease_ttl (s after which a silent node is removed, default "
                        "10), connect_timeout (s to reach etcd, default 5), blacklist_after (worker "
                        "failures of a node before it sits out, default 2; 0: never), "
                        "blacklist_cooldown (s it sits out the first time, doubling each time, "
                        "default 60), blacklist_max_cooldown (cap, default 3600)")
    p.add_argument("--standalone", action="store_true",
                   help="one-machine job on an embedded etcd (the default without --rdzv-endpoint)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="worker failures the job survives before it fails; nodes joining or "
                        "leaving do not count (default 0)")
    p.add_argument("--monitor-interval", "--monitor_interval", type=float, default=0.1,
                   help="seconds between checks of the workers and the rendezvous (default 0.1)")
    p.add_argument("--log-dir", "--log_dir", default=None,
                   help="write each rank's output to LOG_DIR/round<N>/rank<R>.log and the event "
                        "log to LOG_DIR/events.jsonl")
    p.add_argument("--local-addr", "--local_addr", default=None,
                   help="address other nodes use to reach this one (default: the address that "
                        "routes to the rendezvous endpoint)")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="port of the rank-0 store when this node holds rank 0 (default: a free "
                        "one); with a static rendezvous, the port of the rendezvous")
    p.add_argument("--grace-period", type=float, default=5.0,
                   help="seconds workers get after SIGTERM before they are killed (default 5)")
    p.add_argument("--backend", choices=["torch", "horovod"], default="torch",
                   help="what the workers run: torch (torchrun's environment; default) or horovod "
                        "(Horovod's gloo controller and rendezvous from the same rounds; "
                        "hvd.elastic scripts reset in place). Horovod is installed with "
                        "`bash integrations/horovod/install.sh`")
    p.add_argument("--rescale-mode", choices=["auto", "restart", "in-place"], default="auto",
                   help="how workers follow a new world: restart them (any script), or in place "
                        "(scripts using integrations.torch.run: survivors keep running, joining "
                        "nodes pre-warm their workers); auto (default) switches to in place once "
                        "the workers use the API")
    p.add_argument("--preemption-file", default=None,
                   help="a file whose appearance is this node's preemption notice (write it "
                        "elsewhere and rename it here); the node leaves at the next step boundary")
    p.add_argument("--preemption-url", default=None,
                   help="a metadata endpoint polled for a preemption notice (see "
                        "--preemption-preset)")
    p.add_argument("--preemption-preset", default="generic", choices=["generic", "aws", "gce"],
                   help="how to read the endpoint: aws (spot instance-action, polled at the "
                        "standard address unless --preemption-url), gce (instance/preempted), "
                        "generic (any 200 with a body other than false/0 is a notice)")
    p.add_argument("--preemption-poll-interval", type=float, default=1.0,
                   help="seconds between polls of the notice file and endpoint (default 1)")
    p.add_argument("--preemption-grace", type=float, default=30.0,
                   help="seconds a notice without its own deadline (SIGTERM, the file, gce) "
                        "gives this node to leave (default 30)")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds without step progress after which a worker counts as hung: its "
                        "stacks are dumped to its log, it is killed and the round re-forms "
                        "(counted against --max-restarts). Workers using integrations.torch.run "
                        "report progress at each step boundary; others are not watched")
    p.add_argument("--batch-policy", choices=["fixed", "linear", "sqrt", "adascale"], default=None,
                   help="how the global batch and learning rate follow the world size: fixed "
                        "(constant global batch via micro-batches and accumulation; the default "
                        "with --global-batch-size), linear or sqrt (per-worker batch fixed, "
                        "learning rate scaled by the world or its square root), adascale "
                        "(learning rate scaled by the measured gain). The plan for each world "
                        "reaches the workers as ELASTIC_* variables")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step over all workers")
    p.add_argument("--per-worker-batch-size", type=int, default=None,
                   help="samples per worker per step (linear, sqrt, adascale)")
    p.add_argument("--reference-world-size", type=int, default=None,
                   help="world size the base learning rate was tuned for (default: the smallest "
                        "world, MIN nodes x --nproc-per-node)")
    p.add_argument("--max-micro-batch", type=int, default=None,
                   help="largest batch a worker processes at once; larger shares are split into "
                        "gradient-accumulation steps")
    p.add_argument("--lr-warmup-steps", type=int, default=0,
                   help="steps over which the learning-rate factor ramps after each change")
    add_torchrun_flags(p)
    p.add_argument("-m", "--module", action="store_true",
                   help="run the script as a Python module, as python -m does")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="run the script as an executable, without python in front")
    p.add_argument("script", help="training script (or module with -m, or executable)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _worker_argv(args) -> Tuple[str, ...]:
    if args.module and args.no_python:
        raise UsageError("--module and --no-python cannot be used together")
    if args.no_python:
        if shutil.which(args.script) is None:
            raise UsageError(f"executable {args.script!r} not found on PATH or not executable")
        return (args.script, *args.script_args)
    if args.module:
        _check_module(args.script)
        return (sys.executable, "-u", "-m", args.script, *args.script_args)
    if os.path.isdir(args.script):
        if not os.path.isfile(os.path.join(args.script, "__main__.py")):
            raise UsageError(f"training script {args.script!r} is a directory (with no "
                             "__main__.py); give the script file in it, e.g. "
                             f"{os.path.join(args.script, 'train.py')}")
    elif not os.path.isfile(args.script):
        raise UsageError(f"training script {args.script!r} not found (working directory "
                         f"{os.getcwd()}); check the path")
    return (sys.executable, "-u", args.script, *args.script_args)


def _check_module(name: str) -> None:
    """-m NAME must be importable by the workers (python -m puts the working directory first on
    the path), so that a typo fails here, before etcd and workers start."""
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    finally:
        sys.path.pop(0)
    if not found:
        raise UsageError(f"module {name!r} (-m) not found from the working directory "
                         f"{os.getcwd()} or the Python path; check its name, or run from the "
                         "directory that contains it")


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    low, high = parse_nnodes(args.nnodes)
    try:
        nproc, nproc_note = resolve_nproc(args.nproc_per_node)
        quiet = console_quiet(nproc, args.redirects, args.local_ranks_filter)
    except CompatError as exc:
        raise UsageError(str(exc)) from None
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts must not be negative, got {args.max_restarts}")
    if args.hang_timeout is not None and args.hang_timeout <= 0:
        raise UsageError("--hang-timeout must be positive (seconds without progress)")
    if args.hang_timeout is not None and args.rescale_mode == "restart":
        raise UsageError("--hang-timeout watches workers that report progress through the "
                         "in-place API; it cannot work with --rescale-mode restart")
    if args.monitor_interval <= 0:
        raise UsageError("--monitor-interval must be positive")
    if args.standalone and args.rdzv_endpoint:
        raise UsageError("--standalone starts its own etcd; leave out --rdzv-endpoint or --standalone")
    if args.rdzv_id in ("", ".") or "/" in args.rdzv_id:
        raise UsageError(f"--rdzv-id {args.rdzv_id!r} must be non-empty and contain no '/'")
    if args.node_rank is not None and args.node_rank < 0:
        raise UsageError(f"--node-rank must not be negative, got {args.node_rank}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UsageError(f"--master-port {args.master_port} is not a port number")
    rdzv_conf = parse_rdzv_conf(args.rdzv_conf)
    is_host, ignored_conf = torchrun_conf(args.rdzv_conf)
    plan = _rendezvous(args, high, is_host)
    if plan.hosting is not None and "connect_timeout" not in rdzv_conf:
        rdzv_conf["connect_timeout"] = HOSTED_CONNECT_TIMEOUT_S
    if args.backend == "horovod":
        _check_horovod_backend(args)
    notes = [n for n in (nproc_note, ignored_note(args, ignored_conf)) if n]
    if args.master_addr is not None and plan.backend != "static":
        notes.append(f"--master-addr is used by a static rendezvous only; with {plan.backend} "
                     "the rank-0 store is on the node holding rank 0, at its --local-addr")
    if (args.redirects.strip() not in ("", "0") or args.tee.strip() not in ("", "0")) \
            and not args.log_dir:
        notes.append("--redirects/--tee: log files are written only with --log-dir DIR "
                     "(DIR/round<N>/rank<R>.log)")
    grace = args.shutdown_timeout if args.shutdown_timeout is not None else args.grace_period
    return RunConfig(
        backend=args.backend,
        batch_policy=_batch_policy(args, low, high, nproc), rescale_mode=args.rescale_mode,
        hang_timeout=args.hang_timeout, notices=_notice_config(args),
        min_nodes=low, max_nodes=high, nproc=nproc,
        endpoint=None if plan.endpoint is None else _format(plan.endpoint),
        run_id=args.rdzv_id, rdzv_conf=rdzv_conf,
        max_restarts=args.max_restarts, monitor_interval=args.monitor_interval,
        log_dir=args.log_dir, local_addr=args.local_addr,
        # With a static rendezvous --master-port is the rendezvous's port (as in torchrun,
        # where one store serves both); the rank-0 store then takes a free port.
        master_port=None if plan.backend == "static" and plan.hosting else args.master_port,
        grace_period=grace, argv=_worker_argv(args), rendezvous=plan,
        node_rank=args.node_rank, role=args.role, console_quiet=quiet, notes=tuple(notes),
    )


def _format(endpoint: Tuple[str, int]) -> str:
    from rendezvous.connect import format_endpoint
    return format_endpoint(*endpoint)


def _rendezvous(args, max_nodes: int, is_host: Optional[bool]) -> RendezvousPlan:
    endpoint, has_port = None, False
    if args.rdzv_endpoint:
        from rendezvous.connect import parse_endpoint
        try:
            endpoint = parse_endpoint(args.rdzv_endpoint)
        except ValueError as exc:
            raise UsageError(f"--rdzv-endpoint: {exc}") from None
        has_port = args.rdzv_endpoint.rstrip("/").rsplit("]", 1)[-1].count(":") > 0
    backend = args.rdzv_backend
    if backend is not None and backend.startswith("etcd") and args.master_addr is not None \
            and endpoint is None:
        raise UsageError(f"--rdzv-backend {backend} needs --rdzv-endpoint (the etcd to use); "
                         "--master-addr names a static rendezvous")
    return rendezvous_plan(backend, endpoint, has_port, args.master_addr, args.master_port,
                           args.node_rank, max_nodes, args.standalone, is_host)


def _check_horovod_backend(args) -> None:
    if args.rescale_mode == "in-place":
        raise UsageError("--rescale-mode in-place cannot be forced on Horovod workers: they follow a "
                         "new world in place only through hvd.elastic.run, which auto (the "
                         "default) detects, and they pre-warm anyway")
    if args.hang_timeout is not None:
        raise UsageError("--hang-timeout watches step progress reported through the torch "
                         "in-place API; Horovod workers do not report it")
    from integrations.horovod.agent import require_horovod
    try:
        require_horovod()
    except ImportError as exc:
        raise UsageError(f"--backend horovod: Horovod cannot be imported ({exc}); install it "
                         "with `bash integrations/horovod/install.sh`") from None


def _notice_config(args):
    from launcher.preemption import NoticeConfig

    try:
        return NoticeConfig(notice_file=args.preemption_file, metadata_url=args.preemption_url,
                            metadata_preset=args.preemption_preset,
                            poll_interval=args.preemption_poll_interval,
                            default_grace=args.preemption_grace)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _batch_policy(args, min_nodes: int, max_nodes: int, nproc: int):
    """The policy named on the command line, checked against every world this node can be in."""
    from elastic.policy import BatchPolicyError, make_policy

    name = args.batch_policy
    if name is None:
        if args.global_batch_size is None and args.per_worker_batch_size is None:
            return None
        name = "fixed" if args.global_batch_size is not None else "linear"
    smallest = min_nodes * nproc
    try:
        policy = make_policy(
            name, global_batch=args.global_batch_size, per_worker_batch=args.per_worker_batch_size,
            reference_world=args.reference_world_size or smallest,
            max_micro_batch=args.max_micro_batch, warmup_steps=args.lr_warmup_steps)
        for world in range(smallest, max_nodes * nproc + 1, nproc):
            policy.plan(world)
    except BatchPolicyError as exc:
        raise UsageError(str(exc)) from None
    return policy


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
    from launcher.workers import WorkerSpec
    from rendezvous.api import RendezvousSettings
    from rendezvous.embedded import EmbeddedEtcd
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
    embedded = store = agent = None
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
            embedded = start_or_join(*plan.endpoint, plan.hosting, connect_timeout)
        host = config.local_addr or local_address(endpoint.rpartition(":")[0])
        if config.master_port is not None:
            _check_port_free(host, config.master_port)
        store = EtcdStore(endpoint, config.run_id, timeout=connect_timeout)
        events = os.path.join(config.log_dir, "events.jsonl") if config.log_dir else None
        if config.log_dir:
            os.makedirs(config.log_dir, exist_ok=True)
        spec = WorkerSpec(argv=config.argv, nproc=config.nproc, log_dir=config.log_dir,
                          grace_period_s=config.grace_period, role=config.role,
                          console_quiet=config.console_quiet)
        agent = ElasticAgent(AgentConfig(settings=settings, workers=spec, host=host,
                                         monitor_interval=config.monitor_interval,
                                         master_port=config.master_port,
                                         batch_policy=config.batch_policy,
                                         rescale_mode=config.rescale_mode,
                                         hang_timeout=config.hang_timeout,
                                         notices=config.notices, backend=config.backend,
                                         rank_hint=config.node_rank, endpoint=endpoint),
                             store, events_path=events)
        return agent.run()
    finally:
        if embedded is not None and store is not None and agent is not None \
                and plan.hosting is not None:
            linger_for_others(store, agent.node_id, settings.lease_ttl + 5.0)
        if store is not None:
            store.close()
        if embedded is not None:
            embedded.stop()


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Optional[List[str]] = None) -> int:
    # The agent forks workers while gRPC threads run; the children exec at once and never use
    # gRPC, so its fork handlers are not needed (and would log a warning on every fork).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from launcher.workers import WorkerStartError
    from rendezvous.api import RendezvousError

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
    except RendezvousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted before the job started", file=sys.stderr)
        return 130
    except WorkerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
