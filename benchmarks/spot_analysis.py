"""What a spot run's lines say: the MEMBER lines read into worlds, and the figures of one job
(useful steps, goodput, recomputed steps, gaps, time to a new world and stall per change)."""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescale_train import Line  # noqa: E402
from spot_schedule import Preemption  # noqa: E402

COMMIT_EVERY = 5
RECOVERY_LIMIT_S = 60.0  # a change with no step in its new world after this long has no result
MEMBER_SLACK_S = 5.0  # a rank's MEMBER line belongs to the world whose rank-0 ENTER is nearest, within this
MEMBER = re.compile(r"\bMEMBER (\d+(?:\.\d+)?) node=(\S+) rank=(\d+) world=(\d+)")


@dataclass
class Done:
    """What the benchmark actually did for one preemption (unix times)."""

    notice: Optional[float] = None
    kill: Optional[float] = None
    alive_at_kill: Optional[bool] = None
    start: Optional[float] = None


@dataclass
class Change:
    """One scheduled change as the job lived it."""

    label: str                   # "preempt B", "start B2"
    ref: Optional[float]         # unix time the change is measured from
    kind: str                    # preempt or join
    node: str = ""
    world: str = ""              # "3->2"
    to_new: Optional[float] = None
    stall: Optional[float] = None
    overlapped: bool = False
    recomputed: int = 0
    what: str = ""
    pending: bool = False        # no step in a new world yet, still within the limit
    skip: bool = False           # nothing to measure: a node preempted before it ever joined
    new_enter: Optional[float] = None  # rank 0's ENTER time of the world it led to


@dataclass
class Result:
    launcher: str
    t_step: float
    duration: float
    changes: list
    scheduled: int = 0           # preemptions in the schedule
    useful: Optional[int] = None
    s_start: Optional[int] = None
    s_end: Optional[int] = None
    end_note: str = ""
    recomputed: int = 0
    unattributed: int = 0
    gaps: int = 0
    unprinted: int = 0
    after_end: Optional[Line] = None
    exits: dict = field(default_factory=dict)  # agent -> why it exited unasked
    failure: str = ""
    load: str = ""               # the machine's 1-min load average at t0 and at the end
    baseline: Optional[int] = None  # useful steps of the same launcher's undisturbed run, same rep

    @property
    def pending(self) -> bool:
        return any(c.pending for c in self.changes)

    @property
    def goodput(self) -> Optional[float]:
        return None if self.useful is None else self.useful * self.t_step / self.duration

    @property
    def vs_undisturbed(self) -> Optional[float]:
        """Useful steps over those of an undisturbed run of the same length, same launcher, same
        repetition: the comparable goodput (the warm-up's t_step is measured at full size only)."""
        if self.useful is None or not self.baseline:
            return None
        return self.useful / self.baseline

    @property
    def per_min(self) -> Optional[float]:
        return None if self.useful is None else self.useful * 60.0 / self.duration

    def preemptions(self) -> list:
        return [c for c in self.changes if c.kind == "preempt" and not c.skip]

    def joins(self) -> list:
        return [c for c in self.changes if c.kind == "join" and not c.skip]


@dataclass(frozen=True, order=True)
class Member:
    time: float
    node: str
    rank: int
    world: int


def read_members(files: list[Path]) -> list[Member]:
    """Every MEMBER line (one per rank per entry into a world), once each, in time order."""
    found = set()
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for ts, node, rank, world in MEMBER.findall(text):
            found.add(Member(float(ts), node, int(rank), int(world)))
    return sorted(found)


@dataclass
class World:
    """One world the job entered: rank 0's ENTER, the nodes whose ranks entered it, its first STEP."""

    enter: Line
    nodes: set
    first: Optional[Line] = None


def worlds_of(lines: list[Line], members: list[Member]) -> list[World]:
    enters = [x for x in lines if x.kind == "ENTER"]
    worlds = [World(e, set()) for e in enters]
    for m in members:  # every rank enters at about the same time as rank 0 (resume is collective)
        near = [w for w in worlds if w.enter.world == m.world and abs(w.enter.time - m.time) <= MEMBER_SLACK_S]
        if near:
            min(near, key=lambda w: abs(w.enter.time - m.time)).nodes.add(m.node)
    steps = [x for x in lines if x.kind == "STEP"]
    for i, w in enumerate(worlds):
        until = worlds[i + 1].enter.time if i + 1 < len(worlds) else math.inf
        w.first = next((x for x in steps if w.enter.time <= x.time < until and x.world == w.enter.world), None)
    return worlds


