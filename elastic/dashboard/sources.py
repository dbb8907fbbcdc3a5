"""Where the dashboard reads from; it never writes.

- `JobSource`: the jobs of one etcd, through the job client (status, the event history).
- `PoolSource`: the shared pool's records in the same etcd, through the pool's client.
- `RaySource`: with --ray-address, Serve's replicas (Ray's actor table) and the replicas'
  request counts (`integrations.ray.endpoint_stats`), read by a Ray driver of its own.

Each raises `Unavailable` with one line for the page when its backend cannot be read; a client
that failed is dropped and made again at the next read, so the page recovers by itself when
etcd or Ray comes back.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

ETCD_TIMEOUT_S = 2.0
TRAFFIC_WINDOW_S = 30.0  # latency and rate over about this long
TRAFFIC_KEPT_S = 120.0


class Unavailable(Exception):
    """A backend cannot be read now; the message is shown on the page."""


class JobSource:
    def __init__(self, endpoint: str, security=None, timeout: float = ETCD_TIMEOUT_S):
        self.endpoint, self._security, self._timeout = endpoint, security, timeout
        self._client = None
        self._lock = threading.Lock()

    def _call(self, fn):
        from rendezvous.api import RendezvousConnectionError
        from rendezvous.client import JobClient, JobError
        with self._lock:
            try:
                if self._client is None:
                    self._client = JobClient(self.endpoint, timeout=self._timeout,
                                             security=self._security)
                return fn(self._client)
            except JobError:
                raise
            except (RendezvousConnectionError, ValueError) as exc:
                self._drop()
                raise Unavailable(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 (grpc's errors: etcd went away mid-read)
                self._drop()
                raise Unavailable(f"etcd at {self.endpoint}: {type(exc).__name__}: {exc}"
                                  ) from None

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None

    def statuses(self) -> list:
        """Every job's status (no probes, no events), oldest first: one read of etcd."""
        return self._call(lambda client: client.statuses(clean=False))

    def job(self, job: str) -> Tuple[object, List[dict]]:
        """(status, the job's event history) of one job; JobError for an unknown one."""
        return self._call(lambda c: (c.status(job, probe=False, recent=0), c.events(job)))

    def close(self) -> None:
        with self._lock:
            self._drop()


class PoolSource:
    """The pool's records; `read()` is None when no pool controller ever used this etcd."""

    def __init__(self, endpoint: str, security=None, timeout: float = ETCD_TIMEOUT_S):
        self.endpoint, self._security, self._timeout = endpoint, security, timeout
        self._pool = None
        self._lock = threading.Lock()
        # The pool's client imports the scheduler (numpy): at start, not in the first request.
        threading.Thread(target=_import_pool_client, name="import-pool", daemon=True).start()

    def read(self) -> Optional[dict]:
        try:
            from integrations.ray.client import PoolClient, PoolError
        except ImportError:
            return None  # the pool needs the [ray] extra's pyyaml; no pool without it
        from rendezvous.api import RendezvousConnectionError
        with self._lock:
            try:
                if self._pool is None:
                    self._pool = PoolClient(self.endpoint, timeout=self._timeout,
                                            security=self._security)
                store = self._pool.store
                if store.config_text() is None:
                    return None
                return {"workloads": self._pool.list(), "queues": self._pool.queues(),
                        "inventory": store.inventory(), "asks": store.replicas(),
                        "controller": store.controller()}
            except PoolError:
                return None
            except (RendezvousConnectionError, ValueError) as exc:
                self._drop()
                raise Unavailable(str(exc)) from None
            except Exception as exc:  # noqa: BLE001
                self._drop()
                raise Unavailable(f"the pool's etcd at {self.endpoint}: {exc}") from None

    def _drop(self) -> None:
        if self._pool is not None:
            try:
                self._pool.close()
            except Exception:  # noqa: BLE001
                pass
            self._pool = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _import_pool_client() -> None:
    import importlib
    try:
        importlib.import_module("integrations.ray.client")
    except ImportError:
        pass


