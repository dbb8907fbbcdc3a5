"""The agent's decisions: given what its node sees now, what should it do?

Pure: no I/O and no clock of its own. Each pass of the agent (launcher.agent) builds an
`AgentView`: the job as one etcd read shows it, its workers' status and what they said, and the
time. `decide(view, state, settings)` returns the next `AgentState` and the actions to apply, in
order; the agent applies them and keeps the state. Tests step it with hand-made views.

What it decides, in the order of a pass:
- what controllers asked (the job client, through etcd): a stop (in-place workers commit at the
  next boundary and node-local rank 0 checkpoints, others get SIGTERM; then the job ends as
  stopped); this node's release (it leaves as on a preemption notice, or, with --stay-as-spare,
  stays registered as a spare once the leader left it out);
- what to tell the user while the node waits (`waiting_message`, every WAITING_REPORT_S);
- what the workers said: a hello marks the job as in place (joining nodes pre-warm from then
  on); a failed collective is a departure when a peer is gone, otherwise this node's failure in
  the round (reported once); every worker running in a round pushed in place completes it;
- a new round: applied in place when every worker can take it (and, if this node is left out,
  when its workers can wait in standby), else the workers are restarted; held back while
  starting workers may still say hello (a scale-up, auto mode, HELLO_WAIT_S) or while a hung
  worker is being killed (its death belongs to the round it hung in);
- hung workers (no progress for --hang-timeout): stacks dumped (SIGUSR1), SIGKILL a moment later;
- the workers' end: all succeeded finishes the job; a failure is reported for the round (a
  departure when a peer is gone), and counts against --max-restarts at the leader.
Before a pass, `probe_for` says whether the peers need probing (a failure that a dead peer may
explain); the agent probes and puts the answer in the view.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import List, Mapping, Optional, Tuple, Union

from elastic.contract import CollectiveFailed, Hello, Message
from elastic.policy import BatchPolicy, BatchPolicyError
from rendezvous.api import JobOutcome, RendezvousSettings, Round
from rendezvous.decision import FailureReport
from rendezvous.store import Snapshot

from .backend import PREWARM_ALWAYS, PREWARM_IF_JOB_IN_PLACE, BackendTraits, WorkerStatus
from .events import (Event, NodeExcluded, NodeLeft, Rendezvous, Rescale, Waiting, WorkerFailed,
                     WorkerHung)
from .workers import WorldAssignment

# Workers of the old world get this long to exit after SIGTERM before a restart kills them.
RESTART_GRACE_S = 2.0
WAITING_REPORT_S = 5.0  # while waiting for nodes, say so this often
# --rescale-mode auto: a scale-up that comes while this node's workers are still starting waits
# this long for them to say hello (use the in-place API) so they can follow it in place; a
# script that does not use the API pays this once, then its workers restart on every change.
HELLO_WAIT_S = 10.0
STACK_DUMP_WAIT_S = 1.0  # time a hung worker gets to write its stacks before SIGKILL
KILL_REAP_WAIT_S = 5.0   # how long rounds are held for a killed hung worker to be seen dead


@dataclass(frozen=True)
class AgentSettings:
    """What the decisions need to know of the agent's configuration."""

    node_id: str
    rendezvous: RendezvousSettings
    traits: BackendTraits
    rescale_mode: str = "auto"
    endpoint: str = ""
    hang_timeout: Optional[float] = None
    batch_policy: Optional[BatchPolicy] = None
    stay_as_spare: bool = False  # a released node stays registered as a spare


@dataclass(frozen=True)
class HangKill:
    """A hung worker being killed: SIGKILL at kill_at; rounds held until it is seen dead or
    until reap_by (set once SIGKILL is sent)."""

    pid: int
    kill_at: float
    reap_by: Optional[float] = None


