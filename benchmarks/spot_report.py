"""The spot benchmark's printed results: each run's table of changes and figures, and the summary
across launchers and repetitions."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescale_train import machine  # noqa: E402
from spot_analysis import Result  # noqa: E402
from spot_schedule import print_table  # noqa: E402

BASE = "ours"


def secs(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f} s"


def median(values: list) -> Optional[float]:
    """Median where a missing figure (no recovery) sorts after every number; None if it lands there."""
    vals = [math.inf if v is None else v for v in values]
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def spread(values: list) -> Optional[str]:
    return f"{min(values):.1%}-{max(values):.1%}" if values else None


def print_result(r: Result, rep: int) -> None:
    if math.isnan(r.t_step):
        print(f"\n[{r.launcher}, rep {rep}]")
    else:
        print(f"\n[{r.launcher}, rep {rep}] t_step {r.t_step * 1000:.0f} ms undisturbed "
              f"({60 / r.t_step:.0f} steps/min)")
    if r.failure:
        print(f"  NO RESULT: {r.failure}")
    rows = []
    for c in r.changes:
        rows.append([c.label, c.world or "-", secs(c.to_new) + ("*" if c.overlapped else ""),
                     secs(c.stall), str(c.recomputed), c.what + (" (not in medians)" if c.skip else "")])
    if rows:
        print_table(["change", "world", "to new world", "stall", "recomputed", "what happened"], rows)
    if any(c.overlapped for c in r.changes):
        print("  * another scheduled event fell inside this interval")
    for name, why in r.exits.items():
        print(f"  UNEXPECTED: agent {name} exited with code {why}")
    if r.useful is not None:
        print(f"  useful steps {r.useful} (step {r.s_start} -> {r.s_end}{'; ' + r.end_note if r.end_note else ''}); "
              f"{r.per_min:.0f} surviving steps/min vs {60 / r.t_step:.0f} undisturbed; goodput {r.goodput:.1%}; "
              + (f"vs the undisturbed run ({r.baseline} steps) {r.vs_undisturbed:.1%}; "
                 if r.vs_undisturbed is not None else "") +
              f"recomputed {r.recomputed}" + (f" ({r.unattributed} before any event)" if r.unattributed else "")
              + f"; gaps {r.gaps}" + (f" ({r.unprinted} step(s) trained but not printed)" if r.unprinted else "")
              + f"; 1-min load average at t0 / end {r.load}")


def summary_figures(results: list[Result]) -> dict:
    pre = [c for r in results for c in r.preemptions()]
    joins = [c for r in results for c in r.joins()]
    n_pre = sum(r.scheduled for r in results)  # the same for every launcher
    total_rec = sum(r.recomputed for r in results)
    return {
        # A run that never got going kept nothing: 0, not a missing figure.
        "vs_undisturbed": median([r.vs_undisturbed or 0.0 for r in results]),
        "vs_spread": spread([r.vs_undisturbed or 0.0 for r in results]),
        "goodput": median([r.goodput or 0.0 for r in results]),
        "per_min": median([r.per_min or 0.0 for r in results]),
        "undisturbed": median([60 / r.t_step for r in results if not math.isnan(r.t_step)]),
        "useful": median([r.useful or 0 for r in results]),
        "rec_per_pre": total_rec / n_pre if n_pre else None,
        "rec_median": median([c.recomputed for c in pre]),
        "pre_to_new": median([c.to_new for c in pre]),
        "pre_stall": median([c.stall for c in pre]),
        "join_to_new": median([c.to_new for c in joins]),
        "join_stall": median([c.stall for c in joins]),
        "gaps": sum(r.gaps for r in results),
        "n_pre": n_pre, "n_join": len(joins), "recomputed": total_rec,
        "failed": sum(1 for r in results if r.failure),
    }


def fmt(key: str, v: Optional[float]) -> str:
    if v is None:
        return "no result"
    if key in ("goodput", "vs_undisturbed"):
        return f"{v:.1%}"
    if key == "vs_spread":
        return v
    if key in ("per_min", "undisturbed", "useful", "gaps", "recomputed"):
        return f"{v:.0f}"
    if key in ("rec_per_pre", "rec_median"):
        return f"{v:.1f}"
    return f"{v:.2f} s"


ROWS = [("vs_undisturbed", "goodput: useful steps / an undisturbed run's (median)"),
        ("vs_spread", "  the same, lowest-highest of the repetitions"),
        ("goodput", "useful steps x warm-up t_step / wall"),
        ("per_min", "surviving steps per minute of wall time"),
        ("undisturbed", "undisturbed steps per minute (warm-up)"),
        ("useful", "useful steps"),
        ("recomputed", "steps recomputed, total"),
        ("rec_per_pre", "steps recomputed per scheduled preemption (all / preemptions)"),
        ("rec_median", "steps recomputed charged to a preemption, median"),
        ("pre_to_new", "preemption -> first step in a world without the node, median"),
        ("pre_stall", "stall per preemption, median"),
        ("join_to_new", "replacement start -> first step in a world with it, median"),
        ("join_stall", "stall per replacement join, median"),
        ("gaps", "steps skipped (gaps; 0 = no sample lost)")]


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    launchers = list(results)
    figs = {name: summary_figures(rs) for name, rs in results.items() if rs}
    print(f"\nMachine: {machine()}; shared: 1-min load average at t0 / end of each run: " + ", ".join(
        f"{n} {r.load}" for n, rs in results.items() for r in rs if r.load) + ".")
    print(f"{args.reps} repetition(s), launchers in the order {', '.join(launchers)}; each: "
          f"{args.duration:g} s of replayed schedule after a {args.warmup:g} s undisturbed warm-up at "
          f"{args.nodes} nodes; medians over preemptions/joins of all repetitions.")
    print(f"Notice {args.notice:g} s and mean interval {args.mean_interval:g} s are scaled down for a "
          f"benchmark: clouds give 30 s (GCE) to 2 min (AWS) of notice, and preempt after hours.")
    print("Node A is never preempted: for torchrun it hosts the c10d store, and preempting it would end "
          "the job; ours has no such node, but A is spared for it too so that both replay the same faults.")
    print("torchrun gets nothing at notice time (no notice channel) and its node is SIGKILLed at the "
          "deadline; ours gets its notice file at notice time and is SIGKILLed at the deadline only if "
          "still alive.")
    header = ["figure", *launchers]
    rows = [[label, *[fmt(key, figs[n][key]) if n in figs else "no result" for n in launchers]]
            for key, label in ROWS]
    failed = [f"{n} {f['failed']} of {args.reps}" for n, f in figs.items() if f["failed"]]
    if failed:
        print("Runs that never reached full size and count as goodput 0: " + ", ".join(failed))
    print()
    print_table(header, rows)
    others = [n for n in launchers if n != BASE and n in figs]
    if BASE in figs:
        for n in others:
            g_b, g_o = figs[BASE]["vs_undisturbed"], figs[n]["vs_undisturbed"]
            s_b, s_o = figs[BASE]["pre_stall"], figs[n]["pre_stall"]
            parts = [f"goodput {BASE}/{n} " + (f"{g_b / g_o:.2f}x" if g_b and g_o else "n/a"),
                     f"stall per preemption {n}/{BASE} " + (f"{s_o / s_b:.1f}x" if s_b and s_o else "n/a")]
            print("ratio: " + "; ".join(parts))
    summary = [f"{n}: goodput {fmt('vs_undisturbed', f['vs_undisturbed'])} of an undisturbed run "
               f"({f['vs_spread']}), {fmt('per_min', f['per_min'])} surviving "
               f"steps/min (undisturbed {fmt('undisturbed', f['undisturbed'])}), recomputed/preemption "
               f"{fmt('rec_per_pre', f['rec_per_pre'])}, stall/preemption {fmt('pre_stall', f['pre_stall'])}, "
               f"gaps {f['gaps']}" for n, f in figs.items()]
    n_pre = next(iter(figs.values()))["n_pre"] if figs else 0
    ok = None
    if BASE in figs:
        f = figs[BASE]
        ok = f["gaps"] == 0 and f["recomputed"] == 0 and not any(r.exits for r in results[BASE])
    verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[ok]
    good = None if BASE not in figs or figs[BASE]["vs_undisturbed"] is None else \
        figs[BASE]["vs_undisturbed"] >= 0.95
    verdict += "; ours' goodput >= 95% of an undisturbed run: " + {
        True: "MET", False: "NOT MET", None: "NOT MEASURED"}[good]
    print(f"\nSUMMARY ({os.cpu_count()} cores, CPU only, seed {args.seed}, {n_pre} preemption(s) with "
          f"{args.notice:g} s notice in {args.reps} x {args.duration:g} s, median) " + "; ".join(summary)
          + f". ours recomputes no step, skips none and no agent of it crashed: {verdict}")
