"""The preemption schedule of the spot benchmark: which node is preempted when, when its
replacement starts, the actions that replay it, and how it is printed (with print_table, the
table printer the report shares). Pure and seeded: the same settings give the same schedule."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Optional

SLOTS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Preemption:
    slot: str
    node: str                   # the agent preempted: B, or a replacement B2, B3, ...
    notice_at: float            # seconds after t0
    kill_at: float              # the deadline
    replacement: Optional[str]  # the node started in its place, if before the end
    start_at: Optional[float]


def node_name(slot: str, generation: int) -> str:
    return slot if generation == 1 else f"{slot}{generation}"


def make_schedule(seed: int, nodes: int, mean_interval: float, notice: float, replace_after: float,
                  duration: float) -> list[Preemption]:
    """Each slot but the first draws its own stream (seeded by seed and slot), so the schedule of
    slot B does not depend on --nodes."""
    out = []
    for slot in SLOTS[1:nodes]:
        rng = random.Random(f"spot:{seed}:{slot}")
        up, generation = 0.0, 1
        while True:
            notice_at = up + rng.expovariate(1.0 / mean_interval)
            kill_at = notice_at + notice
            if kill_at >= duration:
                break
            start_at = kill_at + replace_after
            if start_at >= duration:
                out.append(Preemption(slot, node_name(slot, generation), notice_at, kill_at, None, None))
                break
            out.append(Preemption(slot, node_name(slot, generation), notice_at, kill_at,
                                  node_name(slot, generation + 1), start_at))
            up, generation = start_at, generation + 1
    return sorted(out, key=lambda p: p.notice_at)


@dataclass(frozen=True, order=True)
class Action:
    at: float
    order: int  # notice, kill, start: in this order at equal times
    kind: str
    node: str
    index: int  # of the preemption in the schedule


def actions(schedule: list[Preemption]) -> list[Action]:
    out = []
    for i, p in enumerate(schedule):
        out.append(Action(p.notice_at, 0, "notice", p.node, i))
        out.append(Action(p.kill_at, 1, "kill", p.node, i))
        if p.replacement is not None:
            out.append(Action(p.start_at, 2, "start", p.replacement, i))
    return sorted(out)


def print_schedule(schedule: list[Preemption], seed: int, args: argparse.Namespace) -> None:
    print(f"\nSchedule (seed {seed}): {len(schedule)} preemption(s) in {args.duration:g} s; "
          f"times in s after t0 (end of warm-up)")
    rows = [[f"{a.at:.1f}", a.node, {"notice": f"preemption notice ({args.notice:g} s)",
                                     "kill": "deadline: SIGKILL of its tree if still alive",
                                     "start": "replacement node starts"}[a.kind]]
            for a in actions(schedule)]
    print_table(["t", "node", "action"], rows or [["-", "-", "(no preemption in this window)"]])


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
