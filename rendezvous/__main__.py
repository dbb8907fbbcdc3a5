"""`python -m rendezvous`: a standalone etcd rendezvous service that agents on many nodes share.

Exit codes: 0 after SIGINT/SIGTERM, 1 when etcd cannot start or dies, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional, Tuple

from rendezvous.api import RendezvousError
from rendezvous.connect import format_endpoint, parse_endpoint
from rendezvous.embedded import EmbeddedEtcd

DEFAULT_LISTEN = "127.0.0.1:2379"
# How often the service checks that its etcd is still alive while it waits for a signal.
LIVENESS_INTERVAL = 1.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, no usage block: the caller sees exactly what to fix.
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def _listen_address(text: str) -> Tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m rendezvous",
        description="Run an etcd server that elastic agents on several nodes use to rendezvous.",
    )
    parser.add_argument(
        "--listen", metavar="HOST:PORT", type=_listen_address, default=DEFAULT_LISTEN,
        help=f"address etcd serves clients on (default {DEFAULT_LISTEN}); use an address the "
             "other nodes can reach, or 0.0.0.0:PORT for all interfaces",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", default=None,
        help="directory for etcd's data, kept at exit so a restart on it loses nothing "
             "(default: a temporary directory removed at exit)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    host, port = args.listen
    stop_requested = threading.Event()

    def request_stop(signum, frame) -> None:
        stop_requested.set()

    # Installed before etcd starts so a signal during start-up still ends in an orderly stop.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    etcd = EmbeddedEtcd(host=host, port=port, data_dir=args.data_dir)
    try:
        try:
            endpoint = etcd.start()
        except RendezvousError as exc:
            _fail(str(exc))
            return 1
        print(f"rendezvous endpoint: etcd://{endpoint}  (pass --rdzv-endpoint {endpoint} to every agent)",
              flush=True)
        while not stop_requested.wait(LIVENESS_INTERVAL):
            if not etcd.running:
                _fail(f"etcd on {format_endpoint(host, port)} (pid {etcd.pid}) exited unexpectedly; "
                      f"last lines of its log:\n{etcd.log_excerpt()}")
                return 1
        return 0
    finally:
        etcd.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
