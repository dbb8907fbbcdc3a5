"""The dashboard's JSON, from recorded job statuses and event histories (no etcd, no Ray): the
rows, the members, the world-size timeline with its causes, the pool's queues and endpoints, the
API's errors, and that it only reads."""
import json
import urllib.error
import urllib.request

import pytest

from elastic.dashboard import views
from elastic.dashboard.__main__ import main
from elastic.dashboard.page import APP_JS, INDEX
from elastic.dashboard.server import Dashboard, serve
from elastic.dashboard.sources import Traffic, Unavailable
from integrations.ray import endpoint_stats as es
from integrations.ray.scheduler import Node
from rendezvous.api import JobOutcome, JobSpec
from rendezvous.client import JobStatus, NodeStatus, RoundStatus, UnknownJobError


def node(nid, state="active", offset=0, addr="127.0.0.1:4000"):
    return NodeStatus(node_id=nid, host="127.0.0.1", slots=2, labels={"zone": "a"},
                      joined_at=10.0, state=state, rank_offset=offset, health_addr=addr)


def status(job="train", world=2, nodes=None, cause="node_joined", number=2, outcome=None):
    nodes = nodes if nodes is not None else [node("a", offset=0), node("b", offset=2)]
    members = tuple(n.node_id for n in nodes if n.state == "active")
    return JobStatus(job=job, endpoint="127.0.0.1:2379", revision=7,
                     spec=JobSpec(min_nodes=1, max_nodes=3, created_at=5.0),
                     round=RoundStatus(number, world, members, cause, 0, True),
                     nodes=tuple(nodes), events=(), outcome=outcome, stop_requested=False,
                     leaving_costs="at the next step boundary")


# As agents record them: node a starts alone, b joins, b is SIGKILLed (the leader a writes
# node_left with the removed node), a spare c waits.
EVENTS = [
    {"time": 10.0, "event": "joined", "node": "a", "round": None, "cause": "start"},
    {"time": 11.0, "event": "rendezvous", "node": "a", "round": 1, "world_size": 2,
     "members": ["a"], "cause": "start", "in_place": True},
    {"time": 20.1, "event": "rescale", "node": "a", "round": 2, "world_size": 4,
     "members": ["a", "b"], "cause": "node_joined", "duration_s": 0.3},
    {"time": 20.0, "event": "rendezvous", "node": "b", "round": 2, "world_size": 4,
     "members": ["a", "b"], "cause": "node_joined"},
    {"time": 30.0, "event": "node_left", "node": "a", "round": 3, "world_size": 2,
     "members": ["a"], "cause": "removed", "nodes": ["b"]},
    {"time": 30.2, "event": "rescale", "node": "a", "round": 3, "world_size": 2,
     "members": ["a"], "cause": "node_left", "duration_s": 0.9},
    {"time": 31.0, "event": "waiting", "node": "c", "round": 3, "world_size": 2,
     "members": ["a"], "cause": "node_left"},
]


def test_the_timeline_has_one_entry_per_round_with_its_cause_and_who_left():
    got = views.timeline(EVENTS)
    assert [(r["round"], r["time"], r["world_size"], r["cause"], r["left"], r["duration_s"])
            for r in got] == [(1, 11.0, 2, "start", [], None),
                              (2, 20.0, 4, "node_joined", [], 0.3),
                              (3, 30.0, 2, "node_left", ["b"], 0.9)]


def test_a_round_not_in_the_history_yet_comes_from_the_status():
    current = RoundStatus(4, 6, ("a", "b", "c"), "node_joined", 0, True)
    got = views.timeline(EVENTS, current)
    assert got[-1] == {"round": 4, "time": None, "world_size": 6, "cause": "node_joined",
                       "members": ["a", "b", "c"], "duration_s": None, "left": []}
    assert views.timeline([], None) == []


