"""What an endpoint's replicas measure (requests, errors, latency), kept where the pool's
controller and the dashboard can read it: Ray's internal key-value store, namespace `serving`,
key `stats/<endpoint>/<replica>`, one small JSON per replica, rewritten at most once a second
(every HEARTBEAT_S when nothing changed, so a key that stops changing belongs to a replica that
is gone). Counts are cumulative per replica, as Prometheus counters are.

`serving.endpoint.Replica` records into a `Recorder` and publishes it; the rest is pure
(`merge`, `quantile`, `window`) or a read (`read`). Ray is imported only inside functions.
"""
from __future__ import annotations

import json
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

NAMESPACE = "serving"
PREFIX = "stats/"
# Request latency: a fast model answers in milliseconds, a large one in tens of seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PUBLISH_S = 1.0
HEARTBEAT_S = 10.0
STALE_S = 3 * HEARTBEAT_S  # not rewritten for this long: its replica is gone (its key stays
# until the endpoint is deleted: a few hundred bytes per replica ever started)


@dataclass(frozen=True)
class Snapshot:
    """One replica's counts: `buckets[i]` requests took at most BUCKETS[i] seconds (not
    cumulative over buckets; the last entry counts those above the largest bucket)."""

    endpoint: str
    replica: str
    time: float
    started: float
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: Tuple[int, ...] = field(default_factory=lambda: (0,) * (len(BUCKETS) + 1))

    def to_json(self) -> str:
        return json.dumps({"endpoint": self.endpoint, "replica": self.replica, "time": self.time,
                           "started": self.started, "requests": self.requests,
                           "errors": self.errors, "seconds": self.seconds,
                           "buckets": list(self.buckets)})

    @classmethod
    def from_json(cls, text) -> "Snapshot":
        raw = json.loads(text)
        raw["buckets"] = tuple(raw.get("buckets", ()))
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def key(endpoint: str, replica: str = "") -> str:
    return f"{PREFIX}{endpoint}/{replica}"


class Recorder:
    """Counts one replica's requests (thread-safe: the model runs on a thread pool)."""

    def __init__(self, endpoint: str, replica: str, clock=time.time):
        self.endpoint, self.replica, self._clock = endpoint, replica, clock
        self._lock = threading.Lock()
        self._started = clock()
        self._requests = self._errors = 0
        self._seconds = 0.0
        self._buckets = [0] * (len(BUCKETS) + 1)

    def observe(self, seconds: float, ok: bool = True) -> None:
        with self._lock:
            self._requests += 1
            self._errors += 0 if ok else 1
            self._seconds += seconds
            self._buckets[bisect_left(BUCKETS, seconds)] += 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self.endpoint, self.replica, self._clock(), self._started,
                            self._requests, self._errors, round(self._seconds, 6),
                            tuple(self._buckets))


class Publisher:
    """A replica's thread that writes its Recorder's counts to Ray's key-value store."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="endpoint-stats", daemon=True).start()

    def _run(self) -> None:
        from ray.experimental import internal_kv
        last: Optional[Tuple[int, int]] = None
        written = 0.0
        while not self._stop.wait(PUBLISH_S):
            snap = self.recorder.snapshot()
            if (snap.requests, snap.errors) == last and snap.time - written < HEARTBEAT_S:
                continue
            try:
                internal_kv._internal_kv_put(key(snap.endpoint, snap.replica), snap.to_json(),
                                             namespace=NAMESPACE)
                last, written = (snap.requests, snap.errors), snap.time
            except Exception:  # noqa: BLE001 (the GCS busy or gone: try again next time)
                continue

    def stop(self) -> None:
        self._stop.set()


def read(endpoint: Optional[str] = None) -> Dict[str, List[Snapshot]]:
    """Every replica's last counts, by endpoint (a connected Ray driver or worker)."""
    from ray.experimental import internal_kv
    out: Dict[str, List[Snapshot]] = {}
    for raw_key in internal_kv._internal_kv_list(key(endpoint) if endpoint else PREFIX,
                                                 namespace=NAMESPACE):
        value = internal_kv._internal_kv_get(raw_key, namespace=NAMESPACE)
        if value is None:
            continue
        try:
            snap = Snapshot.from_json(value)
        except (ValueError, TypeError):
            continue
        out.setdefault(snap.endpoint, []).append(snap)
    return out


def forget(endpoint: str, replica: Optional[str] = None) -> None:
    """Delete an endpoint's counts (`serving delete`), or one gone replica's."""
    from ray.experimental import internal_kv
    if replica is not None:
        internal_kv._internal_kv_del(key(endpoint, replica), namespace=NAMESPACE)
        return
    for raw_key in internal_kv._internal_kv_list(key(endpoint), namespace=NAMESPACE):
        internal_kv._internal_kv_del(raw_key, namespace=NAMESPACE)


def live(snaps: List[Snapshot], now: float) -> List[Snapshot]:
    return [s for s in snaps if now - s.time <= STALE_S]


def merge(snaps: List[Snapshot]) -> Snapshot:
    """The sum of several replicas' counts (as one endpoint-wide snapshot)."""
    if not snaps:
        return Snapshot("", "", 0.0, 0.0)
    buckets = [sum(b) for b in zip(*(s.buckets for s in snaps))]
    return Snapshot(snaps[0].endpoint, "*", max(s.time for s in snaps),
                    min(s.started for s in snaps), sum(s.requests for s in snaps),
                    sum(s.errors for s in snaps), sum(s.seconds for s in snaps), tuple(buckets))


def window(new: Dict[str, Snapshot], old: Dict[str, Snapshot]) -> Snapshot:
    """What the replicas counted between two readings (replica id -> snapshot each): a replica
    new since `old` counts from zero."""
    diffs = []
    for rid, s in new.items():
        o = old.get(rid)
        if o is None or o.requests > s.requests:
            diffs.append(s)
            continue
        diffs.append(Snapshot(s.endpoint, rid, s.time, s.started, s.requests - o.requests,
                              s.errors - o.errors, s.seconds - o.seconds,
                              tuple(a - b for a, b in zip(s.buckets, o.buckets))))
    return merge(diffs)


def quantile(snap: Snapshot, q: float) -> Optional[float]:
    """The q-quantile of a snapshot's latencies (Prometheus' histogram_quantile: linear within
    the bucket); None without requests."""
    total = sum(snap.buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(snap.buckets):
        if count and seen + count >= rank:
            if i == len(BUCKETS):  # above the largest bucket: say its bound
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i else 0.0
            return low + (BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]
