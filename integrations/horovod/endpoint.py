"""The HTTP endpoint of one worker slot, speaking the protocol of Horovod's rendezvous server.

Horovod's C++ `HTTPStore` and its elastic worker code talk to HOROVOD_GLOO_RENDEZVOUS_ADDR:PORT:

    PUT    /<scope>/<key>                 gloo rendezvous: store bytes
    GET    /<scope>/<key>                 200 and the bytes, or 404 (the worker polls every 10 ms)
    DELETE /<scope>/<rank>                the rank is done with the scope (after gloo's barrier)
    GET    /rank_and_size/<host>:<lrank>  an elastic worker's slot after a reset: "r,s,lr,ls,cr,cs"
    PUT    /worker_addresses/<host>:<lrank>   the worker's notification service (elastic)
and ours:
    GET    /elastic_plan/<host>:<lrank>   the batch plan (ELASTIC_* as JSON) of the worker's round
    GET    /elastic_start/<lrank>         a worker in standby: its world's variables, once it has
                                          one (JSON; 404: not needed any more; see prewarm.py)

Each slot (local rank) of an agent gets its own port, so a request says which worker sent it:
a worker's rendezvous keys go to the round *it* was given, even while its agent has moved on.
The decisions live in the `SlotBackend` (integrations.horovod.agent); this module only maps
requests to its methods. Any status other than 200/404 makes the worker retry 3 times and then
abort, so a backend that cannot answer (etcd down) waits a while before giving up.
"""
from __future__ import annotations

import abc
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from .prewarm import START_SCOPE
from .slots import PLAN_SCOPE

log = logging.getLogger(__name__)

RANK_AND_SIZE = "rank_and_size"
WORKER_ADDRESSES = "worker_addresses"


class BackendUnavailable(Exception):
    """The backend cannot answer now (for example etcd is unreachable); the worker may retry."""


class SlotBackend(abc.ABC):
    """What one agent's slot endpoints ask. Every method may block; each request has a thread."""

    @abc.abstractmethod
    def kv_get(self, local_rank: int, scope: str, key: str) -> Optional[bytes]:
        """A gloo rendezvous key of the worker's round, or None when it is not there (yet)."""

    @abc.abstractmethod
    def kv_put(self, local_rank: int, scope: str, key: str, value: bytes) -> None:
        """Store a gloo rendezvous key in the worker's round."""

    @abc.abstractmethod
    def kv_finalize(self, local_rank: int, scope: str, rank: str) -> None:
        """Rank `rank` has connected to every peer of `scope` and passed its barrier."""

    @abc.abstractmethod
    def rank_and_size(self, local_rank: int, worker_id: str) -> str:
        """The worker's slot in the next world (blocks until there is one), or slots.REMOVED."""

    @abc.abstractmethod
    def register(self, local_rank: int, worker_id: str, payload: bytes) -> None:
        """The worker's notification service: base64(cloudpickle((addresses, secret key)))."""

    @abc.abstractmethod
    def plan(self, local_rank: int) -> Optional[bytes]:
        """JSON of the batch plan's ELASTIC_* variables for the worker's round; None without one."""

    @abc.abstractmethod
    def first_world(self, local_rank: int) -> Optional[bytes]:
        """A worker in standby: JSON of its world's variables once a round names its node
        (blocks until then), or None when it is not needed any more."""


class SlotEndpoint:
    """An HTTP server on 127.0.0.1 (a free port, for the agent's lifetime) for one local rank."""

    def __init__(self, local_rank: int, backend: SlotBackend):
        self.local_rank = local_rank
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(local_rank, backend))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"hvd-endpoint-{local_rank}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(local_rank: int, backend: SlotBackend):
    class Handler(BaseHTTPRequestHandler):
        def _parts(self):
            scope, sep, key = self.path.lstrip("/").partition("/")
            if not sep or not scope or not key:
                self._reply(400, b"expected /<scope>/<key>")
                return None
            return scope, key

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, method: str) -> None:
            parts = self._parts()
            if parts is None:
                return
            try:
                code, body = self._answer(method, *parts)
            except BackendUnavailable as exc:
                code, body = 503, str(exc).encode()
            except Exception:  # a bug here must not kill the server, and the worker retries
                log.exception("horovod rendezvous: %s %s failed", method, self.path)
                code, body = 500, b""
            try:
                self._reply(code, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker is gone

        def _answer(self, method: str, scope: str, key: str):
            if method == "GET":
                if scope == RANK_AND_SIZE:
                    return 200, backend.rank_and_size(local_rank, key).encode()
                if scope == PLAN_SCOPE:
                    value = backend.plan(local_rank)
                elif scope == START_SCOPE:
                    value = backend.first_world(local_rank)
                else:
                    value = backend.kv_get(local_rank, scope, key)
                return (404, b"") if value is None else (200, value)
            if method == "PUT":
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if scope == WORKER_ADDRESSES:
                    backend.register(local_rank, key, body)
                else:
                    backend.kv_put(local_rank, scope, key, body)
                return 200, b""
            backend.kv_finalize(local_rank, scope, key)
            return 200, b""

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_PUT(self):  # noqa: N802
            self._serve("PUT")

        def do_DELETE(self):  # noqa: N802
            self._serve("DELETE")

        def log_message(self, *args):
            pass

    return Handler
