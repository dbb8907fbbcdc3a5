"""The pool controller's metrics and the endpoints' request counts, without Ray: a view of the
pool -> samples, cold starts, the collector's exposition, and the replicas' counts (record,
merge, window, quantile)."""
import pytest

from integrations.ray import endpoint_stats as es
from integrations.ray.metrics import CATALOGUE, ColdStarts, PoolMetrics, PoolView, pool_samples
from integrations.ray.scheduler import Node, State, parse, step, submit
from integrations.ray.scheduler.state import apply
from integrations.ray.spec import ENDPOINT, GANG, Submission
from integrations.ray.store import FINISHED, PENDING, RUNNING, Record
from launcher.metrics import sample

CONFIG = parse({"clusterQueues": [
    {"name": "team-a", "flavors": [{"name": "default", "resources": {
        "cpu": {"nominalQuota": 4}, "memory": {"nominalQuota": "8Gi"}}}]},
    {"name": "team-b", "flavors": [{"name": "default", "resources": {"cpu": 2}}]}]})


def pool():
    """Two 2-CPU nodes; team-a's gang runs on 3 CPUs, team-b's waits, an endpoint idles."""
    nodes = [Node("n1", 2000, 4096), Node("n2", 2000, 4096)]
    state = State.of(CONFIG, nodes, now=0)
    subs = {"big": Submission("big", GANG, ("true",), queue="team-a", min_members=3,
                              max_members=3, cpus=1, memory_mib=1024),
            "waits": Submission("waits", GANG, ("true",), queue="team-b", min_members=2,
                                max_members=2, cpus=1),
            "ep": Submission("ep", ENDPOINT, (), queue="team-a", min_members=0, max_members=2),
            "old": Submission("old", GANG, ("true",), queue="team-b", min_members=1,
                              max_members=1)}
    for name in ("big", "waits"):
        state = submit(state, subs[name].workload(), now=1)
    state = apply(state, step(state, now=2))
    records = {"big": Record(state=RUNNING), "waits": Record(state=PENDING, reason="no room"),
               "ep": Record(state=RUNNING, reason="scaled to zero"),
               "old": Record(state=FINISHED)}
    return PoolView(state, records, {n: s.kind for n, s in subs.items()},
                    {n: s.queue for n, s in subs.items()}, {"ep": 0}, {"ep": 1})


def as_dict(samples):
    return {(name, labels): value for name, labels, value in samples}


def test_a_view_of_the_pool_gives_queues_workloads_quota_use_and_allocation():
    view = pool()
    assert "big" in view.state.admitted and "waits" in view.state.pending
    got = as_dict(pool_samples(view))
    assert got[("elastic_pool_nodes", ())] == 2
    assert got[("elastic_pool_capacity", (("resource", "cpu"),))] == 4.0
    assert got[("elastic_pool_allocated", (("resource", "cpu"),))] == 3.0
    assert got[("elastic_pool_allocated", (("resource", "memory"),))] == 3 * 2.0**30
    assert got[("elastic_pool_capacity", (("resource", "gpu"),))] == 0
    assert got[("elastic_pool_queue_pending_workloads", (("queue", "team-b"),))] == 1
    assert got[("elastic_pool_queue_pending_workloads", (("queue", "team-a"),))] == 0
    assert got[("elastic_pool_queue_admitted_workloads", (("queue", "team-a"),))] == 1
    usage = (("queue", "team-a"), ("flavor", "default"))
    assert got[("elastic_pool_queue_resource_usage", usage + (("resource", "cpu"),))] == 3.0
    assert got[("elastic_pool_queue_nominal_quota", usage + (("resource", "cpu"),))] == 4.0
    assert got[("elastic_pool_queue_nominal_quota", usage + (("resource", "memory"),))] == \
        8 * 2.0**30
    assert ("elastic_pool_queue_nominal_quota", usage + (("resource", "gpu"),)) not in got
    assert got[("elastic_pool_workloads", (("state", "admitted"), ("kind", GANG)))] == 1
    assert got[("elastic_pool_workloads", (("state", "pending"), ("kind", GANG)))] == 1
    assert got[("elastic_pool_workloads", (("state", "ended"), ("kind", GANG)))] == 1
    assert got[("elastic_pool_workloads", (("state", "scaled_to_zero"), ("kind", ENDPOINT)))] == 1
    assert got[("elastic_endpoint_replicas_granted", (("endpoint", "ep"),))] == 0
    assert got[("elastic_endpoint_replicas", (("endpoint", "ep"), ("state", "starting")))] == 1


