"""Contract of the etcd adapter and of membership, against a real etcd on 127.0.0.1."""
import threading
import time

import pytest

from rendezvous.api import JobOutcome, Member, NodeInfo, RendezvousConnectionError, RendezvousSettings, Round
from rendezvous.decision import FailureReport
from rendezvous.membership import Membership
from rendezvous.store import EtcdStore, JobStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(etcd_endpoint, run_id):
    s = EtcdStore(etcd_endpoint, run_id)
    yield s
    s.delete_job()
    s.close()


def node(store, nid, ttl=5):
    lease = store.grant_lease(ttl)
    info = NodeInfo(node_id=nid, host="127.0.0.1", nproc=1, health_addr="127.0.0.1:1",
                    lease_id=lease, joined_at=time.time())
    store.register(info)
    return info


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_registration_disappears_with_revoked_lease(store):
    a = node(store, "a")
    node(store, "b")
    assert set(store.snapshot().nodes) == {"a", "b"}
    store.revoke_lease(a.lease_id)
    assert set(store.snapshot().nodes) == {"b"}
    store.revoke_lease(a.lease_id)  # revoking twice is harmless


def test_registration_expires_without_keepalive(store):
    node(store, "a", ttl=1)
    assert wait_until(lambda: "a" not in store.snapshot().nodes, timeout=10)


def test_only_one_leader_and_takeover_after_lease_loss(store):
    a, b = node(store, "a"), node(store, "b")
    assert store.campaign("a", a.lease_id)
    assert not store.campaign("b", b.lease_id)
    assert store.snapshot().leader == "a"
    store.revoke_lease(a.lease_id)
    assert store.campaign("b", b.lease_id)
    assert store.snapshot().leader == "b"


def test_round_publication_is_fenced(store):
    a, b = node(store, "a"), node(store, "b")
    store.campaign("a", a.lease_id)
    r1 = Round(number=1, members=(Member("a", "127.0.0.1", 1),))
    assert store.publish_round(r1, 0, "a")
    snap = store.snapshot()
    assert snap.round == r1
    # A stale revision loses, even for the leader.
    r2 = Round(number=2, members=r1.members + (Member("b", "127.0.0.1", 1),))
    assert not store.publish_round(r2, 0, "a")
    # A node that is not the leader loses, even with the right revision.
    assert not store.publish_round(r2, snap.round_revision, "b")
    assert store.publish_round(r2, snap.round_revision, "a")
    assert store.snapshot().round.number == 2


def test_failures_masters_and_outcome(store):
    store.report_failure(3, FailureReport("a", 1.0, "rank 0 exited with code 1", 1))
    store.put_master(3, "127.0.0.1:1234")
    snap = store.snapshot()
    assert snap.failures_for(3)[0].description == "rank 0 exited with code 1"
    assert snap.failures_for(2) == ()
    assert snap.masters[3] == "127.0.0.1:1234"
    first = store.set_outcome(JobOutcome(status="failed", reason="x"))
    second = store.set_outcome(JobOutcome(status="succeeded"))
    assert first.status == second.status == "failed"  # written once


def test_jobs_sharing_etcd_do_not_see_each_other(etcd_endpoint, store):
    other = EtcdStore(etcd_endpoint, store.run_id + "-other")
    try:
        node(store, "a")
        node(other, "z")
        assert set(store.snapshot().nodes) == {"a"}
        assert set(other.snapshot().nodes) == {"z"}
    finally:
        other.delete_job()
        other.close()


def test_watch_wakes_on_change(store):
    woke = threading.Event()
    store.watch(woke.set)
    node(store, "a")
    assert woke.wait(5)


def test_unreachable_endpoint_is_a_connection_error(run_id):
    with pytest.raises(RendezvousConnectionError, match="unreachable"):
        EtcdStore("127.0.0.1:1", run_id, timeout=1)


