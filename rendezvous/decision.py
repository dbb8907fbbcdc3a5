"""The leader's decision: given what etcd holds now, what should the next round be?

Pure: no I/O and no clock of its own. The leader's executor (`rendezvous.membership`) builds a
`View` from one etcd read, calls `decide`, and applies the returned decision with a
compare-and-swap. Tests step it with hand-made views and times.

--max-restarts N is a job-wide budget of worker failures: the job survives N of them in all,
whichever nodes they happen on, and the (N+1)-th fails it, naming the earliest report (with the
default 0, the first failure ends the job).
- A worker failure is a round for which some node reported that a local worker process exited
  non-zero (or, in place, that a collective failed) while no member left. The leader re-forms the
  round once, with restart_count + 1, however many nodes report for it: a failing rank takes its
  peers down in collectives and they report too.
- Membership changes are free: joins, departures (SIGTERM, a preemption notice, a dead agent found
  by a health probe, lease expiry), cooldowns and their end never change restart_count. A round
  from which a member departed is a membership change even when reports came in for it, since a
  dead node's peers fail in collectives.
- restart_count lives in the Round, so a new leader continues the count; it is never reset.

Controllers (the job client) change a job through etcd, and the leader follows:
- desired size (spec.desired, within min..max; max when unset): rounds grow only up to it; when
  the members are more, the leader leaves out the ones `choose_leavers` picks (never the node
  holding rank 0, spot nodes before on-demand ones, the newest first). Those stay registered as
  spares and come back when the desired size rises.
- released nodes (release/<node_id>) are never admitted; a member that is released departs, and
  the round after it has cause "released" (the node's agent leaves, or stays as a spare).
- a stop request: no round is published any more (the agents are ending the job).

Blacklisting (`rendezvous.blacklist`) hangs off the same failures: each re-formed round gives a
strike to the node with the earliest report; every blacklist_after strikes cool it down, and a
cooling-down node is left out of rounds. Min nodes come first: a node is not cooled down when
fewer than min_nodes other live, not cooling-down nodes would remain (its strikes stay, so its
next failure tries again), and when the job is short of min_nodes (after departures, or while
waiting) and cooling-down nodes are enough to make up the difference, those whose cooldown ends
first are admitted early. Either way the node is named in `Publish.kept`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Union

from . import blacklist, victims
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
    desired: Optional[int] = None  # the job's desired size (None: max)
    released: FrozenSet[str] = frozenset()
    stopping: bool = False


@dataclass(frozen=True)
class Wait:
    """Nothing to publish now; look again by wake_at (None: only when something changes)."""

    wake_at: Optional[float] = None


@dataclass(frozen=True)
class Publish:
    """Publish `round`. excluded: nodes this round cools down; kept: nodes the blacklist would
    leave out (they earned a cooldown, or are serving one) that were kept to hold min nodes."""

    round: Round
    departed: Tuple[str, ...] = ()
    joined: Tuple[str, ...] = ()
    excluded: Tuple[str, ...] = ()
    kept: Tuple[str, ...] = ()
    released: Tuple[str, ...] = ()  # departed because a controller released them
    resized: Tuple[str, ...] = ()   # left out to meet the desired size (now spares)


@dataclass(frozen=True)
class Fail:
    outcome: JobOutcome = field(default_factory=lambda: JobOutcome("failed"))


Decision = Union[Wait, Publish, Fail]


def _member(info: NodeInfo) -> Member:
    return Member(node_id=info.node_id, host=info.host, nproc=info.nproc)


def _blacklist(view: View) -> blacklist.Blacklist:
    return view.round.blacklist if view.round else ()


def _since(view: View, nid: str) -> float:
    return blacklist.eligible_since(_blacklist(view), nid, view.first_seen.get(nid, view.now),
                                    view.now)


def _newcomers(view: View, current: Sequence[str], cooling: Mapping[str, float]) -> list:
    """Waiting nodes in the order they get ranks: by --node-rank where given, then join order
    (released nodes and nodes cooling down wait out)."""
    current = set(current)
    waiting = [nid for nid in view.nodes if nid not in current and nid not in cooling
               and nid not in view.released]

    def order(nid):
        hint = view.nodes[nid].rank_hint
        return (hint is None, hint or 0, _since(view, nid), nid)
    return sorted(waiting, key=order)


def _keep_for_min(cooling: Mapping[str, float], short: int) -> list:
    """Cooling-down nodes to admit early when the job is `short` of min nodes: those whose
    cooldown ends first, and only if they are enough to reach min."""
    if short <= 0 or len(cooling) < short:
        return []
    return sorted(cooling, key=lambda nid: (cooling[nid], nid))[:short]


def _wake(wake_at: Optional[float], cooling: Mapping[str, float], kept=()) -> Wait:
    """Wait until wake_at, or until a cooldown ends and its node becomes a newcomer."""
    ends = [until for nid, until in cooling.items() if nid not in kept]
    times = ([wake_at] if wake_at is not None else []) + ends
    return Wait(wake_at=min(times) if times else None)


def _next_round(view, members, *, active=True, cause, restart_count=None,
                cause_time=None, records=None) -> Round:
    prev = view.round
    return Round(
        number=(prev.number + 1) if prev else 1,
        members=tuple(members),
        active=active,
        restart_count=restart_count if restart_count is not None else (prev.restart_count if prev else 0),
        cause=cause,
        cause_time=view.now if cause_time is None else cause_time,
        blacklist=_blacklist(view) if records is None else records,
    )


def choose_leavers(members: Sequence[Member], nodes: Mapping[str, NodeInfo],
                   first_seen: Mapping[str, float], count: int) -> Tuple[str, ...]:
    """Which `count` members leave to shrink the round: never the first (it holds rank 0, and
    the state lives there), spot nodes before on-demand ones, the newest first."""
    def spot(m: Member) -> bool:
        info = nodes.get(m.node_id)
        return info is not None and info.spot
    chosen = victims.leavers(members[1:], count, spot=spot,
                             joined_at=lambda m: first_seen.get(m.node_id, 0.0),
                             key=lambda m: m.node_id)
    return tuple(m.node_id for m in chosen)


def _target(view: View, settings: RendezvousSettings) -> int:
    if view.desired is None:
        return settings.max_nodes
    return max(settings.min_nodes, min(settings.max_nodes, view.desired))


def decide(view: View, settings: RendezvousSettings) -> Decision:
    """Return the next step for the job seen in `view`."""
    if view.outcome is not None or view.stopping:
        return Wait()
    current = view.round
    # Only live nodes outside the round can be left out of the next one.
    members = set(current.node_ids) if current else set()
    cooling = blacklist.cooling_down(_blacklist(view), view.now)
    cooling = {nid: until for nid, until in cooling.items()
               if nid in view.nodes and nid not in members and nid not in view.released}
    target = _target(view, settings)
    if current is None or not current.active:
        return _decide_waiting(view, settings, cooling, target)
    return _decide_running(view, settings, current, cooling, target)


def _decide_waiting(view: View, settings: RendezvousSettings,
                    cooling: Dict[str, float], target: int) -> Decision:
    """No workers run: start once enough nodes are here, or fail after join_timeout."""
    current = view.round
    survivors = [m for m in (current.members if current else ())
                 if m.node_id in view.nodes and m.node_id not in view.released]
    newcomers = _newcomers(view, [m.node_id for m in survivors], cooling)
    kept = _keep_for_min(cooling, settings.min_nodes - len(survivors) - len(newcomers))
    newcomers += kept
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
        return _wake(deadline, cooling)
    cause = "start" if current is None else "node_joined"
    if count < target:
        # Last call: wait a little after min is reached for more nodes, so that nodes started
        # together form one round instead of a string of rescales.
        seen = sorted(_since(view, m.node_id) for m in candidates)
        window = settings.last_call_timeout if current is None else settings.join_settle
        ready_at = max(seen[settings.min_nodes - 1], waiting_since) + window
        if view.now < ready_at:
            return _wake(ready_at, cooling, kept)
    members = candidates[:target]
    chosen = {m.node_id for m in members}
    return Publish(
        _next_round(view, members, cause=cause,
                    records=blacklist.cut_short(_blacklist(view), kept, view.now)),
        joined=tuple(nid for nid in newcomers if nid in chosen),
        kept=tuple(kept),
    )


def _decide_running(view: View, settings: RendezvousSettings, current: Round,
                    cooling: Dict[str, float], target: int) -> Decision:
    survivors = [m for m in current.members
                 if m.node_id in view.nodes and m.node_id not in view.released]
    # A released node may deregister before the leader looks: it still left because it was released.
    released = tuple(m.node_id for m in current.members if m.node_id in view.released)
    gone = tuple(m.node_id for m in current.members
                 if m.node_id not in view.nodes and m.node_id not in view.released)
    departed = gone + released
    newcomers = _newcomers(view, current.node_ids, cooling)
    room = target - len(survivors)
    if departed:
        joined = newcomers[: max(room, 0)]
        kept = _keep_for_min(cooling, settings.min_nodes - len(survivors) - len(joined))
        joined = tuple(joined + kept)
        members = survivors + [_member(view.nodes[nid]) for nid in joined]
        records = blacklist.cut_short(_blacklist(view), kept, view.now)
        cause = "node_left" if gone else "released"
        if len(members) < settings.min_nodes:  # then nobody was kept: it would not help
            return Publish(_next_round(view, members, active=False, cause=cause),
                           departed=departed, released=released)
        return Publish(_next_round(view, members, cause=cause, records=records),
                       departed=departed, joined=joined, kept=tuple(kept), released=released)
    if view.failures:
        return _decide_failure(view, settings, current, survivors, newcomers)
    if len(survivors) > target:
        leavers = choose_leavers(survivors, view.nodes, view.first_seen, len(survivors) - target)
        members = [m for m in survivors if m.node_id not in leavers]
        return Publish(_next_round(view, members, cause="resized"), resized=leavers)
    if newcomers and room > 0:
        first_join = min(_since(view, nid) for nid in newcomers)
        if view.now < first_join + settings.join_settle:
            return Wait(wake_at=first_join + settings.join_settle)
        joined = tuple(newcomers[:room])
        members = survivors + [_member(view.nodes[nid]) for nid in joined]
        # The rescale is timed from the join, so the coalescing window counts against it; a
        # spare that waited for room (a resize up) is timed from when the room appeared.
        cause_time = max(first_join, view.now - settings.join_settle)
        return Publish(_next_round(view, members, cause="node_joined", cause_time=cause_time),
                       joined=joined)
    return _wake(None, cooling if room > 0 else {})


def _decide_failure(view: View, settings: RendezvousSettings, current: Round,
                    survivors: list, newcomers: list) -> Decision:
    """Workers failed and no member left: re-form the round (one restart, one strike for the
    first node to fail), or end the job when max_restarts is used up."""
    first = min(view.failures, key=lambda f: (f.time, f.node_id))
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
    culprit = first.node_id
    records, due = blacklist.add_strike(current.blacklist, culprit, settings)
    excluded, kept = (), ()
    if due:
        others = [m.node_id for m in survivors if m.node_id != culprit]
        others += [nid for nid in newcomers if nid != culprit]
        if len(others) >= settings.min_nodes:
            records = blacklist.exclude(records, culprit, view.now, settings)
            excluded = (culprit,)
            survivors = [m for m in survivors if m.node_id != culprit]
            newcomers = [nid for nid in newcomers if nid != culprit]
        else:
            kept = (culprit,)
    joined = tuple(newcomers[: max(_target(view, settings) - len(survivors), 0)])
    members = survivors + [_member(view.nodes[nid]) for nid in joined]
    return Publish(
        _next_round(view, members, cause="worker_failed", cause_time=first.time,
                    restart_count=current.restart_count + 1, records=records),
        joined=joined, excluded=excluded, kept=kept,
    )