def test_a_start_from_zero_replicas_is_a_cold_start():
    cold = ColdStarts()
    assert [cold.seen("ep", n) for n in (0, 1, 2, 0, 0, 1, 1)] == [
        False, True, False, False, False, True, False]
    assert cold.counts == {"ep": 2}
    assert cold.seen("new", 1) is False  # first seen running: the controller was restarted


def test_the_collector_renders_every_family_with_valid_names():
    now = 100.0
    rec = es.Recorder("ep", "r1", clock=lambda: now)
    for s in (0.004, 0.02, 0.02, 0.3):
        rec.observe(s)
    rec.observe(7.0, ok=False)
    gone = es.Snapshot("ep", "r0", now - es.STALE_S - 1, 0.0, requests=3)
    metrics = PoolMetrics(pool, lambda: {"ep": [rec.snapshot(), gone]}, clock=lambda: now)
    metrics.replicas_seen("ep", 0, 0)
    metrics.replicas_seen("ep", 0, 1)
    view = pool()
    metrics.stepped(step(view.state, now=3))
    from prometheus_client import generate_latest
    text = generate_latest(metrics.registry()).decode()
    for name, kind, _labels, _help in CATALOGUE:
        assert f"# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}" in text or \
            f"# TYPE {name} {kind}" in text, name
    assert sample(text, "elastic_endpoint_cold_starts_total", {"endpoint": "ep"}) == 1
    assert sample(text, "elastic_endpoint_requests_total",
                  {"endpoint": "ep", "replica": "r1", "outcome": "ok"}) == 4
    assert sample(text, "elastic_endpoint_requests_total",
                  {"endpoint": "ep", "replica": "r1", "outcome": "error"}) == 1
    assert sample(text, "elastic_endpoint_requests_total", {"replica": "r0"}) is None  # gone
    assert sample(text, "elastic_endpoint_request_duration_seconds_bucket",
                  {"replica": "r1", "le": "0.025"}) == 3
    assert sample(text, "elastic_endpoint_request_duration_seconds_count", {"replica": "r1"}) == 5
    assert sample(text, "elastic_pool_queue_pending_workloads", {"queue": "team-b"}) == 1


def test_a_broken_stats_reader_does_not_fail_the_scrape():
    def broken():
        raise RuntimeError("GCS busy")
    from prometheus_client import generate_latest
    text = generate_latest(PoolMetrics(pool, broken).registry()).decode()
    assert sample(text, "elastic_pool_nodes") == 2


def test_replica_counts_survive_json_and_merge_window_and_quantile():
    t = [0.0]
    a, b = es.Recorder("ep", "a", clock=lambda: t[0]), es.Recorder("ep", "b", clock=lambda: t[0])
    for _ in range(90):
        a.observe(0.003)
    for _ in range(10):
        b.observe(0.2)
    snap_a, snap_b = a.snapshot(), b.snapshot()
    assert es.Snapshot.from_json(snap_a.to_json()) == snap_a
    total = es.merge([snap_a, snap_b])
    assert total.requests == 100 and total.buckets[0] == 90
    assert es.quantile(total, 0.5) == pytest.approx(0.005 * 50 / 90)
    assert 0.1 < es.quantile(total, 0.95) <= 0.25
    assert es.quantile(es.merge([]), 0.5) is None
    old = {"a": snap_a, "b": snap_b}
    t[0] = 5.0
    for _ in range(4):
        b.observe(2.0)
    c = es.Recorder("ep", "c", clock=lambda: t[0])
    c.observe(0.04)
    recent = es.window({"a": a.snapshot(), "b": b.snapshot(), "c": c.snapshot()}, old)
    assert recent.requests == 5 and es.quantile(recent, 0.5) > 1.0
    slow = es.Recorder("ep", "s")
    slow.observe(100.0)
    assert es.quantile(slow.snapshot(), 0.99) == es.BUCKETS[-1]
    assert es.live([snap_a, es.Snapshot("ep", "x", -100.0, 0.0)], now=0.0) == [snap_a]
