"""Helpers shared by tests and benchmarks (run from the repository root): a node's death, the
job's event log, stand-ins for what is outside the project, and checks of what a job computed.
Free ports come from `launcher.network.free_port` (or `quiet_port` below, for one that stays
unbound while others connect to it); etcd from `rendezvous.embedded.EmbeddedEtcd`.
"""
import os
import random
import signal
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List

import psutil

from launcher.events import read_events as _read_event_file

HOROVOD_INSTALL = "bash integrations/horovod/install.sh"


def quiet_port(host: str = "127.0.0.1") -> int:
    """A free port outside the kernel's ephemeral range, for a server that starts (or restarts)
    while clients already try to reach it. In the ephemeral range, a client's retries can be given
    that very port as their source port (on loopback, even a connection to itself), and the server
    then finds its port taken."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(10000, max(low, 10001)))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} below the ephemeral range ({low})")


def kill_tree(proc: subprocess.Popen) -> None:
    """A node's death: SIGKILL a process we started and every process under it, whatever their
    session (the root first, so it cannot start replacements), then reap them."""
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:  # agents run in their own session: this reaches anything forked after the snapshot
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(10)
    psutil.wait_procs(tree[1:], timeout=10)


def read_events(log_dir) -> List[dict]:
    """The job's event log in `log_dir` ([] before the first event); only a last line still
    being written is left out, any other line that is not a record fails."""
    path = Path(log_dir) / "events.jsonl"
    return _read_event_file(str(path)) if path.exists() else []


def parameter_differences(actual, expected, rtol=1e-5, atol=1e-8):
    """What differs between two {name: tensor} parameter sets: names first, then shapes, then
    values (so a short or empty file cannot pass by zipping nothing); [] when they match."""
    import torch

    if not isinstance(actual, dict) or not isinstance(expected, dict):
        return [f"parameters must be saved as {{name: tensor}}, got {type(actual).__name__} and "
                f"{type(expected).__name__}"]
    if not expected:
        return ["the expected parameters are empty"]
    if actual.keys() != expected.keys():
        return [f"parameter names differ: {sorted(actual)} != {sorted(expected)}"]
    problems = [f"{name}: shape {tuple(actual[name].shape)} != {tuple(expected[name].shape)}"
                for name in expected if actual[name].shape != expected[name].shape]
    for name in expected:
        if not problems:
            try:
                torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol)
            except AssertionError as exc:
                problems.append(f"{name} differs: {exc}")
    return problems


def require_horovod(allow_module_level: bool = False) -> None:
    """Skip when Horovod with PyTorch does not import, except under CI (CI set): there a broken
    or missing install must fail, not read as a skip."""
    import pytest

    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        why = f"Horovod with PyTorch is not importable ({exc}); install it with `{HOROVOD_INSTALL}`"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI runs the Horovod tests: {why}", pytrace=False)
        pytest.skip(why, allow_module_level=allow_module_level)


class MetadataServer:
    """Answers every GET with the current scripted (status, body) and records what it was sent."""

    def __init__(self):
        self.status, self.body = 404, b""
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append((self.path, dict(self.headers)))
                self.send_response(server.status)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval makes shutdown() quick.
        threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True).start()

    def url(self, path="/notice"):
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def answer(self, status, body=b""):
        self.status, self.body = status, body

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()
