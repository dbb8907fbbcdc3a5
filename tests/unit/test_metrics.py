"""The agent's metrics: events and channel messages -> metric updates (pure), the names keep
Prometheus' conventions, /metrics on the health server, and `elastic.job targets`' service
discovery JSON."""
import json
import re
import urllib.request

import pytest
import torch

from elastic import checkpoint
from elastic.contract import CheckpointSaved, CollectiveFailed, Hello, Progress, Ready
from elastic.job import http_sd
from elastic.state import ElasticState
from integrations.torch.world import ElasticWorld
from launcher import events as ev
from launcher.health import HealthServer
from launcher.metrics import (CATALOGUE, COUNTER, HISTOGRAM, AgentMetrics, StepTracker, Update,
                              event_updates, sample)
from rendezvous.api import JobSpec
from rendezvous.client import JobStatus, NodeStatus, RoundStatus

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Units Prometheus' conventions name as suffixes; a counter's name gets _total from the client.
UNITS = ("_seconds", "_bytes", "_total", "_ratio")


def test_metric_names_follow_prometheus_conventions():
    names = [m.name for m in CATALOGUE]
    assert len(set(names)) == len(names)
    for m in CATALOGUE:
        assert NAME.match(m.name) and m.name.startswith("elastic_"), m.name
        assert not m.name.endswith("_total"), "the client adds _total to a counter"
        assert not any(u in m.name for u in ("_ms", "_milliseconds", "_minutes")), m.name
        if m.kind == HISTOGRAM:
            assert m.name.endswith("_seconds") and list(m.buckets) == sorted(m.buckets)
        assert all(NAME.match(label) and not label.startswith("__") for label in m.labels)
        assert m.help.strip()
    text = AgentMetrics("job", "n1", "h").render()[0].decode()
    counters = [m.name for m in CATALOGUE if m.kind == COUNTER]
    for name in counters:
        assert f"# TYPE {name}_total counter" in text


def test_a_round_sets_the_world_size_and_a_rescale_is_timed_by_its_cause():
    first = ev.Rendezvous(round=1, world_size=2, members=("a", "b"), cause="start", in_place=True)
    assert event_updates(first) == [
        Update("elastic_world_size", "set", 2.0), Update("elastic_round", "set", 1.0),
        Update("elastic_rounds", "inc", 1.0, (("cause", "start"),))]
    shrink = ev.Rescale(round=2, world_size=1, cause="node_left", duration_s=0.8, in_place=False)
    assert event_updates(shrink) == [
        Update("elastic_world_size", "set", 1.0), Update("elastic_round", "set", 2.0),
        Update("elastic_rounds", "inc", 1.0, (("cause", "node_left"),)),
        Update("elastic_rescale_duration_seconds", "observe", 0.8, (("cause", "node_left"),)),
        Update("elastic_worker_restarts", "inc")]
    in_place = ev.Rescale(round=3, world_size=2, cause="node_joined", duration_s=0.2,
                          in_place=True)
    assert Update("elastic_worker_restarts", "inc") not in event_updates(in_place)
    # A round without this node: the job's world size still changes.
    assert event_updates(ev.Waiting(round=4, world_size=3, cause="resized"))[0] == \
        Update("elastic_world_size", "set", 3.0)


@pytest.mark.parametrize("event, expected", [
    (ev.WorkerFailed(cause="exit", rank=1, exit_code=1),
     [Update("elastic_worker_failures", "inc", 1.0, (("cause", "exit"),))]),
    (ev.WorkerHung(cause="hang", local_rank=0),
     [Update("elastic_worker_failures", "inc", 1.0, (("cause", "hang"),))]),
    (ev.PreemptionNotice(cause="metadata", grace_s=30.0),
     [Update("elastic_preemption_notices", "inc", 1.0, (("source", "metadata"),))]),
    (ev.EtcdUnreachable(cause="refused"), [Update("elastic_etcd_reachable", "set", 0.0)]),
    (ev.EtcdReconnected(duration_s=4.5), [
        Update("elastic_etcd_reachable", "set", 1.0),
        Update("elastic_etcd_outage_duration_seconds", "observe", 4.5)]),
    (ev.Joined(cause="start"), []),
    (ev.JobFinished(exit_code=0, cause="workers_succeeded"), []),
])
def test_each_event_maps_to_its_metrics(event, expected):
    assert event_updates(event) == expected


def test_steps_come_from_local_rank_0_and_a_restarted_worker_counts_from_zero_again():
    t = StepTracker()
    assert t.updates(1, Progress(steps=10, committed=8)) == []  # the same steps, another rank
    assert t.updates(0, Progress(steps=10, committed=8)) == [
        Update("elastic_steps", "inc", 10.0), Update("elastic_steps_committed", "inc", 8.0)]
    assert t.updates(0, Progress(steps=14, committed=8)) == [Update("elastic_steps", "inc", 4.0)]
    assert t.updates(0, CollectiveFailed(round=2, lost_steps=6)) == [
        Update("elastic_steps_recomputed", "inc", 6.0)]
    assert t.updates(0, CollectiveFailed(round=2)) == []  # an older worker: not known
    assert t.updates(0, CheckpointSaved(duration_s=0.25)) == [
        Update("elastic_checkpoint_save_duration_seconds", "observe", 0.25)]
    assert t.updates(0, Hello(local_rank=0, pid=99)) == [] and t.updates(0, Ready()) == []
    assert t.updates(0, Progress(steps=3, committed=2)) == [
        Update("elastic_steps", "inc", 3.0), Update("elastic_steps_committed", "inc", 2.0)]
    assert t.updates(0, Progress(steps=3)) == []  # a worker that does not know its commits


