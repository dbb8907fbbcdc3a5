"""`python -m rendezvous`: a standalone etcd rendezvous service that agents on many nodes share.

Exit codes: 0 after SIGINT/SIGTERM, 1 when etcd cannot start or dies, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional, Tuple

from rendezvous.api import RendezvousError
from rendezvous.connect import ENV_PASSWORD, format_endpoint, parse_endpoint
from rendezvous.embedded import EmbeddedEtcd, ServerTls, enable_auth

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
    parser.add_argument("--tls-cert", metavar="FILE", default=None,
                        help="serve clients over TLS with this certificate (and --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", default=None, help="the certificate's key")
    parser.add_argument("--tls-ca", metavar="FILE", default=None,
                        help="with --client-cert-auth: the CA that signed the clients' "
                             "certificates")
    parser.add_argument("--client-cert-auth", action="store_true",
                        help="accept only clients with a certificate signed by --tls-ca (give "
                             "this service one too: --tls-client-cert, --tls-client-key)")
    parser.add_argument("--tls-client-cert", metavar="FILE", default=None,
                        help="with --client-cert-auth: the certificate this service itself uses "
                             "to check that etcd is up")
    parser.add_argument("--tls-client-key", metavar="FILE", default=None,
                        help="the key of --tls-client-cert")
    parser.add_argument("--auth", action="store_true",
                        help="turn on etcd's users: a `root` user whose password is read from "
                             f"${ENV_PASSWORD} (agents pass user=root in --rdzv-conf; see the "
                             "README for read-only and control roles)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    host, port = args.listen
    try:
        tls = _tls(args)
    except ValueError as exc:
        _fail(str(exc))
        return 2
    password = os.environ.get(ENV_PASSWORD)
    if args.auth and not password:
        _fail(f"--auth needs the root user's password in ${ENV_PASSWORD}")
        return 2
    if args.auth and tls is None:
        _fail("--auth needs TLS (--tls-cert and --tls-key): etcd's tokens must not travel in "
              "the clear")
        return 2
    stop_requested = threading.Event()

    def request_stop(signum, frame) -> None:
        stop_requested.set()

    # Installed before etcd starts so a signal during start-up still ends in an orderly stop.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    etcd = EmbeddedEtcd(host=host, port=port, data_dir=args.data_dir, tls=tls)
    try:
        try:
            endpoint = etcd.start()
            if args.auth:
                enable_auth(endpoint, password, etcd.client_security())
        except RendezvousError as exc:
            _fail(str(exc))
            return 1
        conf = []
        if tls:
            conf.append("cacert=<the CA of this certificate>")
            if tls.client_cert_auth:
                conf.append("cert=<client cert>,key=<client key>")
        if args.auth:
            conf.append(f"user=root (password in ${ENV_PASSWORD})")
        extra = f" --rdzv-conf {','.join(conf)}" if conf else ""
        print(f"rendezvous endpoint: etcd{'s' if tls else ''}://{endpoint}  (pass --rdzv-endpoint "
              f"{endpoint}{extra} to every agent)", flush=True)
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


def _tls(args) -> Optional[ServerTls]:
    if args.tls_cert is None and args.tls_key is None:
        if args.client_cert_auth or args.tls_ca:
            raise ValueError("--client-cert-auth and --tls-ca need --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.client_cert_auth and (args.tls_client_cert is None or args.tls_client_key is None):
        raise ValueError("--client-cert-auth needs --tls-client-cert and --tls-client-key for "
                         "this service's own check that etcd is up")
    return ServerTls(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca,
                     client_cert_auth=args.client_cert_auth,
                     client_cert_file=args.tls_client_cert, client_key_file=args.tls_client_key)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