class Traffic:
    """Each endpoint's requests over the last TRAFFIC_WINDOW_S, from successive readings of its
    replicas' cumulative counts (a replica that appears counts from zero)."""

    def __init__(self) -> None:
        self._readings: Dict[str, Deque[Tuple[float, dict]]] = {}

    def update(self, now: float, stats: Dict[str, list]) -> Dict[str, dict]:
        from integrations.ray import endpoint_stats as es
        out = {}
        for name, snaps in stats.items():
            by_replica = {s.replica: s for s in snaps}
            readings = self._readings.setdefault(name, deque())
            readings.append((now, by_replica))
            while readings and now - readings[0][0] > TRAFFIC_KEPT_S:
                readings.popleft()
            old_time, old = readings[0]
            for t, r in readings:  # the newest reading at least a window old
                if now - t >= TRAFFIC_WINDOW_S:
                    old_time, old = t, r
            live = {rid: s for rid, s in by_replica.items() if now - s.time <= es.STALE_S}
            total = es.merge(list(by_replica.values()))
            if old is by_replica:  # the first reading: everything since the replicas started
                recent, span = total, max(0.0, now - total.started) if total.started else 0.0
            else:
                recent, span = es.window(by_replica, old), now - old_time
            p50, p95 = es.quantile(recent, 0.5), es.quantile(recent, 0.95)
            out[name] = {"replicas_reporting": len(live), "requests_total": total.requests,
                         "errors_total": total.errors, "window_s": round(span, 1),
                         "requests": recent.requests,
                         "rate_per_s": round(recent.requests / span, 2) if span > 0 else None,
                         "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                         "p95_ms": round(p95 * 1000, 1) if p95 is not None else None}
        for name in [n for n in self._readings if n not in stats]:
            del self._readings[name]
        return out


class RaySource:
    """Serve's replicas and their traffic, read by a Ray driver connected in the background
    (connecting takes seconds; until then, and when it fails, `read()` says why)."""

    def __init__(self, address: str, clock=time.time):
        self.address, self._clock = address, clock
        self._error: Optional[str] = f"connecting to Ray at {address}"
        self._connected = False
        self._traffic = Traffic()
        self._lock = threading.Lock()
        threading.Thread(target=self._connect, name="ray-connect", daemon=True).start()

    def _connect(self) -> None:
        try:
            import ray
            from integrations.ray.endpoint_stats import NAMESPACE
            if not ray.is_initialized():
                ray.init(address=self.address, namespace=NAMESPACE, logging_level="ERROR",
                         log_to_driver=False)
            self._connected, self._error = True, None
        except ImportError:
            self._error = "reading Ray needs the [ray] extra: pip install 'elastic-run[ray]'"
        except Exception as exc:  # noqa: BLE001 (any failure of ray.init: shown on the page)
            self._error = f"Ray at {self.address}: {str(exc).splitlines()[0] if str(exc) else exc}"

    def read(self) -> Tuple[Dict[str, Dict[str, int]], Dict[str, dict]]:
        """({endpoint: {"running": n, "starting": m}}, {endpoint: traffic})."""
        if not self._connected:
            raise Unavailable(self._error or "not connected to Ray")
        from ray._private import state as ray_state  # the GCS actor table (Ray < 3)

        from integrations.ray import endpoint_stats
        with self._lock:
            try:
                replicas: Dict[str, Dict[str, int]] = {}
                for state, label in (("ALIVE", "running"), ("PENDING_CREATION", "starting")):
                    for actor in ray_state.actors(actor_state_name=state).values():
                        parts = str(actor.get("ActorClassName", "")).split(":")
                        if len(parts) == 3 and parts[0] == "ServeReplica" and parts[1] == parts[2]:
                            counts = replicas.setdefault(parts[1], {"running": 0, "starting": 0})
                            counts[label] += 1
                traffic = self._traffic.update(self._clock(), endpoint_stats.read())
            except Exception as exc:  # noqa: BLE001 (the cluster went away)
                raise Unavailable(f"Ray at {self.address}: {exc}") from None
        return replicas, traffic
