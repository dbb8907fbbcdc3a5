"""Which peers each agent probes: a ring, so the job's probes grow as N, not N^2."""
from collections import Counter

import pytest

from launcher.peers import ring_successors


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000])
def test_every_node_is_watched_by_as_many_peers_as_each_probes(n):
    ids = [f"host{i:04d}-1-abc" for i in range(n)]
    probes = {me: ring_successors(ids, me) for me in ids}
    assert sum(len(p) for p in probes.values()) == n * min(2, n - 1)  # linear in n
    watched_by = Counter(nid for p in probes.values() for nid in p)
    assert all(watched_by[nid] == min(2, n - 1) for nid in ids)
    assert all(me not in p for me, p in probes.items())


def test_the_ring_closes_over_dead_neighbours():
    ids = [f"rack1-host{i}" for i in range(8)]
    first, second, third, fourth = ring_successors(ids, ids[0], count=4)
    # The two it watches die and are removed: it now watches the next two, never probed before.
    alive = [n for n in ids if n not in (first, second)]
    assert ring_successors(alive, ids[0]) == [third, fourth]
    # A node not yet in the registration list still gets its place in the ring.
    assert len(ring_successors(alive, "newcomer")) == 2


def test_neighbours_by_name_are_not_neighbours_on_the_ring():
    """Host names of one rack sort together; the ring is ordered by a hash, so a dead rack's
    nodes are watched by nodes elsewhere, not only by each other."""
    ids = [f"rack{r}-host{h:02d}" for r in range(4) for h in range(16)]
    same_rack = sum(ring_successors(ids, me)[0].split("-")[0] == me.split("-")[0] for me in ids)
    assert same_rack < len(ids) / 2  # by name order it would be 60 of 64


def test_a_kept_probe_connection_still_tells_a_dead_agent_from_a_live_one():
    """One connection per peer stays open between probes; when the agent behind it dies, the
    next probe says so (its port refuses) rather than reporting a broken connection."""
    from launcher.health import HealthServer
    from rendezvous.liveness import ALIVE, DEAD, Prober

    server = HealthServer("127.0.0.1", "node-a")
    prober = Prober(timeout=2.0)
    try:
        assert [prober.probe(server.addr, "node-a") for _ in range(3)] == [ALIVE] * 3
        assert prober.probe(server.addr, "node-b") == DEAD  # someone else on that port
        (kept,) = prober._kept.values()
        assert kept[1].sock is not None  # the live peer's connection is still open
    finally:
        server.close()
    assert prober.probe(server.addr, "node-a") == DEAD
    prober.close()
