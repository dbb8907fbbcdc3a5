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
    ids = ["a", "b", "c", "d", "e", "f"]
    assert ring_successors(ids, "b") == ["c", "d"]
    assert ring_successors(ids, "f") == ["a", "b"]  # wraps around
    # c and d died together and are removed: b now watches e, which it never probed before.
    alive = [n for n in ids if n not in ("c", "d")]
    assert ring_successors(alive, "b") == ["e", "f"]
    # A node not yet in the registration list still gets its place in the ring.
    assert ring_successors(alive, "bb") == ["e", "f"]