def test_memberships_form_rounds_and_shrink_on_leave(etcd_endpoint, run_id):
    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=3,
                                  last_call_timeout=0.2, join_settle=0.1, lease_ttl=5)
    stores = [EtcdStore(etcd_endpoint, run_id) for _ in range(2)]
    a = Membership(stores[0], settings, host="127.0.0.1", nproc=2, health_addr="x:1", node_id="a")
    b = Membership(stores[1], settings, host="127.0.0.1", nproc=1, health_addr="x:2", node_id="b")
    try:
        a.join()

        def step_all():
            for m in (a, b):
                if m._lease_id is not None:
                    m.step()
            return stores[0].snapshot().round

        assert wait_until(lambda: (r := step_all()) is not None and r.node_ids == ("a",))
        b.join()
        assert wait_until(lambda: step_all().node_ids == ("a", "b"))
        assert stores[0].snapshot().round.world_size == 3
        a.leave()  # the leader leaves: b takes over and publishes a round without a
        assert wait_until(lambda: step_all().node_ids == ("b",))
        snap = stores[1].snapshot()
        assert snap.leader == "b" and snap.round.cause == "node_left"
    finally:
        a.leave()
        b.leave()
        stores[0].delete_job()
        for s in stores:
            s.close()


def test_the_etcd_store_is_a_job_store(store):
    assert isinstance(store, JobStore)


def test_an_extensions_keys_are_its_own_and_wake_no_agent(store):
    woken = []
    store.watch(lambda: woken.append(1))
    store.ext_put("horovod", "3/global/0", b"addr")
    store.ext_put("horovod", "4/global/0", b"addr")
    store.ext_put("other", "x", b"y")
    assert store.ext_get("horovod", "3/global/0") == b"addr"
    assert sorted(store.ext_keys("horovod")) == ["3/global/0", "4/global/0"]
    store.ext_delete_prefix("horovod", "3/")
    assert store.ext_keys("horovod") == ["4/global/0"] and store.ext_keys("other") == ["x"]
    store.ext_delete("horovod", "4/global/0")
    assert store.ext_get("horovod", "4/global/0") is None
    # Their watch woke for none of it: the first call comes for a job key written after them
    # (watch events arrive in order).
    store.mark_in_place()
    assert wait_until(lambda: woken)
    assert woken == [1]
    snap = store.snapshot()
    assert snap.nodes == {} and snap.in_place


class CountingClient:
    """The etcd client of a store, counting the requests made through it (not the watch's
    events, which arrive on the stream opened once; not lease keep-alives)."""

    NOT_COUNTED = {"refresh_lease", "add_watch_prefix_callback", "cancel_watch", "close"}

    def __init__(self, client):
        self._client, self.calls = client, []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if callable(attr) and name not in self.NOT_COUNTED:
            def counted(*args, **kwargs):
                self.calls.append(name)
                return attr(*args, **kwargs)
            return counted
        return attr


def test_a_watching_store_answers_from_its_mirror_as_a_fresh_read_would(etcd_endpoint, store):
    """Every kind of key, written by another store (another agent), deleted and rewritten."""
    writer = EtcdStore(etcd_endpoint, store.run_id)
    reader = EtcdStore(etcd_endpoint, store.run_id)  # no watch: reads etcd each time
    changed = threading.Event()
    try:
        node(writer, "a", ttl=60)
        store.watch(changed.set)
        b = node(writer, "b", ttl=60)
        assert writer.campaign("a", b.lease_id)
        rnd = Round(number=1, members=(Member("a", "127.0.0.1", 1), Member("b", "127.0.0.1", 1)))
        assert writer.publish_round(rnd, 0, "a")
        writer.put_master(1, "127.0.0.1:29500")
        writer.report_failure(1, FailureReport(node_id="b", time=1.0, description="x",
                                               exit_code=1))
        writer.mark_in_place()
        writer.ext_put("horovod", "k", b"v")  # not part of a snapshot
        writer.revoke_lease(b.lease_id)  # b's registration and the leadership go
        node(writer, "c", ttl=60)
        ok = wait_until(lambda: store.snapshot() == reader.snapshot())
        a_, b_ = store.snapshot(), reader.snapshot()  # what differs, if it never caught up
        assert ok, [(f, getattr(a_, f), getattr(b_, f)) for f in a_.__dataclass_fields__
                    if getattr(a_, f) != getattr(b_, f)]
        snap = store.snapshot()
        assert set(snap.nodes) == {"a", "c"} and snap.leader is None
        assert snap.round == rnd and snap.masters == {1: "127.0.0.1:29500"}
        assert snap.failures_for(1)[0].node_id == "b" and snap.in_place
    finally:
        writer.close()
        reader.close()


