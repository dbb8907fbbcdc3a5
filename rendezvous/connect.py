"""Reaching an etcd server: parsing the endpoint a user typed and opening a checked client.

This is the one place where the etcd client library's connection errors become
`RendezvousConnectionError`s that say what to do.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import grpc
import pyetcd
import pyetcd.exceptions

from rendezvous.api import RendezvousConnectionError

DEFAULT_PORT = 2379
_SCHEMES = ("etcd://", "http://")
# Pause between attempts while the server is refusing connections (for example still starting).
CONNECT_RETRY_INTERVAL = 0.1
# Keep grpc's own reconnect backoff short so a client recovers soon after etcd comes back,
# instead of sitting out a backoff that grows up to two minutes.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

_clock = time.monotonic


def parse_endpoint(text) -> Tuple[str, int]:
    """Split "host:port", "etcd://host:port" or "http://host:port" into (host, port).

    The port defaults to 2379; an IPv6 host is written in brackets ("[::1]:2379").

    Raises:
        ValueError: the text is not an endpoint of that form.
    """
    if not isinstance(text, str):
        raise ValueError(f"etcd endpoint must be a string like 127.0.0.1:2379, got {text!r}")
    rest = text.strip()
    for scheme in _SCHEMES:
        if rest.lower().startswith(scheme):
            rest = rest[len(scheme):]
            break
    else:
        if "://" in rest:
            raise ValueError(
                f"etcd endpoint {text!r} has an unsupported scheme; write HOST:PORT, "
                "etcd://HOST:PORT or http://HOST:PORT"
            )
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not host or (tail and not tail.startswith(":")):
            raise ValueError(f"etcd endpoint {text!r} is not of the form [IPV6]:PORT")
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        raise ValueError(f"etcd endpoint {text!r}: write an IPv6 host in brackets, like [::1]:2379")
    else:
        host, sep, port_text = rest.partition(":")
        if not sep:
            port_text = None
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"etcd endpoint {text!r} has no valid host; write HOST:PORT, like 127.0.0.1:2379")
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"etcd endpoint {text!r} has an invalid port {port_text!r}; use 1-65535")
    return host, int(port_text)


def format_endpoint(host: str, port: int) -> str:
    """The "host:port" form of an endpoint, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(endpoint: str, timeout: float = 5.0):
    """A pyetcd client for `endpoint` whose status() has answered and named a leader.

    Attempts are repeated until `timeout` seconds have passed, so an etcd that is still
    starting is waited for; the returned client uses `timeout` as its per-call RPC timeout.

    Raises:
        ValueError: the endpoint text is malformed, or timeout is not positive.
        RendezvousConnectionError: no etcd with a leader answered at the endpoint in time.
    """
    if timeout <= 0:
        raise ValueError(f"connect timeout must be positive, got {timeout}")
    host, port = parse_endpoint(endpoint)
    deadline = _clock() + timeout
    while True:
        remaining = deadline - _clock()
        client = pyetcd.client(host=host, port=port, timeout=timeout, grpc_options=_GRPC_OPTIONS)
        try:
            reason, cause = _check(client, max(0.05, min(timeout, remaining)), timeout)
        except BaseException:
            client.close()
            raise
        if reason is None:
            _never_shelve(client)
            return client
        client.close()
        if _clock() + CONNECT_RETRY_INTERVAL >= deadline:
            raise RendezvousConnectionError(
                f"etcd at {format_endpoint(host, port)} is unreachable ({reason}); start one with "
                "`python -m rendezvous` or leave out --rdzv-endpoint to use the embedded one"
            ) from cause
        time.sleep(CONNECT_RETRY_INTERVAL)


def wait_for_etcd(endpoint: str, timeout: float) -> None:
    """Return once an etcd with a leader answers at `endpoint`.

    Raises:
        RendezvousConnectionError: none did within `timeout` seconds.
    """
    connect(endpoint, timeout=timeout).close()


def _check(client, rpc_timeout: float, patience: float) -> Tuple[Optional[str], Optional[BaseException]]:
    """One status() call bounded by rpc_timeout: (None, None) if usable, else (reason, error)."""
    call_timeout, client.timeout = client.timeout, rpc_timeout
    try:
        status = client.status()
    except (pyetcd.exceptions.Etcd3Exception, grpc.RpcError, ValueError) as exc:
        return _describe(exc, patience), exc
    finally:
        client.timeout = call_timeout
    if status.leader is None:
        return "etcd answered but has no leader", None
    return None, None


def _describe(exc: BaseException, patience: float) -> str:
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if not isinstance(rpc, grpc.RpcError) or not hasattr(rpc, "code"):
        return str(exc) or type(exc).__name__
    code, details = rpc.code(), rpc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "timed out" in details:
        return f"no answer within {patience:g}s; is it etcd?"
    if "Connection refused" in details:
        return "connection refused"
    if "HTTP/2" in details or code == grpc.StatusCode.UNIMPLEMENTED:
        return "what answered is not etcd"
    if "DNS resolution failed" in details or "errors resolving" in details:
        return "cannot resolve the host name"
    return f"{code.name}: {details.splitlines()[0][:120] if details else 'no details'}"


def _never_shelve(client) -> None:
    # pyetcd marks an endpoint as failed for 300 s after one UNAVAILABLE or DEADLINE_EXCEEDED
    # and then refuses every call with ValueError("Trying to use a failed node"), even though
    # the grpc channel reconnects by itself. With a single endpoint that would turn one etcd
    # hiccup into five minutes of errors, so retries are left to the caller and to grpc.
    for ep in getattr(client, "endpoints", {}).values():
        ep.time_retry = 0.0
