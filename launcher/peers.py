"""Watching the other agents: a background prober that removes dead nodes at once.

Every `interval` it probes the health endpoint (rendezvous.liveness) of the next PROBED_PEERS
registered nodes after its own on a ring ordered by a hash of the node ids: so each node is watched
by that many others and the whole job sends PROBED_PEERS probes per node per interval, not one
per pair of nodes (a million a second at 1,000 nodes). A node found dead has its lease revoked,
which deletes its registration, so the leader publishes a round without it long before the lease
would have expired; the ring then closes over the gap, so neighbours that die together are found
one after the other. After a collective error the agent asks for every member of its round to
be probed at once (`remove_dead`), to tell a dead peer from a failure of its own.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import random
import threading
from bisect import bisect_right
from typing import Callable, Iterable, List, Optional

from rendezvous.api import NodeInfo, RendezvousConnectionError
from rendezvous.liveness import ALIVE, DEAD, Prober, probe
from rendezvous.membership import Membership
from rendezvous.store import Snapshot

from .health import PeerWatch

log = logging.getLogger(__name__)

PROBED_PEERS = 2  # each node probes this many ring successors


@functools.lru_cache(maxsize=1 << 16)
def _place(node_id: str) -> str:
    """A node's place on the ring: a hash of its id, so that the nodes of one rack or host name
    prefix (node ids start with the host name), which tend to fail together, are spread out."""
    return hashlib.sha1(node_id.encode()).hexdigest()


def ring(node_ids: Iterable[str]) -> List[tuple]:
    """The nodes in ring order: (place, id) each."""
    return sorted((_place(nid), nid) for nid in set(node_ids))


def successors(ordered: List[tuple], me: str, count: int = PROBED_PEERS) -> List[str]:
    """The `count` nodes after `me` on a `ring()`, wrapping around (fewer if it is smaller)."""
    start = bisect_right(ordered, (_place(me), me))
    found: List[str] = []
    for i in range(len(ordered)):
        if len(found) == count:
            break
        nid = ordered[(start + i) % len(ordered)][1]
        if nid != me:
            found.append(nid)
    return found


def ring_successors(node_ids: Iterable[str], me: str, count: int = PROBED_PEERS) -> List[str]:
    """The `count` nodes after `me` on the ring, wrapping around (fewer if the job is smaller)."""
    return successors(ring(node_ids), me, count)


class PeerMonitor:
    def __init__(self, membership: Membership, interval: float, wake: Callable[[], None],
                 probed_peers: int = PROBED_PEERS):
        self._membership = membership
        self._interval = interval
        self._probed_peers = probed_peers
        self._wake = wake
        self._watch = PeerWatch()
        self._prober = Prober()  # only the probing thread uses it
        self._stop = threading.Event()
        self._snapshot: Optional[Snapshot] = None
        self._ring: tuple = (None, [])  # (the nodes mapping it was made of, the ring)
        self._thread = threading.Thread(target=self._loop, name="peer-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def update(self, snap: Snapshot) -> None:
        self._snapshot = snap

    def _others(self, snap: Snapshot, among: Optional[Iterable[str]] = None):
        me = self._membership.node_id
        wanted = set(among) if among is not None else None
        return [info for nid, info in snap.nodes.items()
                if nid != me and (wanted is None or nid in wanted)]

    def remove_dead(self, snap: Snapshot, among: Optional[Iterable[str]] = None) -> bool:
        """Probe now (after a collective error); True if some node of `among` is gone: found
        dead and removed here, or already removed (by lease expiry or another prober)."""
        removed = among is not None and any(nid not in snap.nodes for nid in among)
        for info in self._others(snap, among):
            if probe(info.health_addr, info.node_id) == DEAD:
                self._remove(info)
                removed = True
        return removed

    def _remove(self, info: NodeInfo) -> None:
        try:
            self._membership.remove_dead_peer(info)
        except RendezvousConnectionError as exc:
            log.warning("could not remove node %s: %s", info.node_id, exc)
        self._watch.forget(info.node_id)

    def _loop(self) -> None:
        # A random phase: agents started together would otherwise probe in the same instant,
        # and a node's probers would all look at it late, together.
        if self._stop.wait(random.uniform(0.0, self._interval)):
            return
        while not self._stop.wait(self._interval):
            snap = self._snapshot
            if snap is None:
                continue
            if self._ring[0] is not snap.nodes:  # the mirror's snapshot is kept until a change
                self._ring = (snap.nodes, ring(snap.nodes))
            watched = successors(self._ring[1], self._membership.node_id, self._probed_peers)
            self._watch.retain(watched)  # misses of a node probed earlier do not carry over
            self._prober.retain(watched)
            for info in [snap.nodes[nid] for nid in watched if nid in snap.nodes]:
                if self._stop.is_set():
                    break
                result = self._prober.probe(info.health_addr, info.node_id)
                if self._watch.record(info.node_id, result):
                    self._remove(info)
                    self._wake()
                elif result != ALIVE:
                    log.info("node %s did not answer its health probe (%s)", info.node_id, result)
        self._prober.close()
