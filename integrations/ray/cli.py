"""`python -m integrations.ray`: the shared Ray pool's controller and client.

    python -m integrations.ray controller --address RAY --rdzv-endpoint HOST:PORT [--queues FILE]
        [--metrics-port PORT [--metrics-host 127.0.0.1]]
    python -m integrations.ray submit train [--name N] [--queue Q] [--priority P] --nnodes 1:4
        [--nproc-per-node 1] [--cpus 1] [--agent-arg=--global-batch-size=32 ...] train.py ARGS...
    python -m integrations.ray submit gang [--name N] --members 3 [--cpus 1]
        [--placement pack|spread|strict-pack|strict-spread] [--max-restarts 0] -- CMD ARGS...
    python -m integrations.ray list | status NAME | logs NAME [--member ID] | stop NAME |
        queues | forget NAME

As `python -m elastic.job`: a table by default, `--json` for programs; the etcd is
--rdzv-endpoint, else $ELASTIC_RDZV_ENDPOINT; bad input is one line on stderr and exit code 2,
with nothing written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from typing import List, Optional

USAGE_ERROR = 2
ENV_ENDPOINT = "ELASTIC_RDZV_ENDPOINT"
COMMANDS = ("controller", "submit", "list", "status", "logs", "stop", "queues", "forget")


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{message}; run `{self.prog} --help` for the usage")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m integrations.ray",
                description="Share a Ray cluster between elastic training jobs and gangs.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    def common(q):
        q.add_argument("--rdzv-endpoint", default=os.environ.get(ENV_ENDPOINT),
                       help="the etcd (default: $ELASTIC_RDZV_ENDPOINT)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument("--timeout", type=float, default=5.0, help="seconds to reach etcd")
        return q

    c = common(sub.add_parser("controller", help="run the pool's controller"))
    c.add_argument("--address", required=True, help="the Ray cluster (ray.init's address)")
    c.add_argument("--queues", default=None,
                   help="the queue configuration (YAML; default: one queue, no limits)")
    c.add_argument("--provider", choices=("none", "ray"), default="none",
                   help="where new nodes come from: none (a fixed pool) or ray (the cluster's "
                        "autoscaler, via ray.autoscaler.sdk.request_resources)")
    c.add_argument("--log-dir", default=None, help="members' logs on each node")
    c.add_argument("--tick", type=float, default=0.5, help="seconds between steps")
    c.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port; "
                        "default: none)")
    c.add_argument("--metrics-host", default="127.0.0.1",
                   help="the address the metrics listen on (default: loopback only)")

    s = sub.add_parser("submit", help="queue a workload")
    kinds = s.add_subparsers(dest="kind", parser_class=_Parser, required=True)
    for kind in ("train", "gang"):
        k = common(kinds.add_parser(kind))
        k.add_argument("--name", default=None, help="the workload's name (default: generated)")
        k.add_argument("--queue", default="default")
        k.add_argument("--priority", default=None, help="a priority class of the configuration")
        k.add_argument("--cpus", type=float, default=1.0, help="CPUs per member")
        k.add_argument("--memory", type=int, default=0, help="MiB of memory per member")
        k.add_argument("--gpus", type=int, default=0, help="GPUs per member")
        k.add_argument("--working-dir", default=None,
                       help="a directory shipped to every member (Ray's runtime_env); without "
                            "it members run in this directory, which every node must have")
        k.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
        if kind == "train":
            k.add_argument("--nnodes", required=True, help="MIN:MAX members (agents)")
            k.add_argument("--nproc-per-node", type=int, default=1)
            k.add_argument("--agent-arg", action="append", default=[],
                           help="a flag for each member's `elastic.run` (repeat it)")
        else:
            k.add_argument("--members", type=int, required=True)
            k.add_argument("--placement", default="pack",
                           choices=("pack", "spread", "strict-pack", "strict-spread"))
            k.add_argument("--max-restarts", type=int, default=0)
        k.add_argument("cmd", nargs=argparse.REMAINDER, help="train: SCRIPT ARGS; gang: CMD ARGS")

    common(sub.add_parser("list", help="every workload"))
    for verb in ("status", "stop", "forget"):
        v = common(sub.add_parser(verb))
        v.add_argument("name")
        if verb == "stop":
            v.add_argument("--reason", default="")
    lg = common(sub.add_parser("logs", help="members' output"))
    lg.add_argument("name")
    lg.add_argument("--member", default=None)
    lg.add_argument("--address", default=None, help="the Ray cluster: live output of members")
    common(sub.add_parser("queues", help="queues, quotas and use"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from rendezvous.api import RendezvousError

    from .scheduler import ConfigError, SubmissionError
    try:
        args = build_parser().parse_args(argv)
        if not args.rdzv_endpoint:
            raise _Usage(f"no etcd endpoint: pass --rdzv-endpoint HOST:PORT or set {ENV_ENDPOINT}")
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.command == "controller":
            return _controller(args)
        return _client_command(args)
    except (RendezvousError, SubmissionError, ConfigError, ValueError, OSError, _Usage) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


def _controller(args) -> int:
    from .controller import NAMESPACE, Controller
    from .providers import NoProvider, RayAutoscalerProvider
    text = ""
    if args.queues:
        from .scheduler import load
        load(args.queues)  # a bad file fails here, with the path of the bad field
        with open(args.queues) as f:
            text = f.read()
    try:
        import ray
    except ImportError:
        raise _Usage("the controller needs Ray: pip install 'elastic-run[ray]'") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(message)s")
    ray.init(address=args.address, namespace=NAMESPACE, logging_level="WARNING")
    kw = {"log_dir": args.log_dir} if args.log_dir else {}
    ctl = Controller(args.rdzv_endpoint, text, tick_s=args.tick,
                     provider=RayAutoscalerProvider() if args.provider == "ray" else NoProvider(),
                     **kw).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.metrics_port is not None:
        from .metrics import serve
        host, port = serve(ctl.metrics.registry(), args.metrics_host,
                           args.metrics_port).server_address[:2]
        print(f"controller: metrics at http://{host}:{port}/metrics", flush=True)
    print(f"controller: pool of {len(ctl.state.nodes)} node(s), queues "
          f"{', '.join(ctl.config.queues)}; etcd {args.rdzv_endpoint}", flush=True)
    try:
        ctl.serve(stop)
    finally:
        ctl.close()  # members keep running: they are detached; the next controller finds them
    return 0


def _client_command(args) -> int:
    from .client import PoolClient, PoolError
    from .spec import ENDPOINT
    sub = _submission(args) if args.command == "submit" else None  # bad flags: before etcd
    with PoolClient(args.rdzv_endpoint, timeout=args.timeout) as pool:
        if sub is not None:
            sub = pool.submit(sub)
            print(json.dumps({"name": sub.name, "kind": sub.kind}) if args.json else
                  f"submitted {sub.kind} {sub.name} to queue {sub.queue}")
        elif args.command == "list":
            rows = pool.list()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _table([["NAME", "KIND", "QUEUE", "STATE", "MEMBERS", "REASON"]] +
                       [[r["name"], r["kind"], r["queue"], r["state"],
                         f"{r['size']['now']} ({r['size']['min']}..{r['size']['max']})",
                         r["reason"][:70]] for r in rows])
        elif args.command == "status":
            st = pool.status(args.name)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
        elif args.command == "logs":
            for member, text in sorted(pool.logs(args.name, args.member, args.address).items()):
                print(f"==> {member} <==")
                print(text.rstrip())
        elif args.command == "stop":
            found = pool.store.workloads().get(args.name)
            if found is not None and found.kind == ENDPOINT:
                raise PoolError(f"{args.name!r} is an endpoint; end it with `python -m serving "
                                f"delete {args.name}` (its Serve replicas go too)")
            pool.stop(args.name, args.reason)
            print(f"stop requested for {args.name}")
        elif args.command == "forget":
            pool.forget(args.name)
            print(f"forgot {args.name}")
        elif args.command == "queues":
            rows = pool.queues()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _table([["QUEUE", "COHORT", "RUNNING", "PENDING", "CPU USED", "GPU USED"]] +
                       [[r["queue"], r["cohort"] or "-", str(r["running"]), str(r["pending"]),
                         f"{r['used']['cpu']:g}", f"{r['used']['gpu']:g}"] for r in rows])
    return 0


def _submission(args):
    from .spec import GANG, TRAIN, Submission
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise _Usage("give the command to run after the options (train: the script; gang: "
                     "-- CMD ARGS)")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _Usage(f"--env takes KEY=VALUE, got {item!r}")
        env[key] = value
    name = args.name or f"{args.kind}-{uuid.uuid4().hex[:6]}"
    working_dir = os.path.abspath(args.working_dir) if args.working_dir else None
    if working_dir and not os.path.isdir(working_dir):
        raise _Usage(f"--working-dir {args.working_dir}: no such directory")
    common = dict(name=name, command=tuple(cmd), queue=args.queue, priority=args.priority,
                  cpus=args.cpus, memory_mib=args.memory, gpus=args.gpus,
                  working_dir=working_dir, cwd=None if working_dir else os.getcwd(), env=env)
    if args.kind == "train":
        lo, _, hi = args.nnodes.partition(":")
        try:
            low, high = int(lo), int(hi or lo)
        except ValueError:
            raise _Usage(f"--nnodes takes MIN:MAX (e.g. 1:4), got {args.nnodes!r}") from None
        return Submission(kind=TRAIN, min_members=low, max_members=high,
                          nproc_per_node=args.nproc_per_node,
                          agent_args=tuple(args.agent_arg), **common)
    return Submission(kind=GANG, min_members=args.members, max_members=args.members,
                      placement=args.placement, max_restarts=args.max_restarts, **common)


def _print_status(st: dict) -> None:
    print(f"{st['name']}: {st['kind']} in queue {st['queue']}, {st['state']}"
          + (f" ({st['reason']})" if st["reason"] else ""))
    print(f"  members {st['size']['now']} of {st['size']['min']}..{st['size']['max']}"
          + (f", restarts {st['restarts']}" if st["restarts"] else "")
          + (f", exit code {st['exit_code']}" if st["exit_code"] is not None else ""))
    for m in st["members"]:
        print(f"  {m['id']:<24} node {m['node'][:12]}")
    if st.get("rendezvous_job"):
        print(f"  rendezvous job {st['rendezvous_job']} (python -m elastic.job status "
              f"{st['rendezvous_job']})")
    for line in st.get("history", [])[-10:]:
        print(f"  {line}")


def _table(rows: List[List[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
