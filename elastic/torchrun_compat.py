"""torchrun's command line, as far as it means something here: which of its flags we map onto
this launcher, which we accept and ignore (and why), and the pure parsing they need.

torchrun's rendezvous backends map as follows (`rendezvous_plan`):
- `etcd`, `etcd-v2`, `etcd-v3`: the etcd at --rdzv-endpoint (none: an embedded one);
- `c10d`: torchrun keeps its store in the agent whose host is the endpoint's; here that agent
  hosts an etcd at the endpoint (`is_host` in --rdzv-conf says so explicitly);
- `static` (torchrun's default): node rank 0 hosts an etcd at MASTER_ADDR:MASTER_PORT.
A hosted rendezvous ends with its host, as torchrun's does; `python -m rendezvous` gives one that
outlives every node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

STATIC_DEFAULT_PORT = 29500  # torchrun's MASTER_PORT when none is given
C10D_DEFAULT_PORT = 29400  # torchrun's c10d endpoint port when the endpoint has none
BACKENDS = ("etcd", "etcd-v2", "etcd-v3", "c10d", "static")
STREAMS = {0: frozenset(), 1: frozenset({"stdout"}), 2: frozenset({"stderr"}),
           3: frozenset({"stdout", "stderr"})}
# Flags of torchrun accepted and ignored, with what happens here instead.
IGNORED_FLAGS = {
    "start_method": "workers are always new processes started with exec",
    "run_path": "workers are always separate processes",
    "event_log_handler": "events go to --log-dir/events.jsonl",
    "logs_specs": "logs go to --log-dir/round<N>/rank<R>.log",
    "duplicate_stdout_filters": "use --log-dir",
    "duplicate_stderr_filters": "use --log-dir",
    "numa_binding": "no NUMA binding",
    "signals_to_handle": "SIGTERM and SIGINT are handled, as preemption notices",
    "virtual_local_rank": "LOCAL_RANK is the process's own",
}
# torchrun rendezvous settings that have no counterpart here.
IGNORED_CONF = {
    "read_timeout": "etcd calls use connect_timeout",
    "close_timeout": "a job ends when its outcome is written",
    "use_libuv": "no TCPStore rendezvous",
    "keep_alive_interval": "nodes keep leases alive (lease_ttl)",
    "keep_alive_max_attempt": "nodes keep leases alive (lease_ttl)",
    "heartbeat": "nodes keep leases alive (lease_ttl)",
}
# Keys of --rdzv-conf that say how to reach a secured etcd (torchrun's etcd backend names the TLS
# ones the same way); the password comes from $ELASTIC_ETCD_PASSWORD, never the command line.
SECURITY_CONF = ("protocol", "cacert", "cert", "key", "user")


class CompatError(ValueError):
    """A torchrun flag used in a way that cannot work here; the message says what to do."""


def add_torchrun_flags(parser) -> None:
    """The torchrun flags that the launcher's own parser does not define."""
    parser.add_argument("--node-rank", "--node_rank", type=int, default=None,
                        help="torchrun's node rank: nodes are ranked by it in the first round "
                             "(node rank 0 holds global rank 0); with a static rendezvous node "
                             "rank 0 hosts the rendezvous")
    parser.add_argument("--master-addr", "--master_addr", default=None,
                        help="torchrun's static rendezvous: the rendezvous (an etcd hosted by "
                             "node rank 0) is at MASTER_ADDR:MASTER_PORT (default port 29500)")
    parser.add_argument("--local-ranks-filter", "--local_ranks_filter", default="",
                        help="show only these local ranks' output on the console, e.g. 0,1 "
                             "(log files keep all)")
    parser.add_argument("-r", "--redirects", default="0",
                        help="as torchrun: streams (1 stdout, 2 stderr, 3 both; or per local "
                             "rank, 0:3,1:2) kept off the console; with --log-dir they are in "
                             "the rank's log file")
    parser.add_argument("-t", "--tee", default="0",
                        help="as torchrun: streams shown on the console and written to the log "
                             "file (here always the case with --log-dir)")
    parser.add_argument("--role", default="default", help="ROLE_NAME given to the workers")
    parser.add_argument("--shutdown-timeout", "--shutdown_timeout", type=float, default=None,
                        help="same as --grace-period")
    parser.add_argument("--start-method", "--start_method", default=None,
                        choices=["spawn", "fork", "forkserver"], help="accepted and ignored")
    parser.add_argument("--run-path", "--run_path", action="store_true", default=None,
                        help="accepted and ignored")
    parser.add_argument("--event-log-handler", "--event_log_handler", default=None,
                        help="accepted and ignored")
    parser.add_argument("--logs-specs", "--logs_specs", default=None, help="accepted and ignored")
    parser.add_argument("--duplicate-stdout-filters", "--duplicate_stdout_filters", default=None,
                        help="accepted and ignored")
    parser.add_argument("--duplicate-stderr-filters", "--duplicate_stderr_filters", default=None,
                        help="accepted and ignored")
    parser.add_argument("--numa-binding", "--numa_binding", default=None, help="accepted and ignored")
    parser.add_argument("--signals-to-handle", "--signals_to_handle", default=None,
                        help="accepted and ignored")
    parser.add_argument("--virtual-local-rank", "--virtual_local_rank", action="store_true",
                        default=None, help="accepted and ignored")


def ignored_note(args, ignored_conf: Mapping[str, str] = ()) -> Optional[str]:
    """One line naming every torchrun flag given that has no effect here, and why."""
    parts = [f"--{name.replace('_', '-')} ({why})" for name, why in IGNORED_FLAGS.items()
             if getattr(args, name, None) not in (None, False)]
    parts += [f"--rdzv-conf {key} ({why})" for key, why in dict(ignored_conf).items()]
    if parts:
        return "torchrun options without effect here: " + "; ".join(parts)
    return None


