"""Each agent's health endpoint, and how its peers judge probe results (`rendezvous.liveness`
asks the question).

A node whose agent was killed stops answering at once (connection refused on a live host), long
before its lease TTL runs out; the probe lets survivors remove it right away. A node that does
not answer in time is only suspect: it takes several misses in a row to be called dead, because a
busy or partitioned host looks the same for a moment.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple

from rendezvous.liveness import ALIVE, DEAD

MISSES_BEFORE_DEAD = 3


class HealthServer:
    """Answers GET /health with this node's id, on host:0 (a free port); GET /metrics with
    `metrics()` (Prometheus' text format and its content type) when given."""

    def __init__(self, host: str, node_id: str,
                 metrics: Optional[Callable[[], Tuple[bytes, str]]] = None):
        identity = json.dumps({"node_id": node_id}).encode()
        open_connections = self._connections = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # peers keep their probing connection open

            def setup(self):
                super().setup()
                open_connections.add(self.connection)

            def finish(self):
                open_connections.discard(self.connection)
                super().finish()

            def do_GET(self):  # noqa: N802 (http.server's naming)
                body, kind, code = identity, "application/json", 200
                if self.path.split("?")[0] == "/metrics" and metrics is not None:
                    body, kind = metrics()
                elif self.path != "/health":
                    code = 404
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health",
                                        daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        """Stop answering, kept connections included: peers then find this node gone."""
        self._server.shutdown()
        self._server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PeerWatch:
    """Counts consecutive probe misses per peer; says which peers to remove."""

    def __init__(self, misses_before_dead: int = MISSES_BEFORE_DEAD):
        self._misses_before_dead = misses_before_dead
        self._misses = {}

    def record(self, node_id: str, result: str) -> bool:
        """Record one probe result; True when the peer should be removed now."""
        if result == ALIVE:
            self._misses.pop(node_id, None)
            return False
        if result == DEAD:
            return True
        self._misses[node_id] = self._misses.get(node_id, 0) + 1
        return self._misses[node_id] >= self._misses_before_dead

    def forget(self, node_id: str) -> None:
        self._misses.pop(node_id, None)

    def retain(self, node_ids) -> None:
        """Forget the misses of every peer but these (the ones still probed)."""
        keep = set(node_ids)
        self._misses = {nid: n for nid, n in self._misses.items() if nid in keep}
