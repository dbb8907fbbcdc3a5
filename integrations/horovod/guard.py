"""Under the torch backend, catch a Horovod script: its `hvd.init()` would otherwise run every
worker as a world of its own, silently.

The agent points Horovod's gloo rendezvous (HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT) of its workers at
this endpoint on 127.0.0.1, which refuses every request: Horovod retries 3 times, 0.5 s apart,
and aborts, and the failure report says what to do. Scripts that never start Horovod never call
it. Imports nothing from Horovod.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional

log = logging.getLogger(__name__)

HINT = "this looks like a Horovod script (it called hvd.init()); run it with --backend horovod"


class HorovodGuard:
    def __init__(self):
        self._tripped = threading.Event()
        guard = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self):
                if not guard._tripped.is_set():
                    guard._tripped.set()
                    log.error("a worker started Horovod's gloo rendezvous: %s", HINT)
                body = HINT.encode()
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = _refuse  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="horovod-guard",
                         daemon=True).start()

    @property
    def env(self) -> Dict[str, str]:
        return {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
                "HOROVOD_GLOO_RENDEZVOUS_PORT": str(self._server.server_address[1])}

    def hint(self) -> Optional[str]:
        """What to tell the user about a worker failure, if a worker started Horovod."""
        return HINT if self._tripped.is_set() else None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