def test_a_store_reads_its_own_writes_at_once(store):
    store.watch(lambda: None)
    info = node(store, "a")  # no waiting for the watch to deliver it
    assert "a" in store.snapshot().nodes
    assert store.campaign("a", info.lease_id)
    assert store.snapshot().leader == "a"


def test_a_broken_watch_makes_the_store_read_until_it_watches_again(store, monkeypatch):
    store.watch(lambda: None)
    counting = CountingClient(store._client)
    monkeypatch.setattr(store, "_client", counting)
    store.snapshot()
    assert counting.calls == []  # from the mirror
    # What the client library hands the callback when the stream breaks: an error.
    callback = store._client._client.watcher._callbacks[store._watch_id]
    callback(RuntimeError("stream broken"))
    store.snapshot()
    assert counting.calls == ["get_prefix_response"]


@pytest.mark.parametrize("others", [2, 10])
def test_a_membership_change_costs_an_agent_requests_independent_of_the_job_size(
        etcd_endpoint, run_id, others, monkeypatch):
    """Agents that watch and step as the launcher's loop does; one node joins. The leader
    writes the new round; every other agent makes no request at all, however many they are
    (before, each read every node's registration on each change); the newcomer reads the job
    once, to start its mirror (before, three times)."""
    monkeypatch.setattr("rendezvous.store.CONFIRM_S", 3600.0)  # no confirming read meanwhile
    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=others + 1,
                                  last_call_timeout=0.1, join_settle=0.0, lease_ttl=30)
    stores = [EtcdStore(etcd_endpoint, run_id) for _ in range(others + 1)]
    members = [Membership(s, settings, host="127.0.0.1", nproc=1, health_addr=f"x:{i}",
                          node_id=f"n{i:02d}") for i, s in enumerate(stores)]
    try:
        for m in members[:others]:
            m.store.watch(lambda: None)  # as the agent does: watching, then joining
            m.join()

        def settled(group, size):
            for m in group:
                m.step()
            return all((r := m.store.snapshot().round) is not None and len(r.node_ids) == size
                       for m in group)

        assert wait_until(lambda: settled(members[:others], others), timeout=30)
        for m in members[:others]:
            m.store._client = CountingClient(m.store._client)
        newcomer = members[others]
        newcomer.store._client = CountingClient(newcomer.store._client)
        newcomer.store.watch(lambda: None)
        newcomer.join()
        assert wait_until(lambda: settled(members, others + 1), timeout=30)
        calls = {m.node_id: m.store._client.calls for m in members[:others]}
        leader = members[0].store.snapshot().leader
        assert leader in calls
        assert {nid: c for nid, c in calls.items() if nid != leader and c} == {}
        assert calls[leader] == ["transaction"]  # the round's compare-and-swap, read back
        # One read of the job to start the watch; the spec, a lease, the registration.
        assert sorted(newcomer.store._client.calls) == [
            "get_prefix_response", "lease", "put", "transaction"], newcomer.store._client.calls
    finally:
        for m in members:
            m.leave()
        stores[0].delete_job()
        for s in stores:
            s.close()