@dataclass(frozen=True)
class AgentState:
    """Everything the agent remembers between passes.

    applied: the latest round this node followed. pending: a round with this node not applied
    yet (rank 0's store address is not published yet). awaiting: a round pushed in place, until
    every worker runs in it. rounds_started: rounds this node's workers ran in. api_unused: the
    workers ran HELLO_WAIT_S without saying hello (no more holds). hung: pid -> why it was
    killed as hung. kills: hung workers being killed. waiting_said: the last waiting message and
    when it was said. stopping: "draining" once a stop was asked and our workers are ending,
    "idle" when we had none. released: our release was acted on (we stay as a spare).
    """

    applied: Optional[Round] = None
    pending: Optional[Round] = None
    awaiting: Optional[Round] = None
    rounds_started: int = 0
    api_unused: bool = False
    hung: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    kills: Tuple[HangKill, ...] = ()
    waiting_said: Tuple[Optional[str], float] = (None, 0.0)
    stopping: str = ""  # a stop was asked: "draining" (our workers are ending) or "idle"
    released: bool = False  # our release was acted on (we stay as a spare)


@dataclass(frozen=True)
class AgentView:
    """What the agent sees in one pass. peer_gone: the probe's answer when `probe_for` asked for
    one (some member of the round is gone: found dead, or already unregistered)."""

    now: float
    snapshot: Snapshot
    workers: WorkerStatus = WorkerStatus()
    messages: Tuple[Tuple[int, Message], ...] = ()
    failure_hint: Optional[str] = None
    peer_gone: Optional[bool] = None


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Emit:
    """Record `event`. timed_from: set its duration_s to the time from then to the moment it
    is recorded (after the actions before it, such as starting the workers)."""

    event: Event
    timed_from: Optional[float] = None


@dataclass(frozen=True)
class Say:
    text: str
    level: int = logging.INFO


@dataclass(frozen=True)
class MarkInPlace:
    """Write that this job's workers use the in-place API: joining nodes pre-warm."""


@dataclass(frozen=True)
class ReportFailure:
    round: int
    report: FailureReport


@dataclass(frozen=True)
class PublishMaster:
    """This node holds rank 0 of `round`: pick the store's port and publish its address."""

    round: int


@dataclass(frozen=True)
class StopWorkers:
    grace: Optional[float] = None  # None: the workers' --grace-period
    sig: int = signal.SIGTERM


@dataclass(frozen=True)
class StartWorkers:
    assignment: Optional[WorldAssignment]  # None: in standby


@dataclass(frozen=True)
class PushRound:
    assignment: WorldAssignment


@dataclass(frozen=True)
class PushStandby:
    round: int


@dataclass(frozen=True)
class PushLeave:
    """In place: the workers finish at the next step boundary (checkpoint: local rank 0 saves)."""

    checkpoint: bool


@dataclass(frozen=True)
class LeaveJob:
    """This node leaves the job as on a preemption notice (source, detail)."""

    source: str
    detail: str = ""


@dataclass(frozen=True)
class ClearRelease:
    """Our release record has been acted on: remove it."""


@dataclass(frozen=True)
class SignalWorker:
    pid: int
    sig: int


@dataclass(frozen=True)
class Finish:
    """Write the job's outcome (once, whoever is first)."""

    outcome: JobOutcome


Action = Union[Emit, Say, MarkInPlace, ReportFailure, PublishMaster, StopWorkers, StartWorkers,
               PushRound, PushStandby, PushLeave, LeaveJob, ClearRelease, SignalWorker, Finish]


@dataclass(frozen=True)
class Step:
    """The decision of one pass. again: apply the actions, read the job again and decide again
    at once (rank 0's store address was just published). wake_at: look again by then."""

    state: AgentState
    actions: Tuple[Action, ...] = ()
    wake_at: Optional[float] = None
    again: bool = False


# -- before the loop, and around it ------------------------------------------------------------
def should_prewarm(traits: BackendTraits, job_in_place: bool) -> bool:
    """Whether a joining node starts its workers in standby before it registers."""
    return traits.prewarm == PREWARM_ALWAYS or (
        traits.prewarm == PREWARM_IF_JOB_IN_PLACE and job_in_place)


def round_fields(rnd: Optional[Round]) -> dict:
    return dict(round=rnd.number if rnd else None, world_size=rnd.world_size if rnd else 0,
                members=tuple(rnd.node_ids) if rnd else ())


