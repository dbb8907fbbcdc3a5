"""Reaching an etcd server: parsing the endpoint a user typed and opening a checked client.

This is the one place where the etcd client library's connection errors become
`RendezvousConnectionError`s that say what to do.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import grpc
import pyetcd
import pyetcd.exceptions

from rendezvous.api import RendezvousConnectionError

ENV_PASSWORD = "ELASTIC_ETCD_PASSWORD"


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd: TLS (ca_cert to check the server; cert and key when etcd
    asks clients for certificates) and etcd's own users (user and password).

    Raises:
        ValueError: an incomplete or unreadable setting; the message names it.
    """

    ca_cert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert= and key=")
        if self.cert is not None and self.ca_cert is None:
            raise ValueError("a client certificate needs the CA that signed the server's: cacert=")
        for name in ("ca_cert", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name.replace('_', '')}={path}: no readable file there")
        if self.user is not None and self.ca_cert is None:
            raise ValueError("etcd users need TLS (their tokens must not travel in the clear): "
                             "pass cacert= too")
        if (self.user is None) != (self.password is None):
            raise ValueError(f"etcd user {self.user!r} needs a password: set ${ENV_PASSWORD}"
                             if self.user else "a password needs a user: user=NAME")

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    @classmethod
    def from_settings(cls, ca_cert=None, cert=None, key=None, user=None,
                      password=None) -> Optional["EtcdSecurity"]:
        """The security these settings ask for, or None for none; the password defaults to
        $ELASTIC_ETCD_PASSWORD when a user is given."""
        if user is not None and password is None:
            password = os.environ.get(ENV_PASSWORD)
        if all(v is None for v in (ca_cert, cert, key, user, password)):
            return None
        return cls(ca_cert, cert, key, user, password)

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


def connect(endpoint: str, timeout: float = 5.0, security: Optional[EtcdSecurity] = None):
    """A pyetcd client for `endpoint` whose status() has answered and named a leader.

    Attempts are repeated until `timeout` seconds have passed, so an etcd that is still
    starting is waited for; the returned client uses `timeout` as its per-call RPC timeout.
    Refused credentials are not retried.

    Raises:
        ValueError: the endpoint text is malformed, or timeout is not positive.
        RendezvousConnectionError: no etcd with a leader answered at the endpoint in time, or
            it refused the credentials (the message says which).
    """
    if timeout <= 0:
        raise ValueError(f"connect timeout must be positive, got {timeout}")
    host, port = parse_endpoint(endpoint)
    where = format_endpoint(host, port)
    sec = security or EtcdSecurity()
    deadline = _clock() + timeout
    while True:
        remaining = deadline - _clock()
        try:
            client = pyetcd.client(host=host, port=port, timeout=timeout,
                                   grpc_options=_GRPC_OPTIONS, ca_cert=sec.ca_cert,
                                   cert_key=sec.key, cert_cert=sec.cert, user=sec.user,
                                   password=sec.password)
        except (pyetcd.exceptions.Etcd3Exception, grpc.RpcError) as exc:
            client, reason, cause = None, _describe(exc, timeout), exc
        else:
            try:
                reason, cause = _check(client, max(0.05, min(timeout, remaining)), timeout)
            except BaseException:
                client.close()
                raise
        if reason is None:
            _never_shelve(client)
            return client
        if client is not None:
            client.close()
        if reason in (AUTH_REFUSED, NO_CREDENTIALS):
            raise RendezvousConnectionError(f"etcd at {where} {reason}") from cause
        if _clock() + CONNECT_RETRY_INTERVAL >= deadline:
            raise RendezvousConnectionError(
                f"etcd at {where} is unreachable ({reason}); start one with "
                "`python -m rendezvous` or leave out --rdzv-endpoint to use the embedded one"
            ) from cause
        time.sleep(CONNECT_RETRY_INTERVAL)


def renew_token(client, security: Optional[EtcdSecurity]) -> bool:
    """Log in again with the client's user (etcd's tokens expire); False without a user."""
    if security is None or security.user is None:
        return False
    from pyetcd import etcdrpc

    response = client.authstub.Authenticate(
        etcdrpc.AuthenticateRequest(name=security.user, password=security.password),
        client.timeout)
    client.metadata = (("token", response.token),)
    return True


def is_auth_error(exc: BaseException) -> bool:
    """An error that says the client's token is missing, invalid or expired."""
    text = str(exc).lower()
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    code = rpc.code() if isinstance(rpc, grpc.RpcError) and hasattr(rpc, "code") else None
    return code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in text \
        or "user name is empty" in text


def wait_for_etcd(endpoint: str, timeout: float, security: Optional[EtcdSecurity] = None) -> None:
    """Return once an etcd with a leader answers at `endpoint`.

    Raises:
        RendezvousConnectionError: none did within `timeout` seconds.
    """
    connect(endpoint, timeout=timeout, security=security).close()


def _check(client, rpc_timeout: float, patience: float) -> Tuple[Optional[str], Optional[BaseException]]:
    """One status() call bounded by rpc_timeout: (None, None) if usable, else (reason, error)."""
    call_timeout, client.timeout = client.timeout, rpc_timeout
    try:
        status = client.status()
        if status.leader is not None:
            # status() needs no credentials; a read does, so a refusal is said here, at once.
            client.get(PROBE_KEY)
    except (pyetcd.exceptions.Etcd3Exception, grpc.RpcError, ValueError) as exc:
        return _describe(exc, patience), exc
    finally:
        client.timeout = call_timeout
    if status.leader is None:
        return "etcd answered but has no leader", None
    return None, None


PROBE_KEY = "/elastic/"


AUTH_REFUSED = ("refused the user name or password (check user= and $ELASTIC_ETCD_PASSWORD, "
                "or the user's roles)")
NO_CREDENTIALS = ("requires a user name and password: pass user= (in --rdzv-conf, or --user) "
                  "and set $ELASTIC_ETCD_PASSWORD")


def describe(exc: BaseException, patience: float = 0.0) -> str:
    """One line on why an etcd call failed, from the client library's error."""
    return _describe(exc, patience)


def _describe(exc: BaseException, patience: float) -> str:
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if not isinstance(rpc, grpc.RpcError) or not hasattr(rpc, "code"):
        return str(exc) or type(exc).__name__
    code, details = rpc.code(), rpc.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "permission denied: the etcd user's roles do not allow this"
    if "authentication failed" in details or "invalid auth" in details:
        return AUTH_REFUSED
    if "user name is empty" in details or code == grpc.StatusCode.UNAUTHENTICATED:
        return NO_CREDENTIALS
    if "ssl" in details.lower() or "handshake" in details.lower() or "certificate" in details.lower():
        return f"TLS failed: {details.splitlines()[0][:160]} (check cacert=, cert=, key=)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "timed out" in details:
        return f"no answer within {patience:g}s; is it etcd?"
    if "Connection refused" in details:
        return "connection refused"
    if "Socket closed" in details or "WRONG_VERSION_NUMBER" in details:
        return ("it closed the connection: if it serves TLS, pass cacert= (in --rdzv-conf, or "
                "--cacert)")
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
