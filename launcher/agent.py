"""The per-node agent: follows the rounds in etcd and keeps this node's workers in the current world.

One loop on the main thread (workers must be forked from a long-lived thread, see workers.py):
read the job from etcd, lead if we are the leader, start or stop workers when the round changes,
watch the workers, and leave on SIGINT/SIGTERM. A background thread probes the other agents'
health endpoints so a dead node is removed long before its lease expires.
"""
from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from elastic.policy import BatchPolicy, BatchPolicyError
from rendezvous.api import JobOutcome, RendezvousConnectionError, RendezvousSettings, Round
from rendezvous.decision import FailureReport
from rendezvous.membership import Membership, new_node_id
from rendezvous.store import EtcdStore, Snapshot

from .events import EventLog
from .health import ALIVE, DEAD, HealthServer, PeerWatch, probe
from .workers import WorkerGroup, WorkerSpec, WorldAssignment

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
# After another node reports success, our workers are in their last steps; give them this long.
FINISH_GRACE_S = 60.0


@dataclass(frozen=True)
class AgentConfig:
    settings: RendezvousSettings
    workers: WorkerSpec
    host: str
    monitor_interval: float = 0.1
    probe_interval: float = PROBE_INTERVAL_S
    master_port: Optional[int] = None  # rank-0 store port when this node holds rank 0
    batch_policy: Optional[BatchPolicy] = None  # its plan for each round goes to the workers' env


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ElasticAgent:
    def __init__(self, config: AgentConfig, store: EtcdStore, events_path: Optional[str] = None,
                 node_id: Optional[str] = None):
        self.config = config
        self.store = store
        self.node_id = node_id or new_node_id()
        self._health = HealthServer(config.host, self.node_id)
        self.membership = Membership(
            store, config.settings, host=config.host, nproc=config.workers.nproc,
            health_addr=self._health.addr, node_id=self.node_id)
        self.events = EventLog(events_path, self.node_id)
        self.workers = WorkerGroup(config.workers)
        self._wake = threading.Event()
        self._signal: Optional[int] = None
        self._round: Optional[Round] = None      # the round our workers belong to (or wait in)
        self._pending: Optional[Round] = None    # a round we are a member of but not running yet
        self._failed_round: Optional[int] = None
        self._seen_rounds = 0
        self._last_snapshot: Optional[Snapshot] = None
        self._peers = PeerWatch()
        self._stop_probing = threading.Event()

    # -- entry point -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until the job ends or we are told to stop; return the exit code for the agent."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        prober = threading.Thread(target=self._probe_loop, name="peer-probe", daemon=True)
        try:
            self.membership.join()
            self.store.watch(self._wake.set)
            prober.start()
            return self._loop()
        finally:
            self._stop_probing.set()
            self.workers.stop()
            self.membership.leave()
            self._health.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        self._signal = signum
        self._wake.set()

    def _loop(self) -> int:
        while True:
            if self._signal is not None:
                return self._leave_on_signal(self._signal)
            snap, action, wake_at = self.membership.step()
            self._last_snapshot = snap
            if action is not None:
                self._record_leader_action(action)
            if snap.outcome is not None:
                return self._finish(snap.outcome)
            self._follow_round(snap)
            self._check_workers(snap)
            timeout = self.config.monitor_interval
            if wake_at is not None:
                timeout = max(0.0, min(timeout, wake_at - time.time()))
            self._wake.wait(timeout)
            self._wake.clear()

    # -- rounds ----------------------------------------------------------------------------
    def _follow_round(self, snap: Snapshot) -> None:
        rnd = snap.round
        if rnd is None:
            return
        if self._round is None or rnd.number != self._round.number:
            self._round = rnd
            member = rnd.active and self.node_id in rnd.node_ids
            self.workers.stop(grace_period_s=min(self.config.workers.grace_period_s, 2.0))
            self._pending = rnd if member else None
            if not member:
                self.events.emit("waiting", round=rnd.number, world_size=rnd.world_size,
                                 members=list(rnd.node_ids), cause=rnd.cause)
        if self._pending is not None:
            self._start_workers(snap, self._pending)

    def _start_workers(self, snap: Snapshot, rnd: Round) -> None:
        group_rank = rnd.group_rank(self.node_id)
        master = snap.masters.get(rnd.number)
        if master is None:
            if group_rank != 0:
                return  # rank 0's agent publishes the store address; the watch wakes us
            port = self.config.master_port or free_port(self.config.host)
            master = f"{self.config.host}:{port}"
            self.membership.publish_master(rnd.number, master)
        addr, _, port = master.rpartition(":")
        try:
            policy = self.config.batch_policy
            plan_env = policy.plan(rnd.world_size).to_env() if policy else {}
        except BatchPolicyError as exc:
            self.membership.finish(JobOutcome(status="failed", node_id=self.node_id, exit_code=1,
                                              reason=f"world of {rnd.world_size}: {exc}"))
            self._pending = None
            return
        self.workers.start(WorldAssignment(
            run_id=self.config.settings.run_id, round=rnd.number, group_rank=group_rank,
            group_world_size=len(rnd.members), rank_offset=rnd.rank_offset(self.node_id),
            world_size=rnd.world_size, master_addr=addr, master_port=int(port),
            restart_count=rnd.restart_count, max_restarts=self.config.settings.max_restarts,
            env=plan_env,
        ))
        self._pending = None
        first = self._seen_rounds == 0
        self._seen_rounds += 1
        fields = dict(round=rnd.number, world_size=rnd.world_size, members=list(rnd.node_ids),
                      cause=rnd.cause)
        if first:
            self.events.emit("rendezvous", **fields)
        else:
            self.events.emit("rescale", duration_s=round(time.time() - rnd.cause_time, 3),
                             restart_count=rnd.restart_count, **fields)

    def _record_leader_action(self, action) -> None:
        if action.kind == "published" and action.detail.departed:
            rnd = action.detail.round
            self.events.emit("node_left", round=rnd.number, world_size=rnd.world_size,
                             members=list(rnd.node_ids), cause="removed",
                             nodes=list(action.detail.departed))

    # -- workers ---------------------------------------------------------------------------
    def _check_workers(self, snap: Snapshot) -> None:
        if self._round is None or not self.workers.running:
            return
        state = self.workers.poll()
        if state.status == "succeeded":
            self.membership.finish(JobOutcome(status="succeeded", node_id=self.node_id))
            self._wake.set()
        elif state.status == "failed":
            self._on_worker_failure(snap, state.failure)

    def _on_worker_failure(self, snap: Snapshot, failure) -> None:
        rnd = self._round
        self.events.emit("worker_failed", round=rnd.number, world_size=rnd.world_size,
                         members=list(rnd.node_ids), cause="exit", rank=failure.rank,
                         exit_code=failure.exitcode, pid=failure.pid)
        self.workers.stop(grace_period_s=min(self.config.workers.grace_period_s, 2.0))
        # A peer's death shows up here as a collective error. If a peer is dead, removing it is
        # a membership change, not a failure of ours, and costs no restart.
        if self._remove_dead_peers(snap, only_members_of=rnd):
            return
        self.membership.report_failure(rnd.number, FailureReport(
            node_id=self.node_id, time=failure.time, description=failure.describe(),
            exit_code=failure.exitcode if failure.exitcode > 0 else 1,
            traceback=failure.traceback))

    def _remove_dead_peers(self, snap: Snapshot, only_members_of: Optional[Round] = None) -> bool:
        removed = False
        for nid, info in snap.nodes.items():
            if nid == self.node_id or (only_members_of and nid not in only_members_of.node_ids):
                continue
            if probe(info.health_addr, nid) == DEAD:
                self._remove(info)
                removed = True
        return removed

    def _remove(self, info) -> None:
        try:
            self.membership.remove_dead_peer(info)
        except RendezvousConnectionError as exc:
            log.warning("could not remove node %s: %s", info.node_id, exc)
        self._peers.forget(info.node_id)

    def _probe_loop(self) -> None:
        while not self._stop_probing.wait(self.config.probe_interval):
            snap = self._last_snapshot
            if snap is None:
                continue
            for nid, info in snap.nodes.items():
                if nid == self.node_id or self._stop_probing.is_set():
                    continue
                result = probe(info.health_addr, nid)
                if self._peers.record(nid, result):
                    self._remove(info)
                    self._wake.set()
                elif result != ALIVE:
                    log.info("node %s did not answer its health probe (%s)", nid, result)

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, outcome: JobOutcome) -> int:
        rnd = self._round
        fields = dict(round=rnd.number if rnd else None, world_size=rnd.world_size if rnd else 0,
                      members=list(rnd.node_ids) if rnd else [])
        if outcome.status == "succeeded":
            code = self._wait_for_workers()
            self.events.emit("job_finished", exit_code=code, cause="workers_succeeded", **fields)
            return code
        self.workers.stop()
        print(f"error: job failed: {outcome.reason}", file=sys.stderr, flush=True)
        tb = (outcome.details or {}).get("traceback")
        if tb and outcome.node_id == self.node_id:
            print(tb.rstrip(), file=sys.stderr, flush=True)
        self.events.emit("job_failed", exit_code=outcome.exit_code or 1, reason=outcome.reason,
                         cause="job_failed", **fields)
        return outcome.exit_code or 1

    def _wait_for_workers(self) -> int:
        deadline = time.time() + FINISH_GRACE_S
        while self.workers.running and time.time() < deadline and self._signal is None:
            state = self.workers.poll()
            if state.status == "succeeded":
                return 0
            if state.status == "failed":
                return 1
            time.sleep(self.config.monitor_interval)
        if self.workers.running:
            self.workers.stop()
            return 1
        return 0

    def _leave_on_signal(self, signum: int) -> int:
        name = signal.Signals(signum).name
        rnd = self._round
        # Leave first so the others shrink without us at once; then stop our workers.
        self.membership.leave()
        self.events.emit("node_left", round=rnd.number if rnd else None,
                         world_size=rnd.world_size if rnd else 0,
                         members=list(rnd.node_ids) if rnd else [], cause=name.lower())
        self.workers.stop(sig=signum)
        print(f"agent {self.node_id} stopped by {name}; left the job", file=sys.stderr, flush=True)
        return 128 + signum
