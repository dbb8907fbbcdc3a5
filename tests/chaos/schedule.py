"""The fault schedule of a chaos run: which fault comes next and which agent it hits.

Pure and seeded: no processes, no clock; the same (seed, settings) gives the same schedule. The
runner (tests/chaos/job.py) replays it with `apply` to know which agents run after each fault.

Kinds (agents run one worker each, so an agent is a node), and when each is eligible:
    join          start a new agent (target: its new name); fewer than max_nodes run
    sigkill       SIGKILL an agent and its whole process tree (target); it leaves at least
                  max(min_nodes, 1) running, so the last agent is never hit
    sigterm       SIGTERM to an agent, a graceful leave (target); as sigkill
    preempt       a preemption notice for an agent (target); as sigkill
    hang          rank 1 stops making progress (target None: whichever agent holds rank 1
                  then); at least two run
    etcd_restart  etcd stops for a while, then restarts on its data dir (target None); always

Kinds are dealt from shuffled decks; the next fault is the first card that is eligible now
(the others wait their turn), and when none is, a fresh deck is added below. The first deck holds
each enabled kind once, so a short run (CI's 6 faults) meets every kind. Each later deck holds
each kind once plus the joins still owed for the departures dealt so far, so a long run keeps
returning to every size between min and max nodes instead of sinking to one node.
Any running agent may be the target, the first one (rank 0 at the start) included.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

JOIN, SIGKILL, SIGTERM, PREEMPT, HANG, ETCD_RESTART = (
    "join", "sigkill", "sigterm", "preempt", "hang", "etcd_restart")
ALL_KINDS = (JOIN, SIGKILL, SIGTERM, PREEMPT, HANG, ETCD_RESTART)
REMOVALS = (SIGKILL, SIGTERM, PREEMPT)


@dataclass(frozen=True)
class Fault:
    kind: str
    target: Optional[str]  # an agent's name for join and the removals; None for hang, etcd_restart


@dataclass(frozen=True)
class Schedule:
    initial: Tuple[str, ...]  # agents started before the first fault, in order
    faults: Tuple[Fault, ...]


@dataclass(frozen=True)
class Limits:
    min_nodes: int = 1
    max_nodes: int = 3
    initial: int = 3  # at max: a short run can then meet every kind

    def __post_init__(self):
        if not 1 <= self.min_nodes <= self.initial <= self.max_nodes:
            raise ValueError(f"need 1 <= min_nodes <= initial <= max_nodes, got {self}")


def agent_name(index: int) -> str:
    return f"n{index}"


def eligible(kind: str, running: Sequence[str], limits: Limits) -> bool:
    if kind == JOIN:
        return len(running) < limits.max_nodes
    if kind in REMOVALS:
        return len(running) - 1 >= max(limits.min_nodes, 1)
    if kind == HANG:
        return len(running) >= 2
    if kind == ETCD_RESTART:
        return True
    raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(ALL_KINDS)}")


def apply(running: Tuple[str, ...], fault: Fault) -> Tuple[str, ...]:
    """The agents running after `fault`, in start order."""
    if fault.kind == JOIN:
        return running + (fault.target,)
    if fault.kind in REMOVALS:
        return tuple(name for name in running if name != fault.target)
    return running


def make_schedule(seed: int, faults: int, kinds: Sequence[str] = ALL_KINDS,
                  limits: Limits = Limits()) -> Schedule:
    """`faults` faults drawn from `kinds` with a generator seeded by `seed`.

    Raises:
        ValueError: an unknown kind, no kind at all, a negative number of faults, or kinds of
            which none applies at some point (e.g. only joins, once max_nodes run).
    """
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise ValueError(f"fault kinds must be a non-empty subset of {ALL_KINDS}, got {kinds}")
    if faults < 0:
        raise ValueError(f"the number of faults must not be negative, got {faults}")
    rng = random.Random(seed)
    initial = tuple(agent_name(i) for i in range(limits.initial))
    running, started, deck, out = initial, len(initial), [], []
    owed = 0  # departures dealt that no join card makes up for yet
    while len(out) < faults:
        card = next((k for k in deck if eligible(k, running, limits)), None)
        if card is None:
            if not any(eligible(k, running, limits) for k in kinds):
                raise ValueError(f"no fault of kinds {kinds} applies with {len(running)} agents "
                                 f"running ({limits})")
            fresh = list(kinds)
            if JOIN in kinds:
                owed += sum(k in REMOVALS for k in kinds) - 1
                if out:  # not the first deck
                    fresh += [JOIN] * max(owed, 0)
                    owed = min(owed, 0)
            rng.shuffle(fresh)
            deck += fresh
            continue
        deck.remove(card)
        if card == JOIN:
            target, started = agent_name(started), started + 1
        elif card in REMOVALS:
            target = rng.choice(running)
        else:
            target = None
        fault = Fault(card, target)
        out.append(fault)
        running = apply(running, fault)
    return Schedule(initial=initial, faults=tuple(out))

