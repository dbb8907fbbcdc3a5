"""The per-node agent: the executor of `launcher.decision` against etcd and this node's workers.

One loop on the main thread (workers must be forked from a long-lived thread, see workers.py).
Each pass reads the job from etcd (leading if this node is the leader), builds an `AgentView`
(the job, the workers' status and messages, the time), asks `decide` what to do with the one
`AgentState` it keeps, and applies the actions: events, reports, worker starts and stops, rounds
pushed in place. Whatever the workers run is behind a `launcher.backend.WorkerBackend`, chosen
by whoever builds the agent. Two ends are sequences rather than decisions: the job's outcome
(wait for the workers, or stop them and say why) and a preemption notice (leave at once, let
in-place workers finish the step with the others, stop what is left at the deadline).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

from elastic.policy import BatchPolicy
from rendezvous.api import (DEFAULT_RETENTION_S, JobOutcome, RendezvousConnectionError,
                            RendezvousSettings, RendezvousTimeoutError)
from rendezvous.membership import Membership, new_node_id
from rendezvous.store import JobStore, Snapshot

from . import decision as d
from .backend import WorkerBackend
from .events import (EtcdEventHistory, EtcdReconnected, EtcdUnreachable, EventBus, EventLogFile,
                     JobFailed, JobFinished, Joined, NodeLeft, PreemptionNotice)
from .health import HealthServer
from .metrics import AgentMetrics
from .network import free_port, gloo_env, interface_warning
from .peers import PeerMonitor
from .preemption import Notice, NoticeConfig, NoticeWatcher
from .workers import WorkerSpec

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
# After another node reports success, our workers are in their last steps; give them this long.
FINISH_GRACE_S = 60.0
RESCALE_MODES = ("auto", "restart", "in-place")
ETCD_RETRY_S = 0.5
LEAVE_MARGIN_S = 2.0  # of a notice's grace period, kept for stopping leftover workers
MAX_DECISIONS_PER_PASS = 4  # a pass decides again after publishing rank 0's store address

# (spec, node id, wake) -> the node's worker backend
BackendFactory = Callable[[WorkerSpec, str, Callable[[], None]], WorkerBackend]


@dataclass(frozen=True)
class AgentConfig:
    settings: RendezvousSettings
    workers: WorkerSpec
    host: str
    monitor_interval: float = 0.1
    probe_interval: float = PROBE_INTERVAL_S
    master_port: Optional[int] = None  # rank-0 store port when this node holds rank 0
    batch_policy: Optional[BatchPolicy] = None  # its plan for each round goes to the workers' env
    rescale_mode: str = "auto"  # auto: in place once the workers use the API, else restart
    hang_timeout: Optional[float] = None  # kill in-place workers with no progress for this long
    notices: Optional[NoticeConfig] = None  # preemption notice sources besides SIGTERM/SIGINT
    rank_hint: Optional[int] = None  # --node-rank: this node's place among nodes joining together
    endpoint: str = ""  # where the rendezvous is, for messages
    labels: Mapping[str, str] = field(default_factory=dict)  # --node-label
    agreed: Mapping[str, Any] = field(default_factory=dict)  # what every node of the job shares
    retention_s: float = DEFAULT_RETENTION_S  # a finished job's keys are kept this long
    stay_as_spare: bool = False  # released: stay registered as a spare instead of exiting

    def __post_init__(self) -> None:
        if self.rescale_mode not in RESCALE_MODES:
            raise ValueError(f"rescale mode {self.rescale_mode!r} is not one of "
                             f"{', '.join(RESCALE_MODES)}")


class ElasticAgent:
    def __init__(self, config: AgentConfig, store: JobStore, backend: BackendFactory,
                 events_path: Optional[str] = None, node_id: Optional[str] = None):
        self.config = config
        self.store = store
        self.node_id = node_id or new_node_id()
        self._wake = threading.Event()
        self.metrics = AgentMetrics(config.settings.run_id, self.node_id, config.host)
        self._health = HealthServer(config.host, self.node_id, self.metrics.render)
        self.membership = Membership(
            store, config.settings, host=config.host, nproc=config.workers.nproc,
            health_addr=self._health.addr, node_id=self.node_id, rank_hint=config.rank_hint,
            labels=config.labels, agreed=config.agreed, retention_s=config.retention_s)
        self.events = EventBus(self.node_id)
        self.events.subscribe(self.metrics)
        if events_path:
            self.events.subscribe(EventLogFile(events_path))
        self._history = EtcdEventHistory(store, self.node_id)
        self.events.subscribe(self._history)
        # gloo listens on, and tells peers, the interface of this node's address (`lo` for a
        # job on loopback), not the one the host name resolves to.
        spec = config.workers
        spec = replace(spec, extra_env={**gloo_env(config.host, os.environ), **spec.extra_env})
        warning = interface_warning(config.host, config.settings.max_nodes > 1, os.environ)
        if warning:
            log.warning("%s", warning)
        self.backend = backend(spec, self.node_id, self._wake.set)
        self.decisions = d.AgentSettings(
            node_id=self.node_id, rendezvous=config.settings, traits=self.backend.traits,
            rescale_mode=config.rescale_mode, endpoint=config.endpoint,
            hang_timeout=config.hang_timeout, batch_policy=config.batch_policy,
            stay_as_spare=config.stay_as_spare)
        self.state = d.AgentState()
        self.peers = PeerMonitor(self.membership, config.probe_interval, self._wake.set)
        self._signal: Optional[int] = None
        self._notice: Optional[Notice] = None
        self._snapshot: Optional[Snapshot] = None
        self.notices = NoticeWatcher(config.notices or NoticeConfig(), self._on_notice)
        self._etcd_down_since: Optional[float] = None
        self._started_at = time.time()

    # -- entry point -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until the job ends or we are told to stop; return the exit code for the agent."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.notices.start()  # a notice during pre-warming means: never join
            # Watching first: the job is read once, and every later read is the watch's mirror.
            self.store.watch(self._wake.set)
            prewarmed = d.should_prewarm(self.backend.traits, self.store.snapshot().in_place)
            if prewarmed:
                self._prewarm()
            else:
                self._ready_to_fork()
            if self._notice is not None:
                if self._notice.exit_code:  # a fault, not a departure asked for: say which
                    print(f"agent {self.node_id} did not join ({self._notice.source}): "
                          f"{self._notice.detail}", file=sys.stderr, flush=True)
                return 128 + self._signal if self._signal else self._notice.exit_code
            self.membership.join()
            self.events.emit(Joined(cause="prewarmed" if prewarmed else "start"))
            self.peers.start()
            return self._loop()
        finally:
            self.notices.stop()
            self.peers.stop()
            self.backend.close()
            self._history.close()
            self.membership.leave()
            self._health.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        # SIGTERM/SIGINT are preemption notices too: leave at once, let the workers finish.
        self._signal = signum
        self.notices.notify_signal(signal.Signals(signum).name.lower())
        self._wake.set()

    def _on_notice(self, notice: Notice) -> None:
        self._notice = notice
        self._wake.set()

    def _ready_to_fork(self) -> None:
        """A newcomer to a running job registers once its zygote can fork its workers, so the
        members restarted for the new round wait for its rendezvous, not for its imports. A
        node of a job with no round yet registers at once: its imports overlap the first one."""
        rnd = self.store.snapshot().round
        if rnd is not None and rnd.active:
            self.backend.prepare()

    def _prewarm(self) -> None:
        """Start the workers in standby and wait until they are ready for a world."""
        self.backend.start(None)
        deadline = time.time() + self.config.settings.join_timeout
        while self._notice is None:
            self.backend.drain()
            status = self.backend.status()
            if status.all_ready:
                break
            if status.state != "running":
                reason = status.failure.describe() if status.failure else "exited before a round"
                raise RendezvousTimeoutError(f"worker did not get ready in standby: {reason}")
            if time.time() > deadline:
                raise RendezvousTimeoutError(
                    "workers were not ready in standby within join_timeout; do they call "
                    "integrations.torch.run? (or pass --rescale-mode restart)")
            self._wake.wait(self.config.monitor_interval)
            self._wake.clear()
        log.info("node %s: %d workers pre-warmed in standby", self.node_id,
                 self.config.workers.nproc)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            if self._notice is not None:
                return self._leave(self._notice)
            try:
                snap, leader, wake_at = self.membership.step()
                self._snapshot = snap
                if self._etcd_down_since is not None:
                    self._etcd_back()
                self.peers.update(snap)
                if leader is not None and leader.kind == "published":
                    self._apply(d.leader_actions(leader.detail))
                if snap.outcome is not None:
                    return self._finish(snap.outcome)
                pass_wake = self._pass(snap)
            except RendezvousConnectionError as exc:
                # Training goes on in the current world; rounds resume when etcd is back.
                self._etcd_unreachable(exc)
                self._wake.wait(ETCD_RETRY_S)
                self._wake.clear()
                continue
            timeout = self.config.monitor_interval
            for when in (wake_at, pass_wake):
                if when is not None:
                    timeout = max(0.0, min(timeout, when - time.time()))
            self._wake.wait(timeout)
            self._wake.clear()

    def _pass(self, snap: Snapshot) -> Optional[float]:
        """Decide and act on one reading of the job (again, when the decision asks); return when
        the decisions want to look again."""
        messages = tuple(self.backend.drain())  # first: the status reflects what they said
        self.metrics.messages(messages)
        for _ in range(MAX_DECISIONS_PER_PASS):
            view = d.AgentView(now=time.time(), snapshot=snap, workers=self.backend.status(),
                               messages=messages, failure_hint=self.backend.failure_hint())
            among = d.probe_for(view, self.state)
            if among is not None:
                view = replace(view, peer_gone=self.peers.remove_dead(snap, among=among))
            step = d.decide(view, self.state, self.decisions)
            self.state = step.state
            self._apply(step.actions)
            if not step.again:
                return step.wake_at
            snap, messages = self.store.snapshot(), ()
            self._snapshot = snap
        return None

    def _apply(self, actions) -> None:
        for action in actions:
            if isinstance(action, d.Emit):
                event = action.event
                if action.timed_from is not None:
                    event = replace(event, duration_s=round(time.time() - action.timed_from, 3))
                self.events.emit(event)
            elif isinstance(action, d.Say):
                log.log(action.level, "%s", action.text)
            elif isinstance(action, d.StopWorkers):
                self._stop_workers(action.grace, action.sig)
            elif isinstance(action, d.StartWorkers):
                self.backend.start(action.assignment)
            elif isinstance(action, d.PushRound):
                self.backend.push_round(action.assignment)
            elif isinstance(action, d.PushStandby):
                self.backend.push_standby(action.round)
            elif isinstance(action, d.PushLeave):
                self.backend.push_leave(checkpoint=action.checkpoint)
            elif isinstance(action, d.LeaveJob):
                now = time.time()
                grace = (self.config.notices or NoticeConfig()).default_grace
                self._on_notice(Notice(source=action.source, detail=action.detail,
                                       deadline=now + grace, received_at=now))
            elif isinstance(action, d.ClearRelease):
                self.store.clear_release(self.node_id)
            elif isinstance(action, d.SignalWorker):
                self.backend.signal(action.pid, action.sig)
            elif isinstance(action, d.ReportFailure):
                self.membership.report_failure(action.round, action.report)
            elif isinstance(action, d.PublishMaster):
                port = self.config.master_port or free_port(self.config.host)
                self.membership.publish_master(action.round, f"{self.config.host}:{port}")
            elif isinstance(action, d.MarkInPlace):
                self.store.mark_in_place()
            elif isinstance(action, d.Finish):
                self.membership.finish(action.outcome)
                self._wake.set()
            else:
                raise TypeError(f"unknown action {action!r}")

    def _stop_workers(self, grace: Optional[float] = None, sig: int = signal.SIGTERM) -> None:
        if grace is not None:
            grace = min(self.config.workers.grace_period_s, grace)
        self.backend.stop(sig=sig, grace=grace)

    def _etcd_unreachable(self, exc: Exception) -> None:
        if self._etcd_down_since is None:
            self._etcd_down_since = time.time()
            rnd = self.state.applied
            log.warning("etcd unreachable; the workers keep training in round %s: %s",
                        rnd.number if rnd else None, exc)
            self.events.emit(EtcdUnreachable(round=rnd.number if rnd else None,
                                             cause=str(exc)[:200]))

    def _etcd_back(self) -> None:
        down = time.time() - self._etcd_down_since
        self.store.rewatch(self._wake.set)
        self._etcd_down_since = None
        log.warning("etcd is back after %.1f s", down)
        rnd = self.state.applied
        self.events.emit(EtcdReconnected(round=rnd.number if rnd else None,
                                         duration_s=round(down, 3)))

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, outcome: JobOutcome) -> int:
        fields = d.round_fields(self.state.applied)
        if outcome.status in ("succeeded", "stopped"):
            applied = self.state.applied
            if applied is None or self.node_id not in applied.node_ids:
                # A spare (workers pre-warmed in standby, or none): nothing of ours to finish.
                self._stop_workers(grace=d.RESTART_GRACE_S)
            code = self._wait_for_workers(FINISH_GRACE_S)
            if outcome.status == "stopped" and code == 1 and self.state.stopping == "draining":
                code = 0  # stopped workers may exit as they like; the job ended as asked
            cause = "workers_succeeded" if outcome.status == "succeeded" else "stopped"
            self.events.emit(JobFinished(exit_code=code, cause=cause, **fields))
            log.info("job %s %s after %.1f s (this agent's exit code %d)",
                     self.config.settings.run_id,
                     "finished" if outcome.status == "succeeded" else "stopped",
                     time.time() - self._started_at, code)
            return code
        self._stop_workers()
        print(f"error: job failed: {outcome.reason}", file=sys.stderr, flush=True)
        tb = (outcome.details or {}).get("traceback")
        if tb and outcome.node_id == self.node_id:
            print(tb.rstrip(), file=sys.stderr, flush=True)
        self.events.emit(JobFailed(exit_code=outcome.exit_code or 1, reason=outcome.reason,
                                   cause="job_failed", **fields))
        return outcome.exit_code or 1

    def _wait_for_workers(self, timeout: float) -> int:
        """Exit code once the workers are done (0: all succeeded); stop them after timeout."""
        deadline = time.time() + timeout
        status = self.backend.status()
        while status.state != "none" and time.time() < deadline:
            if status.state == "succeeded":
                return 0
            if status.state == "failed":
                return 1
            time.sleep(self.config.monitor_interval)
            status = self.backend.status()
        if status.state != "none":
            self._stop_workers()
            return 1
        return 0

    def _leave(self, notice: Notice) -> int:
        """This node goes away (preemption notice, SIGTERM, Ctrl-C): leave the rendezvous at
        once so the others rescale without us; in-place workers finish the current step with
        the others, commit and exit (saving a checkpoint if no node remains), within the notice's
        grace period; whatever still runs then is stopped."""
        fields = d.round_fields(self.state.applied)
        plan = d.leave_plan(notice.deadline, time.time(), self._snapshot, self.node_id,
                            self.backend.status(), self.backend.traits)
        self.events.emit(PreemptionNotice(cause=notice.source, detail=notice.detail,
                                          grace_s=round(plan.grace_s, 3), **fields))
        self.membership.leave()
        outcome = "stopped"
        if plan.in_place:
            self.backend.push_leave(checkpoint=plan.checkpoint)
            # Keep a little of the grace period for stopping what does not finish in time.
            if self._wait_for_workers(max(0.0, plan.grace_s - LEAVE_MARGIN_S)) == 0:
                outcome = "checkpointed" if plan.checkpoint else "left at a step boundary"
        self._stop_workers(sig=self._signal or signal.SIGTERM)
        self.events.emit(NodeLeft(cause=notice.source, outcome=outcome,
                                  grace_s=round(plan.grace_s, 3), **fields))
        if notice.source == "released":
            try:
                self.store.clear_release(self.node_id)
            except RendezvousConnectionError as exc:
                log.info("could not remove this node's release record: %s", exc)
        fault = f": {notice.detail}" if notice.exit_code else ""  # say what failed
        print(f"agent {self.node_id} left the job ({notice.source}: {outcome}){fault}",
              file=sys.stderr, flush=True)
        return 128 + self._signal if self._signal else notice.exit_code