def test_a_job_row_and_its_detail():
    st = status(nodes=[node("a", offset=0), node("b", offset=2), node("c", "spare", None)])
    row = views.job_row(st)
    assert row == {"job": "train", "state": "running", "world_size": 2, "round": 2,
                   "cause": "node_joined", "nodes": {"active": 2, "spare": 1, "released": 0},
                   "size": {"min": 1, "max": 3, "desired": 3}, "created_at": 5.0,
                   "outcome": None}
    detail = views.job_detail(st, EVENTS)
    assert [(m["node_id"], m["state"], m["ranks"]) for m in detail["members"]] == [
        ("a", "active", "0..1"), ("b", "active", "2..3"), ("c", "spare", None)]
    assert detail["members"][0]["metrics"] == "http://127.0.0.1:4000/metrics"
    assert len(detail["timeline"]) == 3 and detail["events"] == EVENTS
    ended = views.job_row(status(outcome=JobOutcome(status="failed", reason="boom")))
    assert ended["state"] == "failed" and ended["outcome"] == "failed"


WORKLOADS = [
    {"name": "trainer", "kind": "train", "queue": "default", "state": "running", "reason": "",
     "members": [{"id": "m0"}, {"id": "m1"}], "size": {"min": 1, "max": 3, "now": 2},
     "submitted_at": 1.0},
    {"name": "big-gang", "kind": "gang", "queue": "default", "state": "pending",
     "reason": "waits for 4 CPUs (the pool has 1 free)", "members": [],
     "size": {"min": 4, "max": 4, "now": 0}, "submitted_at": 2.0},
    {"name": "ep", "kind": "endpoint", "queue": "default", "state": "running",
     "reason": "", "members": [{"id": "r0"}], "size": {"min": 0, "max": 2, "now": 1},
     "submitted_at": 3.0},
]
QUEUES = [{"queue": "default", "cohort": None, "strategy": "BestEffortFIFO", "pending": 1,
           "running": 2, "used": {"cpu": 3.0, "memory_mib": 0, "gpu": 0.0}, "quota": {}}]
INVENTORY = [Node("n1", 2000, 4096), Node("n2", 2000, 4096)]


def test_the_pool_view_has_queues_with_pending_reasons_allocation_and_endpoints():
    traffic = {"ep": {"rate_per_s": 2.0, "p50_ms": 10.0, "p95_ms": 40.0, "requests_total": 9}}
    got = views.pool_view(WORKLOADS, QUEUES, INVENTORY, {"ep": 2}, {"pid": 42, "time": 99.0},
                          100.0, replicas={"ep": {"running": 1, "starting": 1},
                                           "other": {"running": 2}}, traffic=traffic)
    assert got["controller"] == {"pid": 42, "age_s": 1.0} and got["nodes"] == 2
    assert got["allocation"]["cpu"] == {"capacity": 4.0, "allocated": 3.0}
    assert got["allocation"]["memory_mib"]["capacity"] == 8192
    [queue] = got["queues"]
    assert queue["pending_workloads"] == [{"name": "big-gang", "kind": "gang", "reason":
                                           "waits for 4 CPUs (the pool has 1 free)",
                                           "submitted_at": 2.0}]
    ep, other = got["endpoints"]
    assert (ep["name"], ep["granted"], ep["asked"], ep["replicas"], ep["in_pool"]) == (
        "ep", 1, 2, {"running": 1, "starting": 1}, True)
    assert ep["traffic"]["p95_ms"] == 40.0
    assert (other["name"], other["in_pool"], other["replicas"]["running"]) == ("other", False, 2)
    without_ray = views.pool_view(WORKLOADS, QUEUES, INVENTORY, {}, None, 100.0)
    assert without_ray["endpoints"][0]["replicas"] is None and without_ray["controller"] is None


class FakeJobs:
    endpoint = "127.0.0.1:2379"

    def __init__(self, statuses=(), events=(), down=None):
        self._statuses, self._events, self.down = list(statuses), list(events), down

    def statuses(self):
        if self.down:
            raise Unavailable(self.down)
        return self._statuses

    def job(self, job):
        if self.down:
            raise Unavailable(self.down)
        for s in self._statuses:
            if s.job == job:
                return s, self._events
        raise UnknownJobError(f"no job {job!r}")

    def close(self):
        pass


class FakePool:
    def __init__(self, found=None, down=None):
        self.found, self.down = found, down

    def read(self):
        if self.down:
            raise Unavailable(self.down)
        return self.found

    def close(self):
        pass