def test_agent_metrics_listen_to_the_bus_and_render_on_the_health_server():
    metrics = AgentMetrics("job-1", "node-a", "127.0.0.1")
    bus = ev.EventBus("node-a")
    bus.subscribe(metrics)
    bus.emit(ev.Rendezvous(round=1, world_size=1, cause="start", in_place=False))
    bus.emit(ev.Rescale(round=2, world_size=2, cause="node_joined", duration_s=1.5))
    bus.emit(ev.Rescale(round=3, world_size=1, cause="node_left", duration_s=0.3))
    metrics.messages([(0, Progress(steps=7, committed=5))])
    server = HealthServer("127.0.0.1", "node-a", metrics.render)
    try:
        with urllib.request.urlopen(f"http://{server.addr}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        with urllib.request.urlopen(f"http://{server.addr}/health", timeout=5) as r:
            assert json.loads(r.read()) == {"node_id": "node-a"}
    finally:
        server.close()
    assert sample(text, "elastic_world_size") == 1.0
    assert sample(text, "elastic_round") == 3.0
    assert sample(text, "elastic_rescale_duration_seconds_count", {"cause": "node_joined"}) == 1
    assert sample(text, "elastic_rescale_duration_seconds_count", {"cause": "node_left"}) == 1
    assert sample(text, "elastic_rescale_duration_seconds_sum", {"cause": "node_left"}) == 0.3
    assert sample(text, "elastic_rounds_total", {"cause": "start"}) == 1
    assert sample(text, "elastic_steps_total") == 7 and sample(
        text, "elastic_steps_committed_total") == 5
    assert sample(text, "elastic_agent_info", {"run_id": "job-1", "node": "node-a"}) == 1
    assert sample(text, "elastic_etcd_reachable") == 1


def test_a_scrape_between_changes_sends_the_text_rendered_for_the_last_change():
    metrics = AgentMetrics("j", "a")
    first = metrics.render()[0]
    assert metrics.render()[0] is first  # nothing changed: not rendered again
    metrics.apply([Update("elastic_world_size", "set", 3.0)])
    assert sample(metrics.render()[0].decode(), "elastic_world_size") == 3


def test_two_agents_in_one_process_keep_their_own_metrics():
    a, b = AgentMetrics("j", "a"), AgentMetrics("j", "b")
    a.apply([Update("elastic_world_size", "set", 4.0)])
    assert sample(a.render()[0].decode(), "elastic_world_size") == 4
    assert sample(b.render()[0].decode(), "elastic_world_size") == 0


def test_a_health_server_without_metrics_answers_404_there():
    server = HealthServer("127.0.0.1", "n")
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{server.addr}/metrics", timeout=5)
        assert err.value.code == 404
    finally:
        server.close()


class FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def test_the_in_place_world_reports_committed_and_rolled_back_steps(monkeypatch):
    model = torch.nn.Linear(2, 1)
    state = ElasticState(model, step=0)
    world = ElasticWorld()
    world.channel = FakeChannel()
    monkeypatch.setattr(world, "change_pending", lambda: False)
    monkeypatch.setattr("integrations.torch.world.PROGRESS_INTERVAL_S", 0.0)
    world.note_commits(state)
    for step in range(1, 8):  # commit after steps 3 and 6, before the boundary, as scripts do
        if step % 3 == 0:
            state.commit()
        world.step_boundary(state)
    assert world.channel.sent[-1] == Progress(steps=7, committed=6)
    world.report_failure(RuntimeError("peer gone"), state)
    failed = world.channel.sent[-1]
    assert isinstance(failed, CollectiveFailed) and failed.lost_steps == 1
    world.step_boundary(state)  # step 7 again
    assert world.channel.sent[-1] == Progress(steps=8, committed=6)
    state.commit()
    world.step_boundary(state)
    assert world.channel.sent[-1] == Progress(steps=9, committed=8)


def test_a_checkpoint_save_is_reported_to_the_listeners(tmp_path):
    seen = []
    remove = checkpoint.on_saved(lambda path, took: seen.append((path, took)))
    try:
        checkpoint.save_checkpoint(tmp_path / "c.pt", {"v": 1}, fingerprint="m")
    finally:
        remove()
    checkpoint.save_checkpoint(tmp_path / "c.pt", {"v": 2}, fingerprint="m")
    assert len(seen) == 1 and seen[0][0] == str(tmp_path / "c.pt") and seen[0][1] >= 0


def status(job, nodes):
    spec = JobSpec(min_nodes=1, max_nodes=4, created_at=1.0)
    return JobStatus(job=job, endpoint="e:1", revision=1, spec=spec,
                     round=RoundStatus(1, 2, tuple(n.node_id for n in nodes), "start", 0, True),
                     nodes=tuple(nodes), events=(), outcome=None, stop_requested=False,
                     leaving_costs="")


def node(nid, addr, host="h1"):
    return NodeStatus(node_id=nid, host=host, slots=2, labels={}, joined_at=1.0, state="active",
                      health_addr=addr)


def test_targets_are_prometheus_http_service_discovery():
    groups = http_sd([status("train", [node("a", "10.0.0.1:4001"), node("b", "10.0.0.2:4002",
                                                                        "h2")]),
                      status("other", [node("c", "")])])
    assert groups == [
        {"targets": ["10.0.0.1:4001"], "labels": {"job": "train", "node_id": "a", "host": "h1"}},
        {"targets": ["10.0.0.2:4002"], "labels": {"job": "train", "node_id": "b", "host": "h2"}},
    ]
    json.dumps(groups)  # what Prometheus reads
