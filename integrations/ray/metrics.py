"""The pool controller's Prometheus metrics (`python -m integrations.ray controller
--metrics-port P`): queues, workloads, quota use, the pool's allocation, and its endpoints'
replicas, requests and latency. It changes nothing.

`pool_samples(view)` is pure: the controller's state at one moment (a `PoolView`) -> samples.
`PoolMetrics` is a Prometheus collector that takes a view from the controller at each scrape
(its scheduler State is immutable; its records are copied), counts what the controller tells it
(each step's decisions, replicas seen per endpoint: a start from zero is a cold start) and adds
the endpoints' request counts from `endpoint_stats` (per replica: sum() them in PromQL).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from . import endpoint_stats
from .scheduler import State, Step
from .scheduler.model import GPU_MILLI
from .spec import ENDPOINT
from .store import ENDED, PENDING, RUNNING

RESOURCES = ("cpu", "memory", "gpu")  # the core's vector order: cpu_milli, memory_mib, gpu_milli

# name, kind, labels, help
CATALOGUE: Tuple[Tuple[str, str, Tuple[str, ...], str], ...] = (
    ("elastic_pool_nodes", "gauge", (), "Nodes in the pool."),
    ("elastic_pool_capacity", "gauge", ("resource",),
     "The pool's capacity: cpu in cores, memory in bytes, gpu in GPUs."),
    ("elastic_pool_allocated", "gauge", ("resource",),
     "What the scheduler allocated of the pool (same units as elastic_pool_capacity)."),
    ("elastic_pool_workloads", "gauge", ("state", "kind"),
     "Workloads by state (admitted, pending, ended) and kind (train, gang, endpoint)."),
    ("elastic_pool_queue_pending_workloads", "gauge", ("queue",),
     "Workloads waiting in each cluster queue."),
    ("elastic_pool_queue_admitted_workloads", "gauge", ("queue",),
     "Workloads admitted from each cluster queue."),
    ("elastic_pool_queue_resource_usage", "gauge", ("queue", "flavor", "resource"),
     "What each queue's admitted workloads use, per flavor (units as elastic_pool_capacity)."),
    ("elastic_pool_queue_nominal_quota", "gauge", ("queue", "flavor", "resource"),
     "Each queue's nominal quota per flavor (units as elastic_pool_capacity)."),
    ("elastic_pool_decisions", "counter", ("decision",),
     "The scheduler's decisions carried out (admit, preempt, release, resize, requeue, ...)."),
    ("elastic_endpoint_replicas", "gauge", ("endpoint", "state"),
     "An endpoint's Serve replicas: running (alive in Ray) or starting (waiting for a node)."),
    ("elastic_endpoint_replicas_granted", "gauge", ("endpoint",),
     "Replicas the pool's scheduler grants the endpoint."),
    ("elastic_endpoint_cold_starts", "counter", ("endpoint",),
     "Starts of an endpoint from zero replicas (its first request, or an ask after idling)."),
    ("elastic_endpoint_requests", "counter", ("endpoint", "replica", "outcome"),
     "Requests a replica answered (outcome ok) or failed (error), per live replica."),
    ("elastic_endpoint_request_duration_seconds", "histogram", ("endpoint", "replica"),
     "Time a replica took to answer, per live replica."),
)


@dataclass(frozen=True)
class PoolView:
    """What the metrics read of the controller at one moment."""

    state: State
    records: Mapping[str, object]  # name -> store.Record
    kinds: Mapping[str, str]  # name -> its submission's kind
    queues: Mapping[str, str]  # name -> its queue
    replicas: Mapping[str, int] = field(default_factory=dict)  # endpoint -> alive in Ray
    starting: Mapping[str, int] = field(default_factory=dict)  # endpoint -> waiting for a node


def _units(vector: Iterable[float]) -> Dict[str, float]:
    cpu, memory, gpu = vector
    return {"cpu": cpu / 1000, "memory": memory * 2.0**20, "gpu": gpu / GPU_MILLI}


Sample = Tuple[str, Tuple[Tuple[str, str], ...], float]


def pool_samples(view: PoolView) -> List[Sample]:
    """Every gauge's samples for one view of the pool."""
    st = view.state
    out: List[Sample] = [("elastic_pool_nodes", (), float(len(st.nodes)))]
    capacity = _units(st.capacity)
    used = [0, 0, 0]
    for node in st.nodes.values():
        used[0] += node.used_cpu_milli
        used[1] += node.used_memory_mib
        used[2] += sum(g.used_milli for g in node.gpus)
    allocated = _units(used)
    for r in RESOURCES:
        out.append(("elastic_pool_capacity", (("resource", r),), capacity[r]))
        out.append(("elastic_pool_allocated", (("resource", r),), allocated[r]))
    counts: Dict[Tuple[str, str], int] = {}
    for name, kind in view.kinds.items():
        rec = view.records.get(name)
        state = getattr(rec, "state", PENDING)
        if name in st.admitted:
            key = "admitted"
        elif name in st.pending:
            key = "pending"
        elif state in ENDED:
            key = "ended"
        elif kind == ENDPOINT and state == RUNNING:
            key = "scaled_to_zero"
        else:
            key = "pending"
        counts[(key, kind)] = counts.get((key, kind), 0) + 1
    for (state, kind), n in sorted(counts.items()):
        out.append(("elastic_pool_workloads", (("state", state), ("kind", kind)), float(n)))
    order = st.queue_order
    admitted_per_queue: Dict[str, int] = {}
    for a in st.admitted.values():
        admitted_per_queue[a.workload.queue] = admitted_per_queue.get(a.workload.queue, 0) + 1
    usage = st.usage
    for qname, queue in st.config.queues.items():
        out.append(("elastic_pool_queue_pending_workloads", (("queue", qname),),
                    float(len(order.get(qname, ())))))
        out.append(("elastic_pool_queue_admitted_workloads", (("queue", qname),),
                    float(admitted_per_queue.get(qname, 0))))
        for qf in queue.flavors:
            use = _units(usage.get(qname, qf.flavor))
            nominal = {r: q.nominal for r, q in qf.quotas.items()}
            for r in RESOURCES:
                labels = (("queue", qname), ("flavor", qf.flavor), ("resource", r))
                out.append(("elastic_pool_queue_resource_usage", labels, use[r]))
                if r in nominal:
                    vec = [0, 0, 0]
                    vec[RESOURCES.index(r)] = nominal[r]
                    out.append(("elastic_pool_queue_nominal_quota", labels, _units(vec)[r]))
    for name, kind in sorted(view.kinds.items()):
        rec = view.records.get(name)
        if kind != ENDPOINT or getattr(rec, "state", None) in ENDED:
            continue
        granted = len(rec.members) if rec is not None and rec.state == RUNNING else 0
        out.append(("elastic_endpoint_replicas_granted", (("endpoint", name),), float(granted)))
        out.append(("elastic_endpoint_replicas", (("endpoint", name), ("state", "running")),
                    float(view.replicas.get(name, 0))))
        out.append(("elastic_endpoint_replicas", (("endpoint", name), ("state", "starting")),
                    float(view.starting.get(name, 0))))
    return out


