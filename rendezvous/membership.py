"""One node's membership in a job: registration under a lease, keep-alive, leadership.

The agent calls `step()` from its loop. Every node campaigns for leadership when the leader key
is free; the leader turns one etcd snapshot into a `View`, asks `decide` what to do, and applies
the answer with a compare-and-swap. Nothing here spawns processes or knows about torch.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional

from .api import (DEFAULT_RETENTION_S, JobMismatchError, JobOutcome, JobSpec, NodeInfo,
                  RendezvousConnectionError, RendezvousSettings)
from .decision import Fail, FailureReport, Publish, View, decide
from .store import EtcdStore, Snapshot

log = logging.getLogger(__name__)

# Keep-alive is sent this many times per TTL, so one lost refresh never costs the lease.
REFRESHES_PER_TTL = 3


def new_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LeaderAction:
    """What the leader did in one step, for the agent's event log."""

    kind: str  # "published" or "failed"
    detail: object


class Membership:
    def __init__(self, store: EtcdStore, settings: RendezvousSettings, *, host: str, nproc: int,
                 health_addr: str, node_id: Optional[str] = None,
                 clock: Callable[[], float] = time.time, rank_hint: Optional[int] = None,
                 labels: Optional[Mapping[str, str]] = None,
                 agreed: Optional[Mapping[str, Any]] = None,
                 retention_s: float = DEFAULT_RETENTION_S):
        self.store = store
        self.settings = settings
        self.node_id = node_id or new_node_id()
        self._host, self._nproc, self._health_addr = host, nproc, health_addr
        self._rank_hint = rank_hint
        self._labels = dict(labels or {})
        self._agreed = dict(agreed or {})
        self._retention_s = retention_s
        self._clock = clock
        self._lease_id: Optional[int] = None
        self._first_seen: Dict[str, float] = {}
        self._stop = threading.Event()
        self._keepalive: Optional[threading.Thread] = None
        self.spec: Optional[JobSpec] = None

    # -- joining and leaving -------------------------------------------------------------
    def join(self) -> None:
        """Register this node in its job, creating the job if it is new.

        Raises:
            JobMismatchError: the job runs with other job-wide settings (`agreed`) than ours.
        """
        if self.store.abandoned():
            # No live node holds this run id: whatever is stored is a finished or abandoned job.
            # Reusing the id starts a new job, as with torchrun.
            self.store.delete_job()
        self.spec = self.store.ensure_spec(JobSpec(
            min_nodes=self.settings.min_nodes, max_nodes=self.settings.max_nodes,
            created_at=self._clock(), agreed=self._agreed, retention_s=self._retention_s))
        differences = [f"{key}={self.spec.agreed[key]!r} (this agent: {mine!r})"
                       for key, mine in self._agreed.items()
                       if key in self.spec.agreed and self.spec.agreed[key] != mine]
        if differences:
            raise JobMismatchError(
                f"job {self.settings.run_id!r} runs with {'; '.join(differences)}; start every "
                "node of a job with the same flags")
        self._register()
        self._keepalive = threading.Thread(target=self._keep_alive, name="lease-keepalive",
                                           daemon=True)
        self._keepalive.start()

    def _register(self) -> None:
        self._lease_id = self.store.grant_lease(self.settings.lease_ttl)
        self._joined_at = self._clock()
        self.store.register(self._node_info())

    def _node_info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id, host=self._host, nproc=self._nproc,
            health_addr=self._health_addr, lease_id=self._lease_id, joined_at=self._joined_at,
            rank_hint=self._rank_hint, labels=self._labels,
        )

    def _keep_alive(self) -> None:
        interval = self.settings.lease_ttl / REFRESHES_PER_TTL
        while not self._stop.wait(interval):
            try:
                if not self.store.refresh_lease(self._lease_id):
                    # Our lease expired (we were paused or cut off) and the others removed us.
                    # Register again: we come back as a newcomer.
                    log.warning("node %s lost its lease; registering again", self.node_id)
                    self._register()
            except RendezvousConnectionError as exc:
                log.warning("lease keep-alive failed: %s", exc)

    def leave(self) -> None:
        """Leave at once: revoking the lease deletes our registration (and leadership)."""
        self._stop.set()
        if self._lease_id is not None:
            try:
                self.store.revoke_lease(self._lease_id)
            except RendezvousConnectionError as exc:
                log.warning("could not leave the rendezvous cleanly: %s", exc)
            self._lease_id = None

    def remove_dead_peer(self, info: NodeInfo) -> None:
        """Fast path for a node whose agent is gone: revoke its lease instead of waiting for TTL."""
        log.warning("node %s does not answer its health endpoint; removing it", info.node_id)
        self.store.revoke_lease(info.lease_id)

    # -- each loop iteration -------------------------------------------------------------
    def step(self) -> "tuple[Snapshot, Optional[LeaderAction], Optional[float]]":
        """Read the job; lead if we can. Returns the snapshot, what the leader did, and when
        the leader wants to look again (None: on the next change)."""
        snap = self.store.snapshot()
        if self._lease_id is not None and self.node_id not in snap.nodes and not self._stop.is_set():
            # Our key is gone while our lease lives (a concurrent job reset): put it back.
            self.store.register(self._node_info())
            snap = self.store.snapshot()
        if snap.leader is None and self._lease_id is not None and self.node_id in snap.nodes:
            if self.store.campaign(self.node_id, self._lease_id):
                log.info("node %s is now the rendezvous leader", self.node_id)
                snap = self.store.snapshot()
        if snap.leader != self.node_id:
            self._first_seen.clear()
            return snap, None, None
        return self._lead(snap)

    def _lead(self, snap: Snapshot):
        now = self._clock()
        for nid, info in snap.nodes.items():
            self._first_seen.setdefault(nid, min(now, info.joined_at))
        for nid in list(self._first_seen):
            if nid not in snap.nodes:
                del self._first_seen[nid]
        spec = snap.spec or self.spec
        settings = self.settings
        if spec:
            settings = type(settings)(**{**settings.__dict__, "min_nodes": spec.min_nodes,
                                         "max_nodes": spec.max_nodes})
        view = View(
            now=now, nodes=snap.nodes, first_seen=dict(self._first_seen),
            created_at=spec.created_at if spec else now, round=snap.round,
            failures=snap.failures_for(snap.round.number) if snap.round else (),
            outcome=snap.outcome, desired=spec.desired if spec else None,
            released=frozenset(snap.released), stopping=snap.stop is not None,
        )
        decision = decide(view, settings)
        if isinstance(decision, Publish):
            if self.store.publish_round(decision.round, snap.round_revision, self.node_id):
                log.info("published round %d: %s (cause %s)", decision.round.number,
                         ", ".join(decision.round.node_ids), decision.round.cause)
                return self.store.snapshot(), LeaderAction("published", decision), None
            return snap, None, None
        if isinstance(decision, Fail):
            outcome = self.store.set_outcome(decision.outcome)
            return self.store.snapshot(), LeaderAction("failed", outcome), None
        return snap, None, decision.wake_at

    # -- reports from this node ----------------------------------------------------------
    def report_failure(self, number: int, report: FailureReport) -> None:
        self.store.report_failure(number, report)

    def finish(self, outcome: JobOutcome) -> JobOutcome:
        if not outcome.time:
            outcome = replace(outcome, time=self._clock())
        return self.store.set_outcome(outcome)

    def publish_master(self, number: int, addr: str) -> None:
        self.store.put_master(number, addr)
