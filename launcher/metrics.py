"""An agent's Prometheus metrics: a listener of its typed events (launcher.events) and of what
its in-place workers say on the control channel (elastic.contract). It changes nothing.

The mapping is pure: `event_updates(event)` and `StepTracker.updates(local_rank, message)`
return `Update`s (metric, labels, operation, value); `AgentMetrics` applies them to its own
`CollectorRegistry` (one per agent, not Prometheus' global one: several agents may share a
process in tests), which the health server renders at GET /metrics.

Step counters come from the in-place channel of local rank 0 (every worker of a node passes the
same steps): restart-mode and Horovod workers have no channel, so their jobs export what the
agent sees (rounds, world size, rescales, failures, restarts, notices, etcd) and no step counts.
Every node of a job counts the job's steps: take max() across nodes, not sum().
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from elastic.contract import CheckpointSaved, CollectiveFailed, Hello, Message, Progress

from . import events as ev

PREFIX = "elastic_"
# Rescales take from ~0.1 s (a pre-warmed spare, in place) to minutes (a restart after a lease
# ran out); checkpoint saves from milliseconds to minutes.
RESCALE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SAVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
OUTAGE_BUCKETS = (0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

GAUGE, COUNTER, HISTOGRAM, INFO = "gauge", "counter", "histogram", "info"


@dataclass(frozen=True)
class MetricDef:
    name: str  # without the _total a counter's sample gets
    kind: str
    labels: Tuple[str, ...]
    help: str
    buckets: Tuple[float, ...] = ()


CATALOGUE: Tuple[MetricDef, ...] = (
    MetricDef("elastic_agent", INFO, ("run_id", "node", "host"),
              "This agent: its job (run id), node id and host."),
    MetricDef("elastic_world_size", GAUGE, (),
              "Workers in the latest round this node saw (0 before the first)."),
    MetricDef("elastic_round", GAUGE, (), "Number of the latest round this node saw."),
    MetricDef("elastic_rounds", COUNTER, ("cause",),
              "Rounds this node's workers started in or moved to, by the round's cause."),
    MetricDef("elastic_rescale_duration_seconds", HISTOGRAM, ("cause",),
              "From a rescale's cause to this node's workers running in the new world.",
              RESCALE_BUCKETS),
    MetricDef("elastic_worker_failures", COUNTER, ("cause",),
              "Worker failures on this node: exit (non-zero exit), collective (in place, every "
              "peer alive), hang (killed after --hang-timeout)."),
    MetricDef("elastic_worker_restarts", COUNTER, (),
              "Rounds after the first whose workers were started again as new processes."),
    MetricDef("elastic_preemption_notices", COUNTER, ("source",),
              "Preemption notices this node got (sigterm, sigint, file, metadata, released, ...)."),
    MetricDef("elastic_etcd_reachable", GAUGE, (),
              "1 while etcd answers this agent, 0 during an outage."),
    MetricDef("elastic_etcd_outage_duration_seconds", HISTOGRAM, (),
              "How long etcd was out of reach, per outage (counted when it answers again).",
              OUTAGE_BUCKETS),
    MetricDef("elastic_steps", COUNTER, (),
              "Step boundaries passed by this node's in-place workers (recomputed steps "
              "included)."),
    MetricDef("elastic_steps_committed", COUNTER, (),
              "Steps of progress committed by this node's in-place workers."),
    MetricDef("elastic_steps_recomputed", COUNTER, (),
              "Steps rolled back after a failed collective (trained again), in-place workers."),
    MetricDef("elastic_checkpoint_save_duration_seconds", HISTOGRAM, (),
              "Checkpoint writes by this node's in-place workers (ElasticState.save), to the "
              "rename.", SAVE_BUCKETS),
)
BY_NAME: Dict[str, MetricDef] = {m.name: m for m in CATALOGUE}


@dataclass(frozen=True)
class Update:
    """One change to one metric: op is set (gauge), inc (counter) or observe (histogram)."""

    metric: str
    op: str
    value: float = 1.0
    labels: Tuple[Tuple[str, str], ...] = ()


def _label(value) -> str:
    return "" if value is None else str(value)


def event_updates(event: ev.Event) -> List[Update]:
    """What one of the agent's events changes in its metrics."""
    out: List[Update] = []
    if isinstance(event, (ev.Rendezvous, ev.Rescale, ev.Waiting)) and event.world_size is not None:
        out.append(Update("elastic_world_size", "set", float(event.world_size)))
        if event.round is not None:
            out.append(Update("elastic_round", "set", float(event.round)))
    if isinstance(event, (ev.Rendezvous, ev.Rescale)):
        cause = (("cause", _label(event.cause)),)
        out.append(Update("elastic_rounds", "inc", 1.0, cause))
        if isinstance(event, ev.Rescale):
            if event.duration_s is not None:
                out.append(Update("elastic_rescale_duration_seconds", "observe",
                                  float(event.duration_s), cause))
            if event.in_place is False:
                out.append(Update("elastic_worker_restarts", "inc"))
    elif isinstance(event, (ev.WorkerFailed, ev.WorkerHung)):
        out.append(Update("elastic_worker_failures", "inc", 1.0,
                          (("cause", _label(event.cause)),)))
    elif isinstance(event, ev.PreemptionNotice):
        out.append(Update("elastic_preemption_notices", "inc", 1.0,
                          (("source", _label(event.cause)),)))
    elif isinstance(event, ev.EtcdUnreachable):
        out.append(Update("elastic_etcd_reachable", "set", 0.0))
    elif isinstance(event, ev.EtcdReconnected):
        out.append(Update("elastic_etcd_reachable", "set", 1.0))
        if event.duration_s is not None:
            out.append(Update("elastic_etcd_outage_duration_seconds", "observe",
                              float(event.duration_s)))
    return out