def leader_actions(published) -> List[Action]:
    """What to record of a round the leader (this node) published: departures it noticed and
    nodes it cooled down. `published` is rendezvous.decision.Publish."""
    rnd = published.round
    fields = dict(round=rnd.number, world_size=rnd.world_size, members=tuple(rnd.node_ids))
    out: List[Action] = []
    removed = tuple(n for n in published.departed if n not in published.released)
    if removed:
        out.append(Emit(NodeLeft(cause="removed", nodes=removed, **fields)))
    if published.released:
        out.append(Emit(NodeLeft(cause="released", nodes=tuple(published.released), **fields)))
    if published.resized:
        out.append(Emit(NodeLeft(cause="resized", nodes=tuple(published.resized),
                                 outcome="spare", **fields)))
    for node in published.excluded:
        entry = next(e for e in rnd.blacklist if e.node_id == node)
        out.append(Say(f"node {node} failed {entry.strikes} times; it sits out for "
                       f"{entry.excluded_until - rnd.cause_time:.0f} s", logging.WARNING))
        out.append(Emit(NodeExcluded(cause="repeated_failures", nodes=(node,),
                                     until=entry.excluded_until, exclusions=entry.exclusions,
                                     **fields)))
    return out


def waiting_message(snap: Snapshot, node_id: str, settings: RendezvousSettings,
                    endpoint: str) -> Optional[str]:
    """What to tell the user while this node waits to run workers, or None when it does not."""
    rnd = snap.round
    if snap.outcome is not None or (rnd is not None and rnd.active and node_id in rnd.node_ids):
        return None
    spec = snap.spec
    low = spec.min_nodes if spec else settings.min_nodes
    high = spec.target if spec else settings.max_nodes
    where = f"job {settings.run_id!r} at etcd {endpoint}" if endpoint else f"job {settings.run_id!r}"
    present = len(snap.nodes)
    if present < low:
        return (f"waiting for nodes: {present} of the {low} needed are here ({where}); start "
                f"the others with --rdzv-endpoint {endpoint} --rdzv-id {settings.run_id}"
                if endpoint else f"waiting for nodes: {present} of the {low} needed ({where})")
    if rnd is not None and rnd.active and len(rnd.members) >= high:
        return (f"waiting as a spare: the job runs at its size of {high} nodes ({where}); "
                "this node joins when one leaves or the job is resized up")
    return None


def probe_for(view: AgentView, state: AgentState) -> Optional[Tuple[str, ...]]:
    """The members to probe before deciding, when a failure may be a dead peer's doing."""
    rnd = state.applied
    if rnd is None:
        return None
    if any(isinstance(m, CollectiveFailed) and m.round == rnd.number for _, m in view.messages):
        return tuple(rnd.node_ids)
    w = view.workers
    if w.state == "failed" and w.failure is not None and w.failure.pid not in state.hung:
        return tuple(rnd.node_ids)
    return None


# -- one pass --------------------------------------------------------------------------------
class _Pass:
    """The working state of one decision: the state being updated and the actions so far."""

    def __init__(self, view: AgentView, state: AgentState, settings: AgentSettings):
        self.view, self.state, self.s = view, state, settings
        self.workers = view.workers
        self.actions: List[Action] = []
        self.wake_at: Optional[float] = None
        self.again = False

    def do(self, *actions: Action) -> None:
        self.actions.extend(actions)

    def update(self, **changes) -> None:
        self.state = replace(self.state, **changes)

    def stop_workers(self, grace: Optional[float] = RESTART_GRACE_S) -> None:
        if self.workers.state != "none":
            self.do(StopWorkers(grace))
            self.workers = WorkerStatus()
        self.update(awaiting=None)

    def wake_by(self, when: float) -> None:
        self.wake_at = when if self.wake_at is None else min(self.wake_at, when)

    def step(self) -> Step:
        return Step(self.state, tuple(self.actions), self.wake_at, self.again)