def resolve_nproc(text: str) -> Tuple[int, Optional[str]]:
    """--nproc-per-node N|auto|cpu|gpu|xpu, as torchrun: (workers, a note saying what was found)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is not None:
        if value < 1:
            raise CompatError(f"--nproc-per-node must be at least 1, got {value}")
        return value, None
    if text not in ("auto", "cpu", "gpu", "xpu"):
        raise CompatError(f"--nproc-per-node {text!r}: give a number, or auto, cpu, gpu or xpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if text == "cpu":
        return cpus, f"--nproc-per-node cpu: {cpus} workers, one per CPU"
    import torch  # only here: importing torch takes seconds

    if text == "gpu":
        if not torch.cuda.is_available():
            raise CompatError("--nproc-per-node gpu: no CUDA device is visible; give a number "
                              "or use cpu")
        count = torch.cuda.device_count()
        return count, f"--nproc-per-node gpu: {count} workers, one per GPU"
    if text == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise CompatError("--nproc-per-node xpu: no XPU device is visible; give a number "
                              "or use cpu")
        count = torch.xpu.device_count()
        return count, f"--nproc-per-node xpu: {count} workers, one per XPU"
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        count = accelerator.device_count()
        kind = accelerator.current_accelerator().type
        return count, f"--nproc-per-node auto: {count} workers, one per {kind} device"
    return cpus, f"--nproc-per-node auto: no accelerator, {cpus} workers, one per CPU"


def parse_streams(text: str, flag: str, nproc: int) -> Dict[int, FrozenSet[str]]:
    """torchrun's stream spec: "3" (every local rank) or "0:1,1:2" (per local rank), with
    1 stdout, 2 stderr, 3 both, 0 none. Returns local rank -> stream names."""
    text = (text or "0").strip()

    def code(part: str) -> FrozenSet[str]:
        if not part.strip().isdigit() or int(part) not in STREAMS:
            raise CompatError(f"{flag} {text!r}: use 0-3 (1 stdout, 2 stderr, 3 both) or "
                              "LOCAL_RANK:0-3,... as torchrun does")
        return STREAMS[int(part)]

    if ":" not in text:
        return {rank: code(text) for rank in range(nproc)}
    out = {rank: frozenset() for rank in range(nproc)}
    for item in filter(None, (p.strip() for p in text.split(","))):
        rank, _, value = item.partition(":")
        if not rank.isdigit():
            raise CompatError(f"{flag} {item!r}: expected LOCAL_RANK:0-3")
        out[int(rank)] = code(value)
    return out


def console_quiet(nproc: int, redirects: str, local_ranks_filter: str) -> Dict[int, FrozenSet[str]]:
    """Local rank -> streams not echoed to the console: the redirected ones, and all of the ranks
    that --local-ranks-filter leaves out. Only ranks with something to hide are present."""
    quiet = parse_streams(redirects, "--redirects", nproc)
    if local_ranks_filter.strip():
        shown = set()
        for part in local_ranks_filter.split(","):
            if not part.strip().isdigit():
                raise CompatError(f"--local-ranks-filter {local_ranks_filter!r}: expected local "
                                  "ranks like 0,1")
            shown.add(int(part))
        for rank in range(nproc):
            if rank not in shown:
                quiet[rank] = STREAMS[3]
    return {rank: streams for rank, streams in quiet.items() if streams}


@dataclass(frozen=True)
class RendezvousPlan:
    """Where this node's rendezvous is. endpoint None: an embedded etcd for this node alone.
    hosting: "host" (this node starts the etcd at the endpoint), "join" (another node does;
    wait for it), "auto" (host it if the endpoint is an address of this machine and nobody
    serves it yet), or None (an etcd someone runs)."""

    endpoint: Optional[Tuple[str, int]]
    hosting: Optional[str] = None
    backend: str = "etcd"


def rendezvous_plan(backend: Optional[str], endpoint: Optional[Tuple[str, int]],
                    endpoint_has_port: bool, master_addr: Optional[str],
                    master_port: Optional[int], node_rank: Optional[int], max_nodes: int,
                    standalone: bool, is_host: Optional[bool]) -> RendezvousPlan:
    """Map torchrun's rendezvous flags onto an etcd endpoint and who hosts it (module docstring).
    endpoint is --rdzv-endpoint parsed (port defaulted); master_* and node_rank as given."""
    if backend is None:
        torchrun_static = endpoint is None and (master_addr is not None or node_rank is not None)
        backend = "static" if torchrun_static and max_nodes > 1 else "etcd"
    if standalone:
        return RendezvousPlan(None, None, backend)
    if backend == "static":
        if endpoint is None:
            if max_nodes == 1 and master_addr is None:
                return RendezvousPlan(None, None, backend)  # one node: nobody else must find it
            endpoint = (master_addr or "127.0.0.1", master_port or STATIC_DEFAULT_PORT)
        hosting = "auto" if node_rank is None else ("host" if node_rank == 0 else "join")
        return RendezvousPlan(endpoint, hosting, backend)
    if backend == "c10d":
        if endpoint is None:
            return RendezvousPlan(None, None, backend)
        if not endpoint_has_port:
            endpoint = (endpoint[0], C10D_DEFAULT_PORT)
        hosting = "auto" if is_host is None else ("host" if is_host else "join")
        return RendezvousPlan(endpoint, hosting, backend)
    return RendezvousPlan(endpoint, None, backend)


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise CompatError(f"--rdzv-conf {key}={value!r}: expected true or false")
