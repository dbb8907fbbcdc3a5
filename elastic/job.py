"""`python -m elastic.job`: see and control running jobs from outside.

    python -m elastic.job list                         the jobs (of an etcd, or of this machine)
    python -m elastic.job status JOB                   spec, round, nodes, recent events
    python -m elastic.job events JOB                   the job's history, every node's events
    python -m elastic.job resize JOB NODES             the desired size, within min..max
    python -m elastic.job release JOB NODE_ID...       these nodes leave; the size drops with them
    python -m elastic.job stop JOB                     commit, checkpoint, end as stopped
    python -m elastic.job watch JOB                    changes as they happen (until the job ends)
    python -m elastic.job targets [JOB]                the agents' /metrics addresses (--json:
                                                       Prometheus HTTP service discovery)

A human table by default, `--json` for programs (the status schema is in the README). The etcd is
--rdzv-endpoint, else $ELASTIC_RDZV_ENDPOINT, else the one an agent of that job on this machine
recorded (so a job on the embedded etcd is found too). A secured etcd: --cacert, --cert, --key,
--user, with the password in $ELASTIC_ETCD_PASSWORD. Bad input (an unknown job or node, a size
outside min..max, an ended job, an unreachable etcd) is one line on stderr and exit code 2;
nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

USAGE_ERROR = 2
COMMANDS = ("list", "status", "events", "resize", "release", "stop", "watch", "targets")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{message}; run `{self.prog} --help` to see the commands")


class _Usage(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m elastic.job",
                description="See and control jobs of the elastic launcher through their etcd.")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("job", nargs="?", help="the job's id (--rdzv-id of its agents)")
    p.add_argument("args", nargs="*", help="resize: NODES; release: NODE_ID...")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None,
                   help="the etcd (default: $ELASTIC_RDZV_ENDPOINT, or where the job's agents on "
                        "this machine run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--reason", default="", help="release, stop: why (kept in etcd and events)")
    p.add_argument("--no-probe", action="store_true",
                   help="status: do not ask each node's health endpoint")
    p.add_argument("--cacert", default=None, help="CA certificate of a TLS etcd")
    p.add_argument("--cert", default=None, help="client certificate for a TLS etcd")
    p.add_argument("--key", default=None, help="client key for a TLS etcd")
    p.add_argument("--user", default=None,
                   help="etcd user (the password is read from $ELASTIC_ETCD_PASSWORD)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to reach etcd")
    return p


def _endpoints(args) -> List[str]:
    import os

    from rendezvous import registry

    if args.rdzv_endpoint:
        return [args.rdzv_endpoint]
    if os.environ.get(registry.ENV_ENDPOINT):
        return [os.environ[registry.ENV_ENDPOINT]]
    recorded = registry.recorded()
    if args.job:
        recorded = [r for r in recorded if r.run_id == args.job]
    endpoints = list(dict.fromkeys(r.endpoint for r in recorded))
    if not endpoints:
        what = f"job {args.job!r}" if args.job else "job"
        raise _Usage(f"no etcd endpoint: no {what} of this machine is running; pass "
                     "--rdzv-endpoint HOST:PORT or set ELASTIC_RDZV_ENDPOINT")
    return endpoints


def _security(args):
    from rendezvous.connect import EtcdSecurity

    try:
        return EtcdSecurity.from_settings(ca_cert=args.cacert, cert=args.cert, key=args.key,
                                          user=args.user)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _check(args) -> None:
    if args.command not in ("list", "targets") and not args.job:
        raise _Usage(f"{args.command} needs the job's id (python -m elastic.job list shows them)")
    if args.command == "resize":
        if len(args.args) != 1 or not args.args[0].isdigit():
            raise _Usage("resize needs one number of nodes: resize JOB NODES")
    elif args.command == "release":
        if not args.args:
            raise _Usage("release needs the ids of the nodes to release: release JOB NODE_ID...")
    elif args.args:
        raise _Usage(f"{args.command} takes no more arguments than the job: "
                     f"{' '.join(args.args)}")


def main(argv: Optional[List[str]] = None) -> int:
    from rendezvous.api import RendezvousError
    from rendezvous.client import JobClient

    try:
        args = build_parser().parse_args(argv)
        _check(args)
        endpoints = _endpoints(args)
        security = _security(args)
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.command == "list":
            return _list(endpoints, args, security)
        if args.command == "targets":
            return _targets(endpoints, args, security)
        with JobClient(endpoints[0], timeout=args.timeout, security=security) as client:
            return _run(client, args)
    except (RendezvousError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


def _list(endpoints, args, security) -> int:
    from rendezvous.client import JobClient

    rows = []
    for endpoint in endpoints:
        with JobClient(endpoint, timeout=args.timeout, security=security) as client:
            for job in client.jobs():
                rows.append(client.status(job, probe=False, recent=0))
    if args.json:
        print(json.dumps([s.to_json() for s in rows], indent=2))
        return 0
    table = [["JOB", "STATE", "NODES", "WORLD", "ROUND", "ETCD"]]
    for s in rows:
        active = sum(1 for n in s.nodes if n.state == "active")
        table.append([s.job, s.state, f"{active}/{s.spec.target} ({s.spec.min_nodes}.."
                      f"{s.spec.max_nodes})", str(s.round.world_size if s.round else 0),
                      str(s.round.number if s.round else "-"), s.endpoint])
    _print_table(table)
    return 0


def http_sd(statuses) -> List[dict]:
    """Prometheus' HTTP service discovery for the agents of these jobs (JobStatus each): one
    target group per node, labelled with its job and node id."""
    return [{"targets": [n.health_addr], "labels": {"job": s.job, "node_id": n.node_id,
                                                    "host": n.host}}
            for s in statuses for n in s.nodes if n.health_addr]


def _targets(endpoints, args, security) -> int:
    from rendezvous.client import JobClient

    statuses = []
    for endpoint in endpoints:
        with JobClient(endpoint, timeout=args.timeout, security=security) as client:
            jobs = [args.job] if args.job else client.jobs()
            statuses += [client.status(job, probe=False, recent=0) for job in jobs]
    groups = http_sd(statuses)
    if args.json:
        print(json.dumps(groups, indent=2))
        return 0
    table = [["JOB", "NODE", "METRICS"]]
    table += [[g["labels"]["job"], g["labels"]["node_id"], f"http://{g['targets'][0]}/metrics"]
              for g in groups]
    _print_table(table)
    return 0


def _run(client, args) -> int:
    job = args.job
    if args.command == "status":
        status = client.status(job, probe=not args.no_probe)
        print(json.dumps(status.to_json(), indent=2) if args.json else _describe(status))
    elif args.command == "events":
        events = client.events(job)
        if args.json:
            print(json.dumps(events, indent=2))
        else:
            for e in events:
                print(_event_line(e))
    elif args.command == "resize":
        spec = client.resize(job, int(args.args[0]))
        _done(args, {"job": job, "desired": spec.target},
              f"job {job}: desired size {spec.target} (of {spec.min_nodes}..{spec.max_nodes})")
    elif args.command == "release":
        spec = client.release(job, args.args, reason=args.reason)
        _done(args, {"job": job, "released": args.args, "desired": spec.target},
              f"job {job}: released {', '.join(args.args)}; desired size now {spec.target}")
    elif args.command == "stop":
        client.stop(job, reason=args.reason)
        _done(args, {"job": job, "stop": True},
              f"job {job}: stop requested; its workers commit, checkpoint and end")
    elif args.command == "watch":
        client.status(job, probe=False, recent=0)  # an unknown job is an error, not a wait
        with client.watch(job) as changes:
            for change in changes:
                print(json.dumps(_change_json(change)) if args.json else _change_line(change),
                      flush=True)
    return 0


def _done(args, data: dict, text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _describe(s) -> str:
    spec = s.spec
    lines = [f"job {s.job}: {s.state} (etcd {s.endpoint})"]
    if s.round is not None:
        lines.append(f"round {s.round.number}: world size {s.round.world_size}, cause "
                     f"{s.round.cause}, worker failures so far {s.round.restart_count}")
    agreed = ", ".join(f"{k} {v}" for k, v in spec.agreed.items() if v is not None)
    lines.append(f"size: {spec.min_nodes}..{spec.max_nodes}, desired {spec.target}"
                 + (f"; {agreed}" if agreed else ""))
    lines.append(f"a node leaving costs: {s.leaving_costs}")
    if s.outcome is not None:
        lines.append(f"outcome: {s.outcome.status} (exit code {s.outcome.exit_code})"
                     + (f": {s.outcome.reason}" if s.outcome.reason else ""))
    table = [["NODE", "STATE", "HEALTH", "HOST", "SLOTS", "RANKS", "LABELS", "JOINED"]]
    for n in s.nodes:
        ranks = f"{n.rank_offset}..{n.rank_offset + n.slots - 1}" if n.rank_offset is not None \
            else "-"
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"
        table.append([n.node_id, n.state, n.health, n.host, str(n.slots), ranks, labels,
                      time.strftime("%H:%M:%S", time.localtime(n.joined_at))])
    lines.append("")
    lines += _table_lines(table)
    if s.events:
        lines += ["", "recent events:"] + ["  " + _event_line(e) for e in s.events]
    return "\n".join(lines)


def _event_line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
    extra = {k: v for k, v in e.items()
             if k not in ("time", "event", "node", "round", "world_size", "members", "cause")}
    parts = [when, e.get("event", "?"), f"node={e.get('node')}"]
    if e.get("round") is not None:
        parts.append(f"round={e['round']} world={e.get('world_size')}")
    if e.get("cause"):
        parts.append(f"cause={e['cause']}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def _change_json(change) -> dict:
    from dataclasses import asdict

    return {"change": type(change).__name__, **asdict(change)}


def _change_line(change) -> str:
    name = type(change).__name__
    if name == "RoundPublished":
        r = change.round
        return (f"round {r.number} published: world size {r.world_size}, members "
                f"{', '.join(r.node_ids)} (cause {r.cause})")
    if name == "NodeJoined":
        return f"node {change.node.node_id} joined ({change.node.host}, {change.node.nproc} slots)"
    if name == "NodeLeft":
        return f"node {change.node_id} left"
    if name == "SpecChanged":
        return f"spec changed: desired size {change.spec.target}"
    if name == "NodeReleased":
        return f"node {change.node_id} released" + (
            f": {change.release.reason}" if change.release.reason else "")
    if name == "StopRequested":
        return "stop requested" + (f": {change.request.reason}" if change.request.reason else "")
    return f"job ended: {change.outcome.status}"


def _table_lines(rows) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _print_table(rows) -> None:
    print("\n".join(_table_lines(rows)))


if __name__ == "__main__":
    sys.exit(main())
