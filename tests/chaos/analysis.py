"""What a chaos run's evidence says: its figures (faults by kind, recovery times, recomputed
steps, samples lost) and the injected faults the event log fails to show. Pure functions over
parsed records."""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import schedule as sched
from .history import Audit
from .job import Injected


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def recovery_s(fault: Injected, steps: Sequence[Tuple[float, int, int]]) -> Optional[float]:
    """Seconds from the fault to rank 0's first step after it in the world that follows it."""
    after = [t for t, _, world in steps if t > fault.time and world == fault.world]
    return round(min(after) - fault.time, 3) if after else None


def recomputed(attempts: Dict[int, list]) -> Tuple[int, int]:
    """(extra trainings of steps, steps trained more than once); a step's trainings are the
    distinct rounds whose records hold it."""
    rounds = [len({r["round"] for r in recs}) for recs in attempts.values()]
    return sum(n - 1 for n in rounds), sum(n > 1 for n in rounds)


def unlogged(faults: Iterable[Injected], events: Sequence[dict]) -> List[str]:
    """The faults the event log does not show, described."""
    missing = []
    for f in faults:
        later = [e for e in events if e["time"] >= f.time]
        if not any(_shows(f, e, later) for e in later):
            missing.append(f"fault {f.index} {f.kind} {f.target or ''} (node {f.node}) "
                           f"at {f.time:.3f}")
    return missing


def _shows(f: Injected, e: dict, later: Sequence[dict]) -> bool:
    kind, name = f.kind, e["event"]
    if kind == sched.JOIN:
        return name == "joined" and e["node"] == f.node
    if kind == sched.SIGKILL:
        return ((name == "node_left" and e["cause"] == "removed" and f.node in e.get("nodes", ()))
                or (name == "rescale" and f.node not in (e["members"] or ())))
    if kind == sched.SIGTERM:
        return name == "node_left" and e["cause"] == "sigterm" and e["node"] == f.node
    if kind == sched.PREEMPT:  # the notice, and the node leaving on it
        return name == "preemption_notice" and e["node"] == f.node and any(
            x["event"] == "node_left" and x["node"] == f.node for x in later)
    if kind == sched.HANG:
        return name == "worker_hung"
    if kind == sched.ETCD_RESTART:
        return name == "etcd_unreachable" and any(x["event"] == "etcd_reconnected" for x in later)
    raise ValueError(f"unknown fault kind {kind!r}")


def figures(faults: Sequence[Injected], steps, attempts, history: Audit,
            events: Sequence[dict]) -> dict:
    recoveries = [(f, recovery_s(f, steps)) for f in faults]
    by_kind: Dict[str, List[float]] = {}
    for f, r in recoveries:
        if r is not None:
            by_kind.setdefault(f.kind, []).append(r)
    extra, repeated = recomputed(attempts)
    every = [r for rs in by_kind.values() for r in rs]
    return {
        "faults": len(faults),
        "faults_by_kind": dict(Counter(f.kind for f in faults)),
        "recovery_s": [{"index": f.index, "kind": f.kind, "target": f.target, "node": f.node,
                        "world_after": f.world, "recovery_s": r, "exit_code": f.exit_code}
                       for f, r in recoveries],
        "recovery_p50_s": percentile(every, 50),
        "recovery_p95_s": percentile(every, 95),
        "recovery_by_kind_s": {k: {"p50": percentile(v, 50), "p95": percentile(v, 95),
                                   "max": max(v)} for k, v in sorted(by_kind.items())},
        "steps_total": len(attempts),
        "steps_recomputed": extra,
        "steps_trained_more_than_once": repeated,
        "samples_lost": history.lost,
        "samples_duplicated": history.duplicated,
        "samples_unrecorded": history.unrecorded,
        "rounds": len({e["round"] for e in events if e["event"] in ("rendezvous", "rescale")}),
        "restarts": max((e.get("restart_count", 0) for e in events if e["event"] == "rescale"),
                        default=0),
        "workers_hung": sum(e["event"] == "worker_hung" for e in events),
    }


def describe(fig: dict) -> str:
    lines = [f"chaos: {fig['faults']} faults {fig['faults_by_kind']}",
             f"  recovery p50 {fig['recovery_p50_s']} s, p95 {fig['recovery_p95_s']} s"]
    lines += [f"    {k}: p50 {v['p50']} s, p95 {v['p95']} s, max {v['max']} s"
              for k, v in fig["recovery_by_kind_s"].items()]
    lines.append(f"  steps {fig['steps_total']}, recomputed {fig['steps_recomputed']} "
                 f"({fig['steps_trained_more_than_once']} steps more than once), samples lost "
                 f"{fig['samples_lost']}, duplicated {fig['samples_duplicated']}, unrecorded "
                 f"{fig['samples_unrecorded']}")
    lines.append(f"  rounds {fig['rounds']}, restarts counted {fig['restarts']}, "
                 f"workers killed as hung {fig['workers_hung']}")
    if fig.get("invariants_broken"):
        lines.append(f"  invariants broken: {len(fig['invariants_broken'])} (see the failure)")
    lines += [f"    fault {r['index']:>3} {r['kind']:<12} {r['target'] or '':<4} -> world "
              f"{r['world_after']}: recovered in {r['recovery_s']} s" for r in fig["recovery_s"]]
    return "\n".join(lines)