def decide(view: AgentView, state: AgentState, settings: AgentSettings) -> Step:
    """The actions of one pass and the state after them (module docstring)."""
    p = _Pass(view, state, settings)
    if _follow_controls(p):
        return p.step()
    _say_waiting(p)
    _read_messages(p)
    if p.state.stopping:
        _drain_for_stop(p)
        return p.step()
    _follow_round(p)
    if p.again:
        return p.step()
    _watch_hangs(p)
    _check_workers(p)
    return p.step()


def _follow_controls(p: _Pass) -> bool:
    """A stop or a release written by a controller. True when the pass ends here (we leave)."""
    snap, w = p.view.snapshot, p.workers
    if snap.stop is not None and not p.state.stopping:
        reason = f" ({snap.stop.reason})" if snap.stop.reason else ""
        if w.state == "running":
            p.update(stopping="draining")
            if p.s.traits.in_place and w.capable:
                p.do(Say(f"stop requested{reason}: the workers commit at the next step boundary "
                         "and local rank 0 checkpoints"), PushLeave(checkpoint=True))
            else:
                p.do(Say(f"stop requested{reason}: stopping the workers"), StopWorkers(None))
                p.workers = WorkerStatus()
        else:
            p.update(stopping="idle")
    release = snap.released.get(p.s.node_id)
    if release is None or p.state.released:
        return False
    if not p.s.stay_as_spare:
        p.do(LeaveJob("released", release.reason))
        return True
    applied = p.state.applied
    if applied is not None and p.s.node_id not in applied.node_ids:
        # The leader left us out (our workers went to standby or were stopped): now a spare.
        p.update(released=True)
        p.do(ClearRelease(), Emit(NodeLeft(cause="released", outcome="spare",
                                           **round_fields(applied))))
    return False


def _drain_for_stop(p: _Pass) -> None:
    """Stopping: once our workers have ended, the job ends as stopped (whoever is first)."""
    if p.state.stopping == "draining" and p.workers.state != "running":
        p.do(Finish(JobOutcome(status="stopped", node_id=p.s.node_id, exit_code=0,
                               reason=p.view.snapshot.stop.reason)))


def _say_waiting(p: _Pass) -> None:
    text = waiting_message(p.view.snapshot, p.s.node_id, p.s.rendezvous, p.s.endpoint)
    said, when = p.state.waiting_said
    if text is None:
        if said is not None:
            p.update(waiting_said=(None, 0.0))
    elif text != said or p.view.now - when >= WAITING_REPORT_S:
        p.do(Say(text))
        p.update(waiting_said=(text, p.view.now))


def _read_messages(p: _Pass) -> None:
    snap, rnd = p.view.snapshot, p.state.applied
    reported = rnd is not None and any(r.node_id == p.s.node_id
                                       for r in snap.failures_for(rnd.number))
    marked = snap.in_place
    for _local_rank, msg in p.view.messages:
        if isinstance(msg, Hello) and p.workers.capable and not marked:
            p.do(MarkInPlace())  # from now on, joining nodes pre-warm
            marked = True
        elif isinstance(msg, CollectiveFailed) and rnd is not None and msg.round == rnd.number:
            # A dead peer is a membership change (the probe removed it); otherwise the round
            # failed, reported once per node (it counts against --max-restarts, in place).
            if p.view.peer_gone or reported:
                continue
            reported = True
            p.do(Emit(WorkerFailed(cause="collective", error=msg.error, **_fields(rnd))),
                 ReportFailure(rnd.number, FailureReport(
                     node_id=p.s.node_id, time=p.view.now,
                     description=msg.error or "collective failed", exit_code=1,
                     traceback=msg.traceback)))
    awaiting = p.state.awaiting
    if awaiting is not None and p.workers.running_round == awaiting.number:
        p.update(awaiting=None)
        _record_round(p, awaiting, in_place=True)


def _fields(rnd: Round) -> dict:
    return dict(round=rnd.number, world_size=rnd.world_size, members=tuple(rnd.node_ids))


