"""`python -m elastic.dashboard [--rdzv-endpoint HOST:PORT] [--ray-address ADDR] [--port 8470]`

Serves the dashboard on http://127.0.0.1:PORT/ (`--host` to listen elsewhere) until Ctrl-C. The
etcd is --rdzv-endpoint, else $ELASTIC_RDZV_ENDPOINT, else the one an agent on this machine
recorded; the pool's records are read from the same etcd; --ray-address adds Serve's replicas and
the endpoints' traffic. Bad flags are one line and exit code 2; an etcd or a Ray out of reach is
shown on the page (it recovers when they come back).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional

USAGE_ERROR = 2
DEFAULT_PORT = 8470


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{message}; run `{self.prog} --help` for the usage")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m elastic.dashboard",
                description="A live, read-only web page of jobs, queues, endpoints and the pool.")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None,
                   help="the etcd (default: $ELASTIC_RDZV_ENDPOINT, or where an agent on this "
                        "machine runs)")
    p.add_argument("--ray-address", default=None,
                   help="a Ray cluster: show Serve's replicas and the endpoints' traffic")
    p.add_argument("--host", default="127.0.0.1", help="listen here (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: a free port")
    p.add_argument("--cacert", default=None, help="CA certificate of a TLS etcd")
    p.add_argument("--cert", default=None, help="client certificate for a TLS etcd")
    p.add_argument("--key", default=None, help="client key for a TLS etcd")
    p.add_argument("--user", default=None,
                   help="etcd user (the password is read from $ELASTIC_ETCD_PASSWORD)")
    return p


def endpoint_of(args) -> str:
    import os

    from rendezvous import registry
    if args.rdzv_endpoint:
        return args.rdzv_endpoint
    if os.environ.get(registry.ENV_ENDPOINT):
        return os.environ[registry.ENV_ENDPOINT]
    recorded = registry.recorded()
    if not recorded:
        raise _Usage("no etcd endpoint: no job of this machine is running; pass "
                     f"--rdzv-endpoint HOST:PORT or set {registry.ENV_ENDPOINT}")
    return recorded[-1].endpoint


def main(argv: Optional[List[str]] = None) -> int:
    from rendezvous.connect import EtcdSecurity, parse_endpoint

    from .server import Dashboard, serve
    from .sources import JobSource, PoolSource, RaySource
    try:
        args = build_parser().parse_args(argv)
        endpoint = endpoint_of(args)
        parse_endpoint(endpoint)
        security = EtcdSecurity.from_settings(ca_cert=args.cacert, cert=args.cert, key=args.key,
                                              user=args.user)
        if not 0 <= args.port <= 65535:
            raise _Usage(f"--port {args.port} is not a port number")
    except (_Usage, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    dashboard = Dashboard(JobSource(endpoint, security), PoolSource(endpoint, security),
                          RaySource(args.ray_address) if args.ray_address else None)
    try:
        server = serve(dashboard, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pass "
              "another --port", file=sys.stderr)
        return USAGE_ERROR
    host, port = server.server_address[:2]
    print(f"dashboard at http://{host}:{port}/ (etcd {endpoint}"
          + (f", Ray {args.ray_address}" if args.ray_address else "") + ")", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    dashboard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
