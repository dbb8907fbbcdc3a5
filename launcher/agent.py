"""The per-node agent: follows the rounds in etcd and keeps this node's workers in the current world.

One loop on the main thread (workers must be forked from a long-lived thread, see workers.py):
read the job from etcd, lead if we are the leader, apply a new round to the workers, watch them,
and leave on SIGINT/SIGTERM. A round is applied in one of two ways:

- restart: stop the workers and start new ones with the new world's environment (any script);
- in place: when all of this node's workers use the in-place API (`integrations.torch`), send
  them the new world over the local control channel; they switch at a common step boundary and
  no process restarts. A node joining a job that runs in place starts its workers in standby
  first (pre-warmed: imported, model built) and registers only once they are ready.

With `backend="horovod"` the channel is `integrations.horovod.agent.HorovodWorkers` (same
interface): Horovod's gloo rendezvous, `hvd.elastic` resets instead of step boundaries, and
every node pre-warms (imports torch and Horovod) before it registers.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

from elastic.contract import CollectiveFailed, Hello
from elastic.policy import BatchPolicy, BatchPolicyError
from rendezvous.api import (JobOutcome, RendezvousConnectionError, RendezvousSettings,
                            RendezvousTimeoutError, Round)
from rendezvous.decision import FailureReport
from rendezvous.membership import Membership, new_node_id
from rendezvous.store import EtcdStore, Snapshot

from .events import EventLog
from .health import HealthServer
from .inplace import InPlaceWorkers
from .network import gloo_env, interface_warning
from .peers import PeerMonitor
from .preemption import Notice, NoticeConfig, NoticeWatcher
from .workers import WorkerGroup, WorkerSpec, WorldAssignment

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
# After another node reports success, our workers are in their last steps; give them this long.
FINISH_GRACE_S = 60.0
# Workers of the old world get this long to exit after SIGTERM before a restart kills them.
RESTART_GRACE_S = 2.0
RESCALE_MODES = ("auto", "restart", "in-place")
BACKENDS = ("torch", "horovod")
ETCD_RETRY_S = 0.5
STACK_DUMP_WAIT_S = 1.0  # time a hung worker gets to write its stacks before SIGKILL
KILL_REAP_WAIT_S = 5.0
LEAVE_MARGIN_S = 2.0  # of a notice's grace period, kept for stopping leftover workers
WAITING_REPORT_S = 5.0  # while waiting for nodes, say so this often
# --rescale-mode auto: a scale-up that comes while this node's workers are still starting waits
# this long for them to say hello (use the in-place API) so they can follow it in place; a
# script that does not use the API pays this once, then its workers restart on every change.
HELLO_WAIT_S = 10.0


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
    backend: str = "torch"  # or "horovod": Horovod workers (integrations.horovod)
    rank_hint: Optional[int] = None  # --node-rank: this node's place among nodes joining together
    endpoint: str = ""  # where the rendezvous is, for messages

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "horovod" and self.rescale_mode == "in-place":
            raise ValueError("Horovod workers follow a round in place only through "
                             "hvd.elastic.run, which auto detects; use rescale mode auto or restart")


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def waiting_message(snap: Snapshot, node_id: str, settings: RendezvousSettings,
                    endpoint: str) -> Optional[str]:
    """What to tell the user while this node waits to run workers, or None when it does not."""
    rnd = snap.round
    if snap.outcome is not None or (rnd is not None and rnd.active and node_id in rnd.node_ids):
        return None
    spec = snap.spec or {}
    low = spec.get("min_nodes", settings.min_nodes)
    high = spec.get("max_nodes", settings.max_nodes)
    where = f"job {settings.run_id!r} at etcd {endpoint}" if endpoint else f"job {settings.run_id!r}"
    present = len(snap.nodes)
    if present < low:
        return (f"waiting for nodes: {present} of the {low} needed are here ({where}); start "
                f"the others with --rdzv-endpoint {endpoint} --rdzv-id {settings.run_id}"
                if endpoint else f"waiting for nodes: {present} of the {low} needed ({where})")
    if rnd is not None and rnd.active and len(rnd.members) >= high:
        return (f"waiting for room: the job runs at its maximum of {high} nodes ({where}); "
                "this node joins when one leaves")
    return None


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
        self._wake = threading.Event()
        self._health = HealthServer(config.host, self.node_id)
        self.membership = Membership(
            store, config.settings, host=config.host, nproc=config.workers.nproc,
            health_addr=self._health.addr, node_id=self.node_id, rank_hint=config.rank_hint)
        self.events = EventLog(events_path, self.node_id)
        self.in_place = None
        self._guard = None
        spec = config.workers
        # gloo listens on, and tells peers, the interface of this node's address (`lo` for a
        # job on loopback), not the one the host name resolves to.
        spec = replace(spec, extra_env={**gloo_env(config.host, os.environ), **spec.extra_env})
        warning = interface_warning(config.host, config.settings.max_nodes > 1, os.environ)
        if warning:
            log.warning("%s", warning)
        if config.backend == "horovod":
            from integrations.horovod.agent import HorovodWorkers
            self.in_place = HorovodWorkers(store, spec, node_id=self.node_id, host=config.host,
                                           wake=self._wake.set,
                                           in_place=config.rescale_mode != "restart")
            spec = self.in_place.spec  # through its pre-warm runner, with Horovod's variables
        else:
            from integrations.horovod.guard import HorovodGuard
            self._guard = HorovodGuard()  # a Horovod script here fails at once, and says why
            spec = replace(spec, extra_env={**spec.extra_env, **self._guard.env})
            if config.rescale_mode != "restart":
                self.in_place = InPlaceWorkers(spec, self._wake.set)
                spec = replace(spec, extra_env={**spec.extra_env, **self.in_place.env})
        self.workers = WorkerGroup(spec)
        self.peers = PeerMonitor(self.membership, config.probe_interval, self._wake.set)
        self._signal: Optional[int] = None
        self._notice: Optional[Notice] = None
        self._snapshot: Optional[Snapshot] = None
        self.notices = NoticeWatcher(config.notices or NoticeConfig(), self._on_notice)
        self._round: Optional[Round] = None      # the latest round this agent has applied
        self._pending: Optional[Round] = None    # a round we are a member of, not yet applied
        self._awaiting: Optional[Round] = None   # pushed in place; waiting for "running"
        self._seen_rounds = 0
        self._etcd_down_since: Optional[float] = None
        self._hung: dict = {}  # pid -> why it was killed as hung
        self._started_at = time.time()
        self._api_unused = False  # workers ran HELLO_WAIT_S without saying hello: no more holds
        self._waiting_said: tuple = (None, 0.0)  # (last waiting message, when it was said)

    # -- entry point -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until the job ends or we are told to stop; return the exit code for the agent."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.notices.start()  # a notice during pre-warming means: never join
            if self._should_prewarm():
                self._prewarm()
            if self._notice is not None:
                return 128 + self._signal if self._signal else 0
            self.membership.join()
            self.events.emit("joined", cause="prewarmed" if self.workers.running else "start")
            self.store.watch(self._wake.set)
            self.peers.start()
            return self._loop()
        finally:
            self.notices.stop()
            self.peers.stop()
            self.workers.close()
            self.membership.leave()
            self._health.close()
            if self.in_place:
                self.in_place.close()
            if self._guard:
                self._guard.close()
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

    def _loop(self) -> int:
        while True:
            if self._notice is not None:
                return self._leave(self._notice)
            try:
                snap, action, wake_at = self.membership.step()
                self._snapshot = snap
                if self._etcd_down_since is not None:
                    self._etcd_back()
                self.peers.update(snap)
                if action is not None:
                    self._record_leader_action(action)
                if snap.outcome is not None:
                    return self._finish(snap.outcome)
                self._say_waiting(snap)
                self._handle_messages(snap)
                self._follow_round(snap)
                self._check_hangs()
                self._check_workers(snap)
            except RendezvousConnectionError as exc:
                # Training goes on in the current world; rounds resume when etcd is back.
                self._etcd_unreachable(exc)
                self._wake.wait(ETCD_RETRY_S)
                self._wake.clear()
                continue
            timeout = self.config.monitor_interval
            if wake_at is not None:
                timeout = max(0.0, min(timeout, wake_at - time.time()))
            self._wake.wait(timeout)
            self._wake.clear()

    def _etcd_unreachable(self, exc: Exception) -> None:
        if self._etcd_down_since is None:
            self._etcd_down_since = time.time()
            log.warning("etcd unreachable; the workers keep training in round %s: %s",
                        self._round.number if self._round else None, exc)
            self.events.emit("etcd_unreachable", round=self._round.number if self._round else None,
                             cause=str(exc)[:200])

    def _etcd_back(self) -> None:
        down = time.time() - self._etcd_down_since
        self.store.rewatch(self._wake.set)
        self._etcd_down_since = None
        log.warning("etcd is back after %.1f s", down)
        self.events.emit("etcd_reconnected", round=self._round.number if self._round else None,
                         duration_s=round(down, 3))

    def _say_waiting(self, snap: Snapshot) -> None:
        """While this node runs no workers because the job waits for nodes (or is full), say so
        every few seconds, with where the others must join."""
        text = waiting_message(snap, self.node_id, self.config.settings, self.config.endpoint)
        said, when = self._waiting_said
        now = time.time()
        if text is None:
            self._waiting_said = (None, 0.0)
        elif text != said or now - when >= WAITING_REPORT_S:
            log.info("%s", text)
            self._waiting_said = (text, now)

    # -- pre-warming ---------------------------------------------------------------------------
    def _should_prewarm(self) -> bool:
        mode = self.config.rescale_mode
        if self.config.backend == "horovod":
            return mode == "auto" and self.in_place.can_prewarm
        return mode == "in-place" or (mode == "auto" and self.store.snapshot().in_place)

    def _prewarm(self) -> None:
        """Start the workers in standby and wait until they are ready for a world."""
        self.workers.start(None)
        deadline = time.time() + self.config.settings.join_timeout
        while not self.in_place.all_ready() and self._notice is None:
            self.in_place.drain(self.workers.pids)
            state = self.workers.poll()
            if state.status != "running":
                reason = state.failure.describe() if state.failure else "exited before a round"
                raise RendezvousTimeoutError(f"worker did not get ready in standby: {reason}")
            if time.time() > deadline:
                raise RendezvousTimeoutError(
                    "workers were not ready in standby within join_timeout; do they call "
                    "integrations.torch.run? (or pass --rescale-mode restart)")
            self._wake.wait(self.config.monitor_interval)
            self._wake.clear()
        log.info("node %s: %d workers pre-warmed in standby", self.node_id,
                 self.config.workers.nproc)

    # -- rounds ----------------------------------------------------------------------------
    def _capable(self) -> bool:
        return (self.in_place is not None and self.workers.running
                and self.workers.poll().status == "running"
                and self.in_place.capable(self.workers.pids))

    def _hold_for_hello(self, rnd: Round) -> bool:
        """Whether to hold back a scale-up round while our workers are still starting: once they
        say hello they follow it in place instead of being restarted (see HELLO_WAIT_S)."""
        if (self.config.rescale_mode != "auto" or self.config.backend != "torch"
                or self._api_unused or self._round is None or not self.workers.running
                or self._capable() or self.workers.poll().status != "running"):
            return False
        grows = set(self._round.node_ids) <= set(rnd.node_ids) and rnd.active
        if not grows:
            return False  # a peer left: the starting workers' world is gone, restart them
        if time.time() - self.workers.started_at < HELLO_WAIT_S:
            return True
        self._api_unused = True
        log.info("workers did not use the in-place API within %.0f s of starting; they restart "
                 "on every change of world", HELLO_WAIT_S)
        return False

    def _follow_round(self, snap: Snapshot) -> None:
        rnd = snap.round
        if rnd is None:
            return
        if self._round is None or rnd.number != self._round.number:
            if self._hold_for_hello(rnd):
                return  # looked at again on the next pass (a hello wakes the loop)
            self._round = rnd
            member = rnd.active and self.node_id in rnd.node_ids
            # A Horovod worker cannot go back to standby once it entered a world: a node left
            # out of the round stops it.
            in_place = self._capable() and (member or self.config.backend == "torch"
                                            or self.in_place.all_ready())
            if not in_place:
                self._stop_workers(grace=RESTART_GRACE_S)
            self._pending = rnd if member else None
            if not member:
                if in_place:
                    self.in_place.push_standby(rnd.number)
                self.events.emit("waiting", round=rnd.number, world_size=rnd.world_size,
                                 members=list(rnd.node_ids), cause=rnd.cause)
        if self._pending is not None:
            self._apply(snap, self._pending)

    def _apply(self, snap: Snapshot, rnd: Round) -> None:
        assignment = self._assignment(snap, rnd)
        if assignment is None:
            return
        self._pending = None
        if self._capable():
            self.in_place.push_round(assignment)
            self.workers.set_ranks(assignment.rank_offset)
            self._awaiting = rnd  # the event is written when all workers run in the new world
        else:
            self._stop_workers(grace=RESTART_GRACE_S)
            self.workers.start(assignment)
            self._record_round(rnd, in_place=False)

    def _assignment(self, snap: Snapshot, rnd: Round) -> Optional[WorldAssignment]:
        group_rank = rnd.group_rank(self.node_id)
        master = snap.masters.get(rnd.number)
        if master is None:
            if group_rank != 0:
                return None  # rank 0's agent publishes the store address; the watch wakes us
            port = self.config.master_port or free_port(self.config.host)
            master = f"{self.config.host}:{port}"
            self.membership.publish_master(rnd.number, master)
        try:
            policy = self.config.batch_policy
            plan_env = policy.plan(rnd.world_size).to_env() if policy else {}
        except BatchPolicyError as exc:
            self.membership.finish(JobOutcome(status="failed", node_id=self.node_id, exit_code=1,
                                              reason=f"world of {rnd.world_size}: {exc}"))
            self._pending = None
            return None
        addr, _, port = master.rpartition(":")
        return WorldAssignment(
            run_id=self.config.settings.run_id, round=rnd.number, group_rank=group_rank,
            group_world_size=len(rnd.members), rank_offset=rnd.rank_offset(self.node_id),
            world_size=rnd.world_size, master_addr=addr, master_port=int(port),
            restart_count=rnd.restart_count, max_restarts=self.config.settings.max_restarts,
            env=plan_env, member_nprocs=tuple(m.nproc for m in rnd.members))

    def _record_round(self, rnd: Round, in_place: bool) -> None:
        first = self._seen_rounds == 0
        self._seen_rounds += 1
        fields = dict(round=rnd.number, world_size=rnd.world_size, members=list(rnd.node_ids),
                      cause=rnd.cause, in_place=in_place)
        if first:
            self.events.emit("rendezvous", **fields)
        else:
            self.events.emit("rescale", duration_s=round(time.time() - rnd.cause_time, 3),
                             restart_count=rnd.restart_count, **fields)

    def _record_leader_action(self, action) -> None:
        if action.kind != "published":
            return
        rnd = action.detail.round
        fields = dict(round=rnd.number, world_size=rnd.world_size, members=list(rnd.node_ids))
        if action.detail.departed:
            self.events.emit("node_left", cause="removed", nodes=list(action.detail.departed),
                             **fields)
        for node in action.detail.excluded:
            entry = next(e for e in rnd.blacklist if e.node_id == node)
            log.warning("node %s failed %d times; it sits out until %s", node, entry.strikes,
                        time.strftime("%H:%M:%S", time.localtime(entry.excluded_until)))
            self.events.emit("node_excluded", cause="repeated_failures", nodes=[node],
                             until=entry.excluded_until, exclusions=entry.exclusions, **fields)

    # -- workers ---------------------------------------------------------------------------
    def _stop_workers(self, grace: Optional[float] = None, sig: int = signal.SIGTERM) -> None:
        if grace is not None:
            grace = min(self.config.workers.grace_period_s, grace)
        self.workers.stop(sig=sig, grace_period_s=grace)
        self._awaiting = None
        if self.in_place:
            self.in_place.reset()

    def _handle_messages(self, snap: Snapshot) -> None:
        if self.in_place is None:
            return
        for _local_rank, msg in self.in_place.drain(self.workers.pids):
            if isinstance(msg, Hello) and self.in_place.capable(self.workers.pids) \
                    and not snap.in_place:
                self.store.mark_in_place()  # from now on, joining nodes pre-warm
            elif isinstance(msg, CollectiveFailed) and self._round is not None \
                    and msg.round == self._round.number:
                self._on_collective_failure(snap, msg)
        rnd = self._awaiting
        if rnd is not None and self.in_place.all_running(rnd.number):
            self._awaiting = None
            self._record_round(rnd, in_place=True)

    def _on_collective_failure(self, snap: Snapshot, msg: dict) -> None:
        """An in-place worker's collective failed: a dead peer is a membership change; otherwise
        the round failed (counted against --max-restarts) and is re-formed, in place."""
        rnd = self._round
        if self.peers.remove_dead(snap, among=rnd.node_ids):
            return
        reports = snap.failures_for(rnd.number)
        if any(r.node_id == self.node_id for r in reports):
            return  # one report per node and round
        self.events.emit("worker_failed", round=rnd.number, world_size=rnd.world_size,
                         members=list(rnd.node_ids), cause="collective", error=msg.error)
        self.membership.report_failure(rnd.number, FailureReport(
            node_id=self.node_id, time=time.time(), description=msg.error or "collective failed",
            exit_code=1, traceback=msg.traceback))

    def _check_hangs(self) -> None:
        """A worker that makes no progress for --hang-timeout is killed (after its stacks are
        dumped to its log); the next poll sees the failure and the round is re-formed."""
        if not self.config.hang_timeout or self.in_place is None or not self.workers.running:
            return
        pids = self.workers.pids
        for local_rank, idle in self.in_place.stalled(self.config.hang_timeout):
            pid = pids[local_rank]
            rnd = self._round
            self._hung[pid] = f"no progress for {idle:.1f} s (--hang-timeout {self.config.hang_timeout:g})"
            self.events.emit("worker_hung", round=rnd.number if rnd else None,
                             world_size=rnd.world_size if rnd else 0,
                             members=list(rnd.node_ids) if rnd else [], cause="hang",
                             local_rank=local_rank, pid=pid, idle_s=round(idle, 3))
            log.warning("worker pid %d (local rank %d) made no progress for %.1f s; dumping its "
                        "stacks and killing it", pid, local_rank, idle)
            _signal_pid(pid, signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT_S)
            _signal_pid(pid, signal.SIGKILL)
            # Charge the death to this round: if a new round came first (the hung rank's peers
            # fail the moment it dies), the same hang would be counted twice.
            deadline = time.time() + KILL_REAP_WAIT_S
            while self.workers.poll().status == "running" and time.time() < deadline:
                time.sleep(0.02)

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
        self._stop_workers(grace=RESTART_GRACE_S)
        hung = self._hung.pop(failure.pid, None)
        # A peer's death shows up here as a collective error. If a peer is dead, removing it is
        # a membership change, not a failure of ours, and costs no restart.
        if hung is None and self.peers.remove_dead(snap, among=rnd.node_ids):
            return
        description = f"rank {failure.rank} hung: {hung}" if hung else failure.describe()
        if self._guard and self._guard.hint():
            description += f" ({self._guard.hint()})"
        self.membership.report_failure(rnd.number, FailureReport(
            node_id=self.node_id, time=failure.time, description=description,
            exit_code=failure.exitcode if failure.exitcode > 0 else 1,
            traceback=failure.traceback))

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, outcome: JobOutcome) -> int:
        rnd = self._round
        fields = dict(round=rnd.number if rnd else None, world_size=rnd.world_size if rnd else 0,
                      members=list(rnd.node_ids) if rnd else [])
        if outcome.status == "succeeded":
            code = self._wait_for_workers(FINISH_GRACE_S)
            self.events.emit("job_finished", exit_code=code, cause="workers_succeeded", **fields)
            log.info("job %s finished after %.1f s (this agent's exit code %d)",
                     self.config.settings.run_id, time.time() - self._started_at, code)
            return code
        self._stop_workers()
        print(f"error: job failed: {outcome.reason}", file=sys.stderr, flush=True)
        tb = (outcome.details or {}).get("traceback")
        if tb and outcome.node_id == self.node_id:
            print(tb.rstrip(), file=sys.stderr, flush=True)
        self.events.emit("job_failed", exit_code=outcome.exit_code or 1, reason=outcome.reason,
                         cause="job_failed", **fields)
        return outcome.exit_code or 1

    def _wait_for_workers(self, timeout: float) -> int:
        """Exit code once the workers are done (0: all succeeded); stop them after timeout."""
        deadline = time.time() + timeout
        while self.workers.running and time.time() < deadline:
            state = self.workers.poll()
            if state.status == "succeeded":
                return 0
            if state.status == "failed":
                return 1
            time.sleep(self.config.monitor_interval)
        if self.workers.running:
            self._stop_workers()
            return 1
        return 0

    def _leave(self, notice: Notice) -> int:
        """This node goes away (preemption notice, SIGTERM, Ctrl-C): leave the rendezvous at
        once so the others rescale without us; in-place workers finish the current step with
        the others, commit and exit (saving a checkpoint if no node remains), within the notice's
        grace period; whatever still runs then is stopped."""
        rnd = self._round
        fields = dict(round=rnd.number if rnd else None, world_size=rnd.world_size if rnd else 0,
                      members=list(rnd.node_ids) if rnd else [])
        grace = max(0.0, notice.deadline - time.time()) if notice.deadline else 0.0
        others = [n for n in (self._snapshot.nodes if self._snapshot else {}) if n != self.node_id]
        self.events.emit("preemption_notice", cause=notice.source, detail=notice.detail,
                         grace_s=round(grace, 3), **fields)
        capable = self._capable()
        self.membership.leave()
        outcome = "stopped"
        if capable:
            self.in_place.push_leave(checkpoint=not others)
            # Keep a little of the grace period for stopping what does not finish in time.
            if self._wait_for_workers(max(0.0, grace - LEAVE_MARGIN_S)) == 0:
                outcome = "left at a step boundary" if others else "checkpointed"
        self._stop_workers(sig=self._signal or signal.SIGTERM)
        self.events.emit("node_left", cause=notice.source, outcome=outcome,
                         grace_s=round(grace, 3), **fields)
        print(f"agent {self.node_id} left the job ({notice.source}: {outcome})",
              file=sys.stderr, flush=True)
        return 128 + self._signal if self._signal else 0
