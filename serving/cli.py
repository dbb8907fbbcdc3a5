"""`python -m serving`: autoscaled inference endpoints on Ray Serve.

    python -m serving deploy MODULE:NAME --name NAME [--min 1] [--max 4] [--target-concurrency 4]
        [--max-concurrency 8] [--max-queued 64] [--timeout 30] [--slo-ms MS] [--idle 300]
        [--cpus 1] [--memory MIB] [--gpus N] [--version V] [--address RAY] [--http-port 8000]
        [--rdzv-endpoint HOST:PORT [--queue default]]
    python -m serving status NAME [--json]
    python -m serving scale NAME [--min N] [--max N]
    python -m serving update NAME [--version V] [--target MODULE:NAME]
    python -m serving delete NAME

`update` (or a `deploy` of a running name) rolls out a new version: new replicas are ready
before old ones go. `scale` changes the bounds the policy chooses within. With `--rdzv-endpoint`
the endpoint joins the shared pool of `python -m integrations.ray controller` (same etcd): its
replicas are granted by the pool's scheduler, which takes capacity from elastic training when the
pool is full. The spec is checked before Ray is contacted; bad input is one line on stderr and
exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

USAGE_ERROR = 2


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{message}; run `{self.prog} --help` for the usage")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m serving", description="Autoscaled inference endpoints.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)
    d = sub.add_parser("deploy", help="run or update an endpoint")
    d.add_argument("target", help="MODULE:NAME, a class (one per replica) or a function")
    d.add_argument("--name", required=True)
    d.add_argument("--min", type=int, default=1, dest="min_replicas")
    d.add_argument("--max", type=int, default=4, dest="max_replicas")
    d.add_argument("--target-concurrency", type=float, default=4.0)
    d.add_argument("--max-concurrency", type=int, default=8)
    d.add_argument("--max-queued", type=int, default=64)
    d.add_argument("--timeout", type=float, default=30.0, dest="timeout_s")
    d.add_argument("--slo-ms", type=float, default=None, dest="slo_p95_ms")
    d.add_argument("--idle", type=float, default=300.0, dest="idle_s",
                   help="seconds without a request before scaling to zero (with --min 0)")
    d.add_argument("--stable-window", type=float, default=60.0, dest="stable_window_s")
    d.add_argument("--panic-window", type=float, default=6.0, dest="panic_window_s")
    d.add_argument("--priority", default="inference")
    d.add_argument("--cpus", type=float, default=1.0)
    d.add_argument("--memory", type=int, default=0, dest="memory_mib")
    d.add_argument("--gpus", type=float, default=0.0)
    d.add_argument("--version", default="1")
    d.add_argument("--working-dir", default=None, help="where MODULE is (default: here)")
    d.add_argument("--rdzv-endpoint", default=None, dest="pool", metavar="HOST:PORT",
                   help="the shared pool's etcd: replicas only as its controller grants them")
    d.add_argument("--queue", default="default", help="the pool's queue (with --rdzv-endpoint)")
    for verb in ("status", "delete", "scale", "update"):
        v = sub.add_parser(verb)
        v.add_argument("name")
        if verb == "scale":
            v.add_argument("--min", type=int, default=None, dest="min_replicas")
            v.add_argument("--max", type=int, default=None, dest="max_replicas")
        if verb == "update":
            v.add_argument("--version", default=None, help="default: the next number")
            v.add_argument("--target", default=None, help="a new MODULE:NAME")
    for q in sub.choices.values():
        q.add_argument("--address", default=None, help="the Ray cluster (default: auto)")
        q.add_argument("--http-port", type=int, default=8000)
        q.add_argument("--json", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .spec import EndpointSpec, SpecError, check_target
    try:
        args = build_parser().parse_args(argv)
        spec = None
        if args.command == "deploy":
            fields = {k: getattr(args, k) for k in EndpointSpec.__dataclass_fields__
                      if hasattr(args, k)}
            spec = EndpointSpec(**fields)
            spec.check()
            check_target(spec.target, os.path.abspath(args.working_dir or os.getcwd()))
    except (_Usage, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    import importlib.util
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("error: endpoints need Ray Serve: pip install 'elastic-run[ray]'", file=sys.stderr)
        return USAGE_ERROR
    from rendezvous.api import RendezvousError

    from . import endpoint
    try:
        if spec is not None:
            url = endpoint.deploy(spec, args.address, args.http_port,
                                  os.path.abspath(args.working_dir or os.getcwd()))
            print(json.dumps({"name": spec.name, "url": url}) if args.json else
                  f"endpoint {spec.name} at {url}")
            return 0
        endpoint.connect(args.address, args.http_port, 30.0)
        if args.command in ("scale", "update"):
            if args.command == "scale":
                spec = endpoint.scale(args.name, args.min_replicas, args.max_replicas,
                                      args.http_port)
            else:
                spec = endpoint.update(args.name, args.version, args.target, args.http_port)
            print(spec.to_json() if args.json else
                  f"{spec.name}: {spec.min_replicas}..{spec.max_replicas} replicas, version "
                  f"{spec.version}")
            return 0
        if args.command == "status":
            st = endpoint.status(args.name)
            pool = st.get("pool")
            asked = "nothing" if pool is None or pool["asked"] is None else pool["asked"]
            granted = "" if pool is None else \
                f"; the pool grants {pool['granted']} of {asked} asked ({pool['state']}" + \
                (f": {pool['reason']})" if pool.get("reason") else ")")
            print(json.dumps(st, indent=2) if args.json else
                  f"{st['name']}: {st['status']}, {st['running']} replica(s) running "
                  f"{st['replicas']}{granted}")
        else:
            endpoint.delete(args.name)
            print(f"deleted {args.name}")
        return 0
    except RendezvousError as exc:
        print(f"error: the pool's etcd is out of reach ({exc.args[0] if exc.args else exc}); "
              "check --rdzv-endpoint and that the pool's etcd runs", file=sys.stderr)
        return USAGE_ERROR
    except (KeyError, ConnectionError, ValueError, SpecError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return USAGE_ERROR