class StepTracker:
    """Turns local rank 0's channel messages into step counters. Its counts are cumulative per
    worker process (a restarted worker starts again at 0, and says hello first), so the tracker
    keeps the last value seen and counts what was added."""

    def __init__(self) -> None:
        self._steps = 0
        self._committed = 0

    def updates(self, local_rank: int, msg: Message) -> List[Update]:
        if local_rank != 0:
            return []
        if isinstance(msg, Hello):
            self._steps = self._committed = 0
            return []
        if isinstance(msg, Progress):
            out = []
            if msg.steps > self._steps:
                out.append(Update("elastic_steps", "inc", float(msg.steps - self._steps)))
                self._steps = msg.steps
            if msg.committed is not None and msg.committed > self._committed:
                out.append(Update("elastic_steps_committed", "inc",
                                  float(msg.committed - self._committed)))
                self._committed = msg.committed
            return out
        if isinstance(msg, CollectiveFailed) and msg.lost_steps:
            return [Update("elastic_steps_recomputed", "inc", float(msg.lost_steps))]
        if isinstance(msg, CheckpointSaved):
            return [Update("elastic_checkpoint_save_duration_seconds", "observe",
                           float(msg.duration_s))]
        return []


class AgentMetrics:
    """One agent's metrics: subscribe it to the agent's EventBus, feed it the drained channel
    messages, and render() for GET /metrics."""

    def __init__(self, run_id: str = "", node_id: str = "", host: str = ""):
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics = {m.name: _make(m, self.registry) for m in CATALOGUE}
        self._metrics["elastic_agent"].info({"run_id": run_id, "node": node_id, "host": host})
        self._metrics["elastic_etcd_reachable"].set(1)
        self._steps = StepTracker()
        self._lock = threading.Lock()  # the agent's loop and the event-history thread
        # A scrape between two changes sends the text rendered for the last one: rendering
        # holds the GIL for milliseconds, which the agent's loop would wait for.
        self._version, self._rendered = 0, (-1, b"")

    def __call__(self, stamped: ev.Stamped) -> None:
        self.apply(event_updates(stamped.event))

    def messages(self, messages: Iterable[Tuple[int, Message]]) -> None:
        for local_rank, msg in messages:
            self.apply(self._steps.updates(local_rank, msg))

    def apply(self, updates: Iterable[Update]) -> None:
        with self._lock:
            for u in updates:
                self._version += 1
                metric = self._metrics[u.metric]
                if u.labels:
                    metric = metric.labels(**dict(u.labels))
                if u.op == "set":
                    metric.set(u.value)
                elif u.op == "inc":
                    metric.inc(u.value)
                else:
                    metric.observe(u.value)

    def render(self) -> Tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        version, (rendered_at, text) = self._version, self._rendered
        if rendered_at != version:
            text = generate_latest(self.registry)
            self._rendered = (version, text)  # a change meanwhile: rendered again next time
        return text, CONTENT_TYPE_LATEST


def _make(m: MetricDef, registry):
    import prometheus_client as pc
    if m.kind == INFO:
        return pc.Info(m.name, m.help, registry=registry)
    cls = {GAUGE: pc.Gauge, COUNTER: pc.Counter, HISTOGRAM: pc.Histogram}[m.kind]
    kwargs: Mapping = {"buckets": m.buckets} if m.kind == HISTOGRAM else {}
    return cls(m.name, m.help, list(m.labels), registry=registry, **kwargs)


def sample(text: str, name: str, labels: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The value of one sample in a /metrics text (None if absent): for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families
    want = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return s.value
    return None

