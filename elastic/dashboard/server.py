"""The dashboard's HTTP server: the page, its script, and a read-only JSON API.

    GET /                 the page          GET /app.js       its script
    GET /api/jobs         every job (state, world size, round, cause, nodes, size)
    GET /api/jobs/<job>   one job: members, world-size timeline with causes, recent events
    GET /api/pool         queues with pending reasons, allocation, endpoints (null: no pool)

A backend that cannot be read answers 503 with {"error": "..."} (one line, shown on the page);
an unknown job 404. Only GET: the dashboard changes nothing.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple
from urllib.parse import unquote

from . import views
from .page import APP_JS, INDEX
from .sources import JobSource, PoolSource, RaySource, Unavailable

Response = Tuple[int, dict]


class Dashboard:
    """The API's answers, from the sources it was given (pool and Ray are optional)."""

    def __init__(self, jobs: JobSource, pool: Optional[PoolSource] = None,
                 ray: Optional[RaySource] = None, clock: Callable[[], float] = time.time):
        self.jobs, self.pool, self.ray, self._clock = jobs, pool, ray, clock

    def api_jobs(self) -> Response:
        now = self._clock()
        try:
            rows = [views.job_row(s) for s in self.jobs.statuses()]
        except Unavailable as exc:
            return 503, {"endpoint": self.jobs.endpoint, "time": now, "jobs": [],
                         "error": str(exc)}
        return 200, {"endpoint": self.jobs.endpoint, "time": now, "jobs": rows, "error": None}

    def api_job(self, job: str) -> Response:
        from rendezvous.client import JobError
        now = self._clock()
        try:
            status, events = self.jobs.job(job)
        except Unavailable as exc:
            return 503, {"error": str(exc), "time": now}
        except JobError as exc:
            return 404, {"error": str(exc), "time": now}
        return 200, {**views.job_detail(status, events), "time": now, "error": None}

    def api_pool(self) -> Response:
        now = self._clock()
        out = {"time": now, "pool": None, "error": None, "ray_error": None}
        replicas = traffic = None
        if self.ray is not None:
            try:
                replicas, traffic = self.ray.read()
            except Unavailable as exc:
                out["ray_error"] = str(exc)
        if self.pool is not None:
            try:
                found = self.pool.read()
            except Unavailable as exc:
                out["error"] = str(exc)
                return 503, out
        else:
            found = None
        if found is not None:
            out["pool"] = views.pool_view(found["workloads"], found["queues"],
                                          found["inventory"], found["asks"],
                                          found["controller"], now, replicas, traffic)
        elif replicas is not None:  # Serve without a pool: its endpoints only
            out["pool"] = {"controller": None, "nodes": 0, "allocation": {}, "queues": [],
                           "workloads": [],
                           "endpoints": views.endpoint_rows([], {}, replicas, traffic)}
        return 200, out

    def route(self, path: str) -> Tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        path = path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", INDEX.encode()
        if path == "/app.js":
            return 200, "text/javascript; charset=utf-8", APP_JS.encode()
        if path == "/api/jobs":
            code, data = self.api_jobs()
        elif path.startswith("/api/jobs/") and len(path) > len("/api/jobs/"):
            code, data = self.api_job(unquote(path[len("/api/jobs/"):]))
        elif path == "/api/pool":
            code, data = self.api_pool()
        else:
            code, data = 404, {"error": f"no such page: {path}"}
        return code, "application/json", json.dumps(data, default=str).encode()

    def close(self) -> None:
        self.jobs.close()
        if self.pool is not None:
            self.pool.close()


def serve(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve the dashboard on host:port (0: a free port) from a thread; `.shutdown()` ends it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            code, kind, body = dashboard.route(self.path)
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _read_only(self):
            body = b'{"error": "the dashboard only reads"}'
            self.send_response(405)
            self.send_header("Allow", "GET")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    return server