def _record_round(p: _Pass, rnd: Round, in_place: bool) -> None:
    first = p.state.rounds_started == 0
    p.update(rounds_started=p.state.rounds_started + 1)
    if first:
        p.do(Emit(Rendezvous(cause=rnd.cause, in_place=in_place, **_fields(rnd))))
    else:
        p.do(Emit(Rescale(cause=rnd.cause, in_place=in_place, restart_count=rnd.restart_count,
                          **_fields(rnd)), timed_from=rnd.cause_time))


def _killing(p: _Pass) -> bool:
    """A hung worker is being killed, or was and its failure is not reported yet: its death
    must be charged to the round it hung in (its peers fail the moment it dies, and a round
    re-formed for them first would count the same hang twice)."""
    w = p.workers
    if w.state == "failed" and w.failure is not None and w.failure.pid in p.state.hung:
        return True
    return any(k.reap_by is None or (p.view.now < k.reap_by and k.pid in w.pids
                                     and w.state == "running") for k in p.state.kills)


def _hold_for_hello(p: _Pass, rnd: Round) -> bool:
    """Hold back a scale-up while our workers are still starting: once they say hello they
    follow it in place instead of being restarted (see HELLO_WAIT_S)."""
    w, applied = p.workers, p.state.applied
    if (p.s.rescale_mode != "auto" or not p.s.traits.holds_for_hello or p.state.api_unused
            or applied is None or w.state != "running" or w.capable):
        return False
    if not (set(applied.node_ids) <= set(rnd.node_ids) and rnd.active):
        return False  # a peer left: the starting workers' world is gone, restart them
    if p.view.now - w.started_at < HELLO_WAIT_S:
        p.wake_by(w.started_at + HELLO_WAIT_S)
        return True
    p.update(api_unused=True)
    p.do(Say(f"workers did not use the in-place API within {HELLO_WAIT_S:.0f} s of starting; "
             "they restart on every change of world"))
    return False


def _follow_round(p: _Pass) -> None:
    rnd = p.view.snapshot.round
    if rnd is None:
        return
    applied = p.state.applied
    if applied is None or rnd.number != applied.number:
        if _killing(p) or _hold_for_hello(p, rnd):
            return  # looked at again on the next pass
        member = rnd.active and p.s.node_id in rnd.node_ids
        w = p.workers
        # In place needs workers that can take it; a node left out also needs workers that can
        # wait in standby (or already do).
        in_place = (p.s.traits.in_place and w.capable
                    and (member or p.s.traits.standby_after_world or w.all_ready))
        p.update(applied=rnd, pending=rnd if member else None)
        if not in_place:
            p.stop_workers()
        if not member:
            if in_place:
                p.do(PushStandby(rnd.number))
            p.do(Emit(Waiting(cause=rnd.cause, **_fields(rnd))))
    if p.state.pending is not None:
        _apply(p, p.state.pending)


def _apply(p: _Pass, rnd: Round) -> None:
    snap, s = p.view.snapshot, p.s
    group_rank = rnd.group_rank(s.node_id)
    master = snap.masters.get(rnd.number)
    if master is None:
        if group_rank == 0:  # rank 0's agent publishes the store address; then decide again
            p.do(PublishMaster(rnd.number))
            p.again = True
        return  # the others wait for it (the watch wakes them)
    try:
        plan_env = s.batch_policy.plan(rnd.world_size).to_env() if s.batch_policy else {}
    except BatchPolicyError as exc:
        p.do(Finish(JobOutcome(status="failed", node_id=s.node_id, exit_code=1,
                               reason=f"world of {rnd.world_size}: {exc}")))
        p.update(pending=None)
        return
    addr, _, port = master.rpartition(":")
    assignment = WorldAssignment(
        run_id=s.rendezvous.run_id, round=rnd.number, group_rank=group_rank,
        group_world_size=len(rnd.members), rank_offset=rnd.rank_offset(s.node_id),
        world_size=rnd.world_size, master_addr=addr, master_port=int(port),
        restart_count=rnd.restart_count, max_restarts=s.rendezvous.max_restarts,
        env=plan_env, member_nprocs=tuple(m.nproc for m in rnd.members))
    p.update(pending=None)
    if p.s.traits.in_place and p.workers.capable:
        p.do(PushRound(assignment))
        p.update(awaiting=rnd)  # recorded when every worker runs in the new world
    else:
        p.stop_workers()
        p.do(StartWorkers(assignment))
        p.workers = WorkerStatus(state="running")
        _record_round(p, rnd, in_place=False)