def analyse(launcher: str, lines: list[Line], members: list[Member], schedule: list[Preemption],
            done: list[Done], t0: float, t_end: float, t_step: float, exits: Optional[dict] = None,
            event_logs: Optional[dict] = None, final: bool = True) -> Result:
    """The figures of one job from its lines. final=False (while draining): a change whose new world
    has not been seen yet, within RECOVERY_LIMIT_S, is `pending`."""
    steps = [x for x in lines if x.kind == "STEP"]
    worlds = worlds_of(lines, members)
    now = time.time()
    result = Result(launcher, t_step, t_end - t0, [], scheduled=len(schedule), exits=dict(exits or {}))

    changes = []
    own_ref: dict = {}  # node -> the reference time of its own preemption
    for p, d in zip(schedule, done):
        ref = d.notice if launcher.startswith("ours") else d.kill
        if ref is not None:
            own_ref[p.node] = ref
        if not launcher.startswith("ours"):
            what = "SIGKILL at deadline (no notice channel)" if d.kill else "not reached"
        else:
            outcome = next((e["outcome"] for e in (event_logs or {}).get(p.node, [])
                            if e.get("event") == "node_left" and "outcome" in e), None)
            what = (f"left: {outcome}" if outcome else "no node_left event of its own") + \
                ("; SIGKILLed at deadline (still alive)" if d.alive_at_kill else "; gone by the deadline"
                 if d.kill else "")
        changes.append(Change(f"preempt {p.node}", ref, "preempt", node=p.node, what=what))
        if p.replacement is not None:
            what = "replacement started"
            joined = [e["time"] for e in (event_logs or {}).get(p.replacement, []) if e.get("event") == "joined"]
            if joined and d.start is not None:
                what += f"; registered after {joined[0] - d.start:.1f} s"
                if any(e.get("event") == "joined" and e.get("cause") == "prewarmed"
                       for e in event_logs.get(p.replacement, [])):
                    what += " (pre-warmed)"
            changes.append(Change(f"start {p.replacement}", d.start, "join", node=p.replacement, what=what))
    changes = [c for c in changes if c.ref is not None]
    changes.sort(key=lambda c: c.ref)
    refs = [c.ref for c in changes]

    for c in changes:
        current = [w for w in worlds if w.enter.time <= c.ref]
        if not current:
            c.what += "; no world before it"
            continue
        old = current[-1]
        limit = c.ref + RECOVERY_LIMIT_S
        if c.kind == "preempt":
            if c.node not in old.nodes:
                c.skip = True
                c.what += "; it was in no world yet: nothing to recover"
                continue
            new = next((w for w in worlds if c.ref < w.enter.time <= limit and c.node not in w.nodes), None)
        else:
            new = next((w for w in worlds if c.ref < w.enter.time <= limit and c.node in w.nodes), None)
        if new is None or new.first is None:
            own = own_ref.get(c.node) if c.kind == "join" else None
            if own is not None and own <= now and (new is None or new.enter.time > own):
                c.skip = True
                c.what += f"; preempted {own - c.ref:.1f} s after its start, before it trained"
            elif not final and now < limit:
                c.pending = True
            else:
                c.what += f"; no step in a new world (waited {min(now, limit) - c.ref:.0f} s)"
            continue
        c.new_enter = new.enter.time
        c.world = f"{old.enter.world}->{new.enter.world}"
        c.to_new = new.first.time - c.ref
        before = [x for x in steps if x.time <= c.ref]
        times = [x.time for x in before[-1:]] + [x.time for x in steps if c.ref < x.time <= new.first.time]
        c.stall = max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0
        c.overlapped = any(c.ref < r < new.first.time for r in refs)

    # Progress: rollbacks and gaps over the STEP sequence from t0 on.
    start = [x for x in steps if x.time <= t0]
    if not start:
        result.failure = "no step before t0"
        result.changes = changes
        return result
    result.s_start = start[-1].step
    highest = result.s_start
    for x in (x for x in lines if x.time > t0):
        if x.kind == "ENTER":
            # A world that starts from a state past the highest step printed: those steps were
            # trained (they are in the state it resumed from), but the process that trained them
            # was stopped between its commit and its STEP line.
            if x.step > highest:
                result.unprinted += x.step - highest
                highest = x.step
            continue
        if x.step <= highest:  # this step was trained before
            n = 1
            result.recomputed += n
            # Charged to the change that led to the world this step was retrained in (the first of
            # them when several, e.g. a kill and a join, were folded into one restart), else to the
            # latest change before it.
            into = [w for w in worlds if w.enter.time <= x.time]
            owner = [c for c in changes if into and c.new_enter == into[-1].enter.time] or \
                [c for c in changes if c.ref <= x.time][-1:]
            if owner:
                owner[0].recomputed += n
            else:
                result.unattributed += n
        elif x.step > highest + 1:
            result.gaps += x.step - highest - 1
        highest = max(highest, x.step)

    last = [x for x in steps if x.time <= t_end][-1]
    result.after_end = next((x for x in steps if x.time > t_end), None)
    if result.after_end is not None:
        result.s_end = min(last.step, result.after_end.step - 1)
        if result.s_end < last.step:
            result.end_note = (f"at the end it was recovering: last step before the end {last.step}, "
                               f"next step after it {result.after_end.step}")
    else:
        result.s_end = (last.step // COMMIT_EVERY) * COMMIT_EVERY
        result.end_note = f"no step after the end: counted its last checkpoint, step {result.s_end}"
    result.useful = result.s_end - result.s_start
    result.changes = changes
    return result
