"""The leader's decision: given what etcd holds now, what should the next round be?

Pure: no I/O and no clock of its own. The leader's executor (`rendezvous.membership`) builds a
`View` from one etcd read, calls `decide`, and applies the returned decision with a
compare-and-swap. Tests step it with hand-made views and times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple, Union

from .api import JobOutcome, Member, NodeInfo, RendezvousSettings, Round


@dataclass(frozen=True)
class FailureReport:
    """A node's report that its workers failed in a round."""

    node_id: str
    time: float
    description: str
    exit_code: int = 1
    traceback: str = ""


@dataclass(frozen=True)
class View:
    """What the leader sees at `now`.

    first_seen: when the leader first saw each live node (the executor seeds it from the node's
        own joined_at, never later than now), so a takeover leader keeps the join order.
    created_at: when the job was first registered (start of the initial join_timeout).
    failures: reports for the current round.
    """

    now: float
    nodes: Mapping[str, NodeInfo]
    first_seen: Mapping[str, float]
    created_at: float
    round: Optional[Round] = None
    failures: Sequence[FailureReport] = ()
    outcome: Optional[JobOutcome] = None


@dataclass(frozen=True)
class Wait:
    """Nothing to publish now; look again by wake_at (None: only when something changes)."""

    wake_at: Optional[float] = None


@dataclass(frozen=True)
class Publish:
    round: Round
    departed: Tuple[str, ...] = ()
    joined: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Fail:
    outcome: JobOutcome = field(default_factory=lambda: JobOutcome("failed"))


Decision = Union[Wait, Publish, Fail]


def _member(info: NodeInfo) -> Member:
    return Member(node_id=info.node_id, host=info.host, nproc=info.nproc)


def _newcomers(view: View, current: Sequence[str]) -> list:
    waiting = [nid for nid in view.nodes if nid not in current]
    return sorted(waiting, key=lambda nid: (view.first_seen.get(nid, view.now), nid))


def _next_round(view, members, *, active=True, cause, restart_count=None,
                cause_time=None) -> Round:
    prev = view.round
    return Round(
        number=(prev.number + 1) if prev else 1,
        members=tuple(members),
        active=active,
        restart_count=restart_count if restart_count is not None else (prev.restart_count if prev else 0),
        cause=cause,
        cause_time=view.now if cause_time is None else cause_time,
    )


def decide(view: View, settings: RendezvousSettings) -> Decision:
    """Return the next step for the job seen in `view`."""
    if view.outcome is not None:
        return Wait()
    current = view.round
    if current is None or not current.active:
        return _decide_waiting(view, settings)
    return _decide_running(view, settings, current)


def _decide_waiting(view: View, settings: RendezvousSettings) -> Decision:
    """No workers run: start once enough nodes are here, or fail after join_timeout."""
    current = view.round
    survivors = [m for m in (current.members if current else ()) if m.node_id in view.nodes]
    newcomers = _newcomers(view, [m.node_id for m in survivors])
    candidates = survivors + [_member(view.nodes[nid]) for nid in newcomers]
    count = len(candidates)
    waiting_since = current.cause_time if current else view.created_at
    if count < settings.min_nodes:
        deadline = waiting_since + settings.join_timeout
        if view.now >= deadline:
            return Fail(JobOutcome(
                status="failed",
                reason=(
                    f"only {count} of the {settings.min_nodes} nodes needed joined within "
                    f"join_timeout={settings.join_timeout:g}s; start more agents or lower --nnodes"
                ),
                exit_code=1,
            ))
        return Wait(wake_at=deadline)
    cause = "start" if current is None else "node_joined"
    if count < settings.max_nodes:
        # Last call: wait a little after min is reached for more nodes, so that nodes started
        # together form one round instead of a string of rescales.
        seen = sorted(view.first_seen.get(m.node_id, view.now) for m in candidates)
        window = settings.last_call_timeout if current is None else settings.join_settle
        ready_at = max(seen[settings.min_nodes - 1], waiting_since) + window
        if view.now < ready_at:
            return Wait(wake_at=ready_at)
    members = candidates[: settings.max_nodes]
    return Publish(
        _next_round(view, members, cause=cause),
        joined=tuple(nid for nid in newcomers if nid in {m.node_id for m in members}),
    )


def _decide_running(view: View, settings: RendezvousSettings, current: Round) -> Decision:
    survivors = [m for m in current.members if m.node_id in view.nodes]
    departed = tuple(m.node_id for m in current.members if m.node_id not in view.nodes)
    newcomers = _newcomers(view, current.node_ids)
    room = settings.max_nodes - len(survivors)
    if departed:
        joined = tuple(newcomers[: max(room, 0)])
        members = survivors + [_member(view.nodes[nid]) for nid in joined]
        if len(members) < settings.min_nodes:
            return Publish(_next_round(view, members, active=False, cause="node_left"), departed=departed)
        return Publish(_next_round(view, members, cause="node_left"), departed=departed, joined=joined)
    if view.failures:
        first = min(view.failures, key=lambda f: f.time)
        if current.restart_count >= settings.max_restarts:
            return Fail(JobOutcome(
                status="failed",
                reason=(
                    f"{first.description} on node {first.node_id}; "
                    f"max_restarts={settings.max_restarts} exhausted"
                ),
                node_id=first.node_id,
                exit_code=first.exit_code or 1,
                details={"traceback": first.traceback},
            ))
        joined = tuple(newcomers[: max(room, 0)])
        members = survivors + [_member(view.nodes[nid]) for nid in joined]
        return Publish(
            _next_round(view, members, cause="worker_failed", cause_time=first.time,
                        restart_count=current.restart_count + 1),
            joined=joined,
        )
    if newcomers and room > 0:
        first_join = min(view.first_seen.get(nid, view.now) for nid in newcomers)
        if view.now < first_join + settings.join_settle:
            return Wait(wake_at=first_join + settings.join_settle)
        joined = tuple(newcomers[:room])
        members = survivors + [_member(view.nodes[nid]) for nid in joined]
        # The rescale is timed from the join, so the coalescing window counts against it.
        return Publish(_next_round(view, members, cause="node_joined", cause_time=first_join),
                       joined=joined)
    return Wait()