def _watch_hangs(p: _Pass) -> None:
    """A worker with no progress for --hang-timeout has its stacks dumped (SIGUSR1) and is
    killed a moment later; the next passes see the failure and the round is re-formed."""
    w, now, timeout = p.workers, p.view.now, p.s.hang_timeout
    kills = []
    for k in p.state.kills:
        if k.reap_by is None and now >= k.kill_at:
            p.do(SignalWorker(k.pid, signal.SIGKILL))
            k = replace(k, reap_by=now + KILL_REAP_WAIT_S)
        if k.reap_by is None or (now < k.reap_by and k.pid in w.pids):
            kills.append(k)
            p.wake_by(k.kill_at if k.reap_by is None else now + 0.05)
    hung = dict(p.state.hung)
    if timeout and p.s.traits.reports_progress and w.state == "running":
        rnd = p.state.applied
        for local_rank, last in w.last_progress:
            pid = w.pids[local_rank] if local_rank < len(w.pids) else None
            idle = now - last
            if pid is None or pid in hung or idle <= timeout:
                continue
            hung[pid] = f"no progress for {idle:.1f} s (--hang-timeout {timeout:g})"
            p.do(Emit(WorkerHung(cause="hang", local_rank=local_rank, pid=pid,
                                 idle_s=round(idle, 3), **round_fields(rnd))),
                 Say(f"worker pid {pid} (local rank {local_rank}) made no progress for "
                     f"{idle:.1f} s; dumping its stacks and killing it", logging.WARNING),
                 SignalWorker(pid, signal.SIGUSR1))
            kills.append(HangKill(pid, kill_at=now + STACK_DUMP_WAIT_S))
            p.wake_by(now + STACK_DUMP_WAIT_S)
    p.update(kills=tuple(kills), hung=MappingProxyType(hung))


def _check_workers(p: _Pass) -> None:
    rnd, w = p.state.applied, p.workers
    if rnd is None or w.state not in ("succeeded", "failed"):
        return
    if w.state == "succeeded":
        p.do(Finish(JobOutcome(status="succeeded", node_id=p.s.node_id)))
        return
    failure = w.failure
    p.do(Emit(WorkerFailed(cause="exit", rank=failure.rank, exit_code=failure.exitcode,
                           pid=failure.pid, **_fields(rnd))))
    p.stop_workers()
    hung = dict(p.state.hung)
    why = hung.pop(failure.pid, None)
    p.update(hung=MappingProxyType(hung))
    # A peer's death shows up here as a collective error. If a peer is gone, removing it is a
    # membership change, not a failure of ours, and costs no restart.
    if why is None and p.view.peer_gone:
        return
    description = f"rank {failure.rank} hung: {why}" if why else failure.describe()
    if p.view.failure_hint:
        description += f" ({p.view.failure_hint})"
    p.do(ReportFailure(rnd.number, FailureReport(
        node_id=p.s.node_id, time=failure.time, description=description,
        exit_code=failure.exitcode if failure.exitcode > 0 else 1, traceback=failure.traceback)))


# -- leaving ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeavePlan:
    """How this node leaves on a notice: grace_s left to the deadline; checkpoint when no other
    node remains to hold the state; in_place when its workers can finish at a step boundary."""

    grace_s: float
    checkpoint: bool
    in_place: bool


def leave_plan(deadline: Optional[float], now: float, snap: Optional[Snapshot], node_id: str,
               workers: WorkerStatus, traits: BackendTraits) -> LeavePlan:
    others = [n for n in (snap.nodes if snap else {}) if n != node_id]
    grace = max(0.0, deadline - now) if deadline else 0.0
    return LeavePlan(grace_s=grace, checkpoint=not others,
                     in_place=traits.in_place and workers.capable)