def answer(dashboard, path):
    code, kind, body = dashboard.route(path)
    return code, json.loads(body) if kind == "application/json" else body


def test_the_api_answers_jobs_a_job_and_the_pool_and_says_what_is_unavailable():
    d = Dashboard(FakeJobs([status()], EVENTS), FakePool(None), clock=lambda: 50.0)
    code, body = answer(d, "/api/jobs")
    assert code == 200 and body["error"] is None and [j["job"] for j in body["jobs"]] == ["train"]
    code, body = answer(d, "/api/jobs/train")
    assert code == 200 and body["time"] == 50.0 and body["world_size"] == 2
    assert [r["cause"] for r in body["timeline"]] == ["start", "node_joined", "node_left"]
    code, body = answer(d, "/api/jobs/nope")
    assert code == 404 and "no job 'nope'" in body["error"]
    assert answer(d, "/api/pool") == (200, {"time": 50.0, "pool": None, "error": None,
                                           "ray_error": None})
    assert answer(d, "/api/frob")[0] == 404
    code, html = answer(d, "/")
    assert code == 200 and b"<script src=\"app.js\">" in html
    down = Dashboard(FakeJobs(down="etcd at 127.0.0.1:1 is unreachable"),
                     FakePool(down="etcd at 127.0.0.1:1 is unreachable"))
    code, body = answer(down, "/api/jobs")
    assert code == 503 and body["error"] == "etcd at 127.0.0.1:1 is unreachable"
    assert answer(down, "/api/jobs/train")[0] == 503
    assert answer(down, "/api/pool")[0] == 503
    found = {"workloads": WORKLOADS, "queues": QUEUES, "inventory": INVENTORY, "asks": {},
             "controller": None}
    code, body = answer(Dashboard(FakeJobs(), FakePool(found)), "/api/pool")
    assert code == 200 and body["pool"]["queues"][0]["pending_workloads"][0]["name"] == \
        "big-gang"


def test_the_server_only_reads():
    server = serve(Dashboard(FakeJobs([status()]), FakePool()))
    url = "http://%s:%d" % server.server_address[:2]
    try:
        with urllib.request.urlopen(url + "/api/jobs", timeout=5) as r:
            assert r.headers["Cache-Control"] == "no-store" and json.loads(r.read())["jobs"]
        with urllib.request.urlopen(url + "/app.js", timeout=5) as r:
            assert r.read().decode() == APP_JS
        for method in ("POST", "PUT", "DELETE"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url + "/api/jobs/train",
                                                              method=method, data=b"{}"),
                                       timeout=5)
            assert err.value.code == 405
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_writes_text_only_as_text():
    # Job ids, causes and reasons come from etcd: never parsed as HTML.
    assert "innerHTML" not in APP_JS and "insertAdjacentHTML" not in APP_JS
    assert 'id="world-size"' in INDEX and 'id="timeline"' in INDEX


def test_traffic_is_counted_over_a_window_and_a_new_replica_counts_from_zero():
    t = Traffic()
    a = es.Recorder("ep", "a", clock=lambda: 100.0)
    for _ in range(10):
        a.observe(0.01)
    first = t.update(100.0, {"ep": [a.snapshot()]})["ep"]
    assert first["requests_total"] == 10 and first["requests"] == 10
    b = es.Recorder("ep", "b", clock=lambda: 140.0)
    for _ in range(20):
        b.observe(0.2)
    later = t.update(140.0, {"ep": [a.snapshot(), b.snapshot()]})["ep"]
    assert later["requests"] == 20 and later["window_s"] == 40.0 and later["rate_per_s"] == 0.5
    assert 100 < later["p50_ms"] <= 250 and later["requests_total"] == 30
    assert t.update(150.0, {}) == {}


def test_bad_flags_are_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("ELASTIC_RDZV_ENDPOINT", raising=False)
    monkeypatch.setenv("ELASTIC_JOBS_DIR", "/nonexistent-dir-for-the-test")
    assert main([]) == 2
    assert "no etcd endpoint" in capsys.readouterr().err
    assert main(["--rdzv-endpoint", "ftp://host:1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["--rdzv-endpoint", "127.0.0.1:1", "--port", "99999"]) == 2
    assert "not a port number" in capsys.readouterr().err