class ColdStarts:
    """Counts each endpoint's starts from zero replicas, from the replicas the controller sees
    (alive + waiting for a node) at each look."""

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {}
        self._last: Dict[str, int] = {}

    def seen(self, endpoint: str, replicas: int) -> bool:
        before = self._last.get(endpoint)
        self._last[endpoint] = replicas
        started = before == 0 and replicas > 0
        if started:
            self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
        else:
            self.counts.setdefault(endpoint, 0)
        return started


def decision_name(decision) -> str:
    return type(decision).__name__.lower()


class PoolMetrics:
    """The controller's collector: `view` returns a PoolView when scraped; the controller calls
    `stepped(step)` after each scheduler step and `replicas_seen(...)` after each look at Ray."""

    def __init__(self, view: Callable[[], PoolView],
                 stats: Optional[Callable[[], Dict[str, List[endpoint_stats.Snapshot]]]] = None,
                 clock=None):
        import time
        self._view, self._stats, self._clock = view, stats, clock or time.time
        self._lock = threading.Lock()
        self.decisions: Dict[str, int] = {}
        self.cold = ColdStarts()

    def stepped(self, step: Step) -> None:
        with self._lock:
            for d in step.decisions:
                name = decision_name(d)
                self.decisions[name] = self.decisions.get(name, 0) + 1

    def replicas_seen(self, endpoint: str, alive: int, waiting: int) -> None:
        with self._lock:
            self.cold.seen(endpoint, alive + waiting)

    def registry(self):
        from prometheus_client import CollectorRegistry
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        families = {}
        for name, kind, labels, text in CATALOGUE:
            cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                   "histogram": HistogramMetricFamily}[kind]
            families[name] = cls(name, text, labels=list(labels))
        for name, labels, value in pool_samples(self._view()):
            families[name].add_metric([v for _, v in labels], value)
        with self._lock:
            for decision, n in sorted(self.decisions.items()):
                families["elastic_pool_decisions"].add_metric([decision], n)
            for endpoint, n in sorted(self.cold.counts.items()):
                families["elastic_endpoint_cold_starts"].add_metric([endpoint], n)
        for snap in self._live_stats():
            requests = families["elastic_endpoint_requests"]
            requests.add_metric([snap.endpoint, snap.replica, "ok"], snap.requests - snap.errors)
            requests.add_metric([snap.endpoint, snap.replica, "error"], snap.errors)
            cumulative, buckets = 0, []
            for bound, count in zip(endpoint_stats.BUCKETS, snap.buckets):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", snap.requests))
            families["elastic_endpoint_request_duration_seconds"].add_metric(
                [snap.endpoint, snap.replica], buckets, snap.seconds)
        yield from families.values()

    def _live_stats(self) -> List[endpoint_stats.Snapshot]:
        if self._stats is None:
            return []
        try:
            found = self._stats()
        except Exception:  # noqa: BLE001 (Ray busy: the scrape goes on without them)
            return []
        now = self._clock()
        return [s for snaps in found.values() for s in endpoint_stats.live(snaps, now)]


def serve(registry, host: str, port: int):
    """Serve GET /metrics of `registry` on host:port (port 0: a free one); returns the server
    (`server.server_address`, `server.shutdown()`)."""
    from prometheus_client import start_http_server
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
