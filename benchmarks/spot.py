"""Goodput under a replayed spot-preemption schedule: this launcher against torchrun (c10d), side by side.

The job: `--nodes` agents (one "node" each, 1 worker, `--nnodes 1:N`) on this machine, running
benchmarks/spot_train.py, which is benchmarks/rescale_train.py (DDP on gloo, ElasticState committed
and checkpointed every 5 steps to one shared path, 0.05 s of made-up compute per step; written with
integrations.torch.run, so it switches in place under our launcher and is restarted from the
checkpoint under torchrun) plus one MEMBER line per rank per entry into a world. Rank 0 prints
`STEP <unix time> step=N world=W` after each optimizer step and `ENTER ...` on each entry into a world;
the MEMBER lines say which nodes each world held.

The schedule, drawn up front from `--seed` (repetition r uses seed + r - 1) and replayed identically
for every launcher (times are seconds after t0, the end of an undisturbed warm-up at full size):

  - every node but the first (A) is preempted after an exponential lifetime of mean
    `--mean-interval` s, counted from the moment it was started;
  - notice at t, deadline at t + `--notice`; at the deadline the node's whole process tree gets
    SIGKILL if anything of it is still alive;
  - a replacement node (B2, B3, ...) is started `--replace-after` s after the deadline (spot capacity
    coming back), and is itself preempted on the same law;
  - only preemptions whose deadline and replacements whose start fall before `--duration` are kept.

What each launcher gets:

  ours      each agent has its own `--preemption-file`; at notice time the benchmark writes it (written
            aside, renamed into place). `--preemption-grace` is the notice, so the agent knows its
            deadline; it leaves at the next step boundary, its workers committing with the others.
  torchrun  no notice channel: nothing happens at notice time; the node is SIGKILLed at the
            deadline, like a VM reclaimed under it. (SIGTERM first would change nothing here: its
            agent would stop its workers and exit, and the survivors would restart just the same.)
            It runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torch's opt-out of sharing the
            rendezvous store with the workers: with the default (launcher `torchrun-shared`, not run
            unless asked), in torch 2.13 a node joining a job that has already run a round waits
            for a MASTER_ADDR key the old rank 0 never writes again (it keeps its first round's
            bootstrap info), the old rank 0 waits for the newcomer's role_info, and after 60 s every
            agent fails with DistStoreError: no replacement could ever join.
  A is never preempted, for either: torchrun's c10d store lives in agent A (it is started first and
  must be listening before the others start), and losing it ends a torchrun job; ours has no such
  node, but A is spared too so that both replay the same faults. Both get `--rdzv-conf
  last_call_timeout=--last-call` (torchrun's default is 30 s, ours 3 s) and `--max-restarts 1000`.

Figures, per launcher, from the lines the training script prints (its own clock), not the launchers':

  t_step        mean undisturbed step time: (time between the first and last STEP) / (steps between
                them) over a `--warmup` s window at full size, just before t0, same launcher.
  useful steps  progress that survived the window [t0, t0 + duration]: S_end - S_start, where
                S_start is the step of the last STEP printed at or before t0, and S_end the step of
                the last STEP printed at or before the end, unless the job then rolls back: after the
                end the benchmark waits for the next STEP (no more faults) and S_end is at most that
                step's number minus one. (A job that prints no step again counts its last checkpoint.)
  vs undisturbed  useful steps / the useful steps of an undisturbed run: in every repetition each
                launcher also runs the same job for the same duration with no fault at all, the two
                runs in alternating order (undisturbed first in odd repetitions); this is the goodput
                the summary reports, with its spread over repetitions.
  goodput       useful steps x t_step / duration: the fraction of the warm-up's pace the job kept
                (kept for reference: it can exceed 1 when a smaller world steps faster than the
                full one on 2 cores, which the undisturbed run does not).
  steps/min     useful steps per minute of wall time, next to the undisturbed rate 60 / t_step.
  recomputed    steps trained more than once: STEP lines whose number is not above the highest
                printed before them (a step printed again after a rollback). Each is charged to the
                change that led to the world it was retrained in (the first one when a restart folded
                several, e.g. a kill and a replacement's start), else to the latest event before it.
  gaps          steps skipped: a STEP more than one above the highest step so far, where that highest
                counts the step each world starts from (its ENTER: steps a stopped process committed
                but had no time to print are trained, not skipped; shown as "not printed"). Must be 0.
                The sampler takes every step's batch from the committed cursor, so no gap means no
                sample was skipped (samples lost are not counted directly).
  to new world  preemption: from its reference time (ours: the notice; torchrun: the kill, since
                nothing happens before it) to the first STEP of the first world entered after it that
                does not hold the node; replacement: from its start to the first STEP of the first world
                that holds it. `*` when another scheduled event fell inside that interval. A node
                preempted before its workers ever entered a world has nothing to measure (shown, not
                in the medians).
  stall         the longest time between two consecutive STEPs from the last step before the
                reference time to that first step in the new world: the training time the user lost.

    python benchmarks/spot.py [--seed 1] [--nodes 3] [--mean-interval 40] [--notice 5] \
        [--replace-after 5] [--duration 120] [--reps 3] [--launchers ours,torchrun] [--keep-logs]

Every process it starts is ended by it (also on Ctrl-C or SIGTERM), and its temporary directory is
removed unless --keep-logs is given or our launcher misbehaved (then its path is printed).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescale import last_error  # noqa: E402
from spot_analysis import Result, analyse  # noqa: E402
from spot_job import LAUNCHERS, Failed, Job  # noqa: E402
from spot_report import print_result, report  # noqa: E402
from spot_schedule import SLOTS, Preemption, make_schedule, print_schedule  # noqa: E402


class Interrupted(Exception):
    """SIGTERM/SIGHUP to the benchmark: clean up as for Ctrl-C."""


def run_one(launcher: str, job_dir: Path, schedule: list[Preemption], args) -> Result:
    with Job(launcher, job_dir, args) as job:
        try:
            t0, t_step = job.bring_up()
        except Failed as exc:
            return Result(launcher, math.nan, args.duration, [], scheduled=len(schedule), failure=str(exc))
        print(f"  {launcher}: t0 reached, t_step {t_step * 1000:.0f} ms; replaying", flush=True)
        load_t0 = os.getloadavg()[0]
        done = job.replay(schedule, t0)
        load = f"{load_t0:.1f} / {os.getloadavg()[0]:.1f}"
        job.drain(schedule, done, t0, t_step)
        job.check_agents()
        names = [n for p in schedule for n in (p.node, p.replacement) if n]
        exits = {name: f"{code}: {last_error(job.agent_log(name))}" for name, code in job.exits.items()}
        result = analyse(launcher, job.lines(), job.members(), schedule, done, t0, t0 + args.duration, t_step,
                         exits=exits, event_logs={n: job.events(n) for n in names} if job.ours else None)
        result.load = load
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3, help="agents of one worker each (default 3)")
    parser.add_argument("--mean-interval", type=float, default=40.0,
                        help="mean seconds a node lives before its preemption notice (exponential)")
    parser.add_argument("--notice", type=float, default=5.0, help="seconds from notice to the kill")
    parser.add_argument("--replace-after", type=float, default=5.0,
                        help="seconds from the kill to the start of a replacement node")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of schedule per launcher")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of undisturbed training at full size that measure t_step")
    parser.add_argument("--last-call", type=int, default=1,
                        help="last_call_timeout (whole s) for both rendezvous (torchrun's default 30, ours 3)")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--reps", type=int, default=3,
                        help="repetitions, each a preempted and an undisturbed run per launcher")
    parser.add_argument("--launchers", default="ours,torchrun", help=f"comma list of: {', '.join(LAUNCHERS)}")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs' temporary directory")
    args = parser.parse_args()
    launchers = [n.strip() for n in args.launchers.split(",") if n.strip()]
    if not launchers or set(launchers) - set(LAUNCHERS) or len(set(launchers)) != len(launchers):
        parser.error(f"--launchers takes some of {', '.join(LAUNCHERS)}, comma-separated")
    if not 2 <= args.nodes <= len(SLOTS):
        parser.error("--nodes must be 2 to 26")
    if min(args.mean_interval, args.duration, args.warmup) <= 0 or min(args.notice, args.replace_after) < 0 \
            or args.reps < 1 or args.last_call < 1:
        parser.error("times must be positive, --reps and --last-call at least 1")

    def interrupt(signum, _frame):
        # Once: a second signal must not cut short the clean-up the first one starts.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    schedules = [make_schedule(args.seed + rep, args.nodes, args.mean_interval, args.notice,
                               args.replace_after, args.duration) for rep in range(args.reps)]
    for rep, schedule in enumerate(schedules):
        print_schedule(schedule, args.seed + rep, args)
    log_root = Path(tempfile.mkdtemp(prefix="spot-bench-"))
    print(f"\nLogs: {log_root}", flush=True)
    keep = args.keep_logs
    results: dict[str, list[Result]] = {n: [] for n in launchers}
    try:
        for rep, schedule in enumerate(schedules, 1):
            for name in launchers:
                runs = [("preempted", schedule), ("undisturbed", [])]
                got = {}
                for kind, plan in runs if rep % 2 == 0 else runs[::-1]:
                    print(f"rep {rep}/{args.reps} {name} ({kind}): starting {args.nodes} nodes",
                          flush=True)
                    got[kind] = run_one(name, log_root / f"rep{rep}-{name}-{kind}", plan, args)
                    if kind == "undisturbed":
                        print(f"  {name} undisturbed: {got[kind].useful} useful steps"
                              + (f" ({got[kind].failure})" if got[kind].failure else ""), flush=True)
                r = got["preempted"]
                r.baseline = got["undisturbed"].useful
                results[name].append(r)
                print_result(r, rep)
                sys.stdout.flush()
                if name.startswith("ours") and (r.failure or r.exits or r.gaps or r.pending
                                           or any(c.recomputed for c in r.preemptions())):
                    keep = True
        report(results, args)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): every process this benchmark started was stopped", flush=True)
        keep = args.keep_logs
        raise SystemExit(130)
    finally:
        if keep:
            print(f"Logs kept in {log_root}")
        else:
            shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()
