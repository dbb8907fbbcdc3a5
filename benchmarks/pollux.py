"""The Pollux/AdaptDL OSDI'21 artifact workloads through our cluster scheduler: every job elastic
(ours) against every job a rigid gang in a StrictFIFO queue, side by side in one run.

    python benchmarks/pollux.py [--workloads 1-8] [--interval 60] [--rescale-s 30]
                                [--elastic-min 1] [--jobs 1]

  ours      Workload.elastic(name, min, max, 1 GPU, throughput=samples/s at 1..max GPUs) in the
            default queue (BestEffortFIFO, no quota): admitted at min, grown into idle GPUs where
            one more adds the most throughput (when it adds at least GROWTH_MIN_EFFICIENCY of one
            GPU's), shrunk back toward min to admit waiting jobs. Batch policy `linear`: the local
            batch stays the trace's, the global batch grows with the workers; max = the largest
            global batch the artifact validated for the model / the local batch, at most 64.
  rigid     Workload.gang(name, the trace's num_replicas, 1 GPU) in one StrictFIFO queue, never
            resized; the head of the queue blocks it (the baseline of the target).
  rigid-bf  the same gangs in the default BestEffortFIFO queue (backfill around the reservation
            of the first gang short of room), for context.

The cluster is the artifact's simulator's and the paper's testbed's: 16 nodes of 4 GPUs, all
alike. Sia (SOSP'23) reports 30-93% lower JCT than Pollux on heterogeneous GPUs; nothing here is
heterogeneous. The workloads are the artifact's 8 of 160 jobs each (sampled from Microsoft's
Philly trace). benchmarks/pollux_trace.py says how a job is modelled and what is simpler than
the artifact (no statistical efficiency: a job's work is the samples its trace batch size needs,
at any size; placements charged as if packed); benchmarks/pollux_sim.py says how it is replayed
(a 30 s pause per resize, as the artifact). Data: benchmarks/data/README.md.

Check of the job model (VALIDATION): the artifact's recorded Tiresias+TunedJobs JCTs
(simulator/results-jobload/tiresias-1.0/summary.json: rigid jobs at the trace's GPUs and batch
size) hold, for each configuration that ever ran alone there, the time one run takes in the
artifact's own goodput model: the shortest recorded JCT of the configuration. Ours for the same
job (wait for the artifact's next 60 s tick, 30 s pause, run) must be within TOLERANCE of it.
imagenet has no such run (Tiresias demotes and preempts it after 16 GPU-hours); ncf is off by
design (KNOWN_OFF).

For context only (other policies, goodput-aware, not re-run here): the artifact's recorded
average JCT over the same 8 workloads is Pollux 2751 s, Tiresias+TunedJobs 4038 s, Optimus+
Oracle+TunedJobs 5682 s (results-jobload/*-1.0/summary.json); the paper reports 37-50% lower
average JCT for Pollux than for these baselines. The target here: ours <= 0.65x rigid.

Results (`python benchmarks/pollux.py`: workloads 1-8, tick 60 s, 30 s per resize, elastic min
1, GROWTH_MIN_EFFICIENCY 0.5 over GROWTH_LOOKAHEAD 4 members; deterministic; ~28 s on a shared
2-core machine):

              avg JCT  p50 JCT  p99 JCT  makespan  avg queue  GPU util  resizes/job
    ours         4960     3145    39115     63705          0     92.2%         2.01
    rigid       22005    16861    67893     86047      20156     74.1%         0.00
    rigid-bf    21281    16339    61806     85714      19432     74.3%         0.00

  ours / rigid average JCT 0.23x (target <= 0.65: met); by workload 0.53 0.15 0.67 0.19 0.11 0.37
  0.23 0.46. Ours is also ahead on p99 JCT (0.58x), makespan (0.74x) and GPU utilisation.

Why: every job starts at once. A StrictFIFO head of 24-48 GPUs holds the whole rigid queue back
(20,156 s average wait), and backfill barely helps, since nothing starts on the head's reserved
nodes. Growth is judged over the next GROWTH_LOOKAHEAD members because the measured curves dip at
node boundaries (the 5th GPU adds -0.13 of one GPU's speed for cifar10, -0.98 to -0.07 for bert):
judged one member at a time (the scheduler before it), ours stopped at the dip, left 53% of the
GPUs idle and had a p99 JCT 1.6x rigid's (avg 4995 s, p99 107,428 s, makespan 125,232 s).

Left alone: ours does not rebalance running jobs (GPUs grown into go back only to admit waiting
work at its min), so newcomers run at min while older jobs keep what they grew into (p50 3145 s).
A scratch run with a Pollux-like rebalance pass after growth (move one member at a time from the
job that loses least to the one that gains most of sum(-1/speedup), while the difference is
>= 0.05) gave avg 3413 s (0.16x), p50 1339 s, at 3.9 resizes per job.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pollux_sim as sim  # noqa: E402
import pollux_trace as trace  # noqa: E402
from integrations.ray.scheduler.step import GROWTH_MIN_EFFICIENCY  # noqa: E402

# The shortest recorded Tiresias+TunedJobs JCT (s) of each configuration: (workload, job, JCT).
VALIDATION = {
    ("bert", 6, 384): (6, "bert-64", 2921), ("bert", 8, 384): (7, "bert-57", 2489),
    ("bert", 12, 384): (1, "bert-27", 1631), ("bert", 16, 384): (5, "bert-4", 1361),
    ("cifar10", 6, 2048): (1, "cifar10-35", 941), ("cifar10", 8, 2048): (5, "cifar10-85", 838),
    ("cifar10", 12, 4096): (1, "cifar10-65", 654), ("cifar10", 16, 4096): (1, "cifar10-41", 515),
    ("deepspeech2", 6, 320): (8, "deepspeech2-34", 4174),
    ("deepspeech2", 8, 320): (4, "deepspeech2-153", 3125),
    ("deepspeech2", 12, 640): (7, "deepspeech2-72", 2524),
    ("ncf", 1, 32768): (1, "ncf-29", 77), ("yolov3", 4, 64): (1, "yolov3-31", 14135)}
KNOWN_OFF = {"ncf": "on one GPU the artifact accumulates any batch above the model's first over "
                    "2 micro-batches (46 s of run); we run the 32768 at once (33 s)"}
TOLERANCE = 0.15
ARTIFACT_TICK_S, ARTIFACT_RESCALE_S = 60.0, 30.0
TARGET = 0.65  # ours / rigid average JCT


def validate() -> bool:
    times, work = trace.StepTimes(), trace.load_work()
    loaded = {n: {j.name: j for j in trace.load_jobs(n, times, work)} for n in trace.WORKLOADS}
    print("Job model check: a rigid job alone, ours / the artifact's shortest recorded "
          "Tiresias+TunedJobs JCT (s)")
    ok, cells, notes = True, [], []
    for (app, gpus, batch), (n, name, ref) in VALIDATION.items():
        j = loaded[n][name]
        wait = math.ceil(j.submit / ARTIFACT_TICK_S) * ARTIFACT_TICK_S - j.submit
        ours = wait + ARTIFACT_RESCALE_S + j.work / j.speeds[j.gpus - 1]
        good = abs(ours / ref - 1) <= TOLERANCE
        if not good and app in KNOWN_OFF:
            notes.append(f"{app}: {KNOWN_OFF[app]}")
        else:
            ok &= good
        cells.append(f"{app} {gpus}x{batch}: {ours:.0f}/{ref} {ours / ref:.2f}"
                     + ("" if good else " OFF"))
    for i in range(0, len(cells), 4):
        print("  " + " | ".join(cells[i:i + 4]))
    for note in notes:
        print(f"  (known: {note})")
    print(f"  -> {'within' if ok else 'NOT within'} {TOLERANCE:.0%} for every other "
          "configuration\n")
    return ok


def _task(args):
    n, policy, interval, rescale_s, elastic_min = args
    jobs = trace.load_jobs(n, trace.StepTimes(), trace.load_work())
    started = time.perf_counter()
    replay = sim.simulate(jobs, policy, interval, rescale_s, elastic_min)
    out = sim.summarize(replay)
    out["wall"], out["decisions"] = time.perf_counter() - started, replay.decisions
    return n, policy, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="1-8", help="artifact workloads, e.g. 1-8 or 2,6")
    ap.add_argument("--interval", type=float, default=60.0, help="scheduling tick, s (60)")
    ap.add_argument("--rescale-s", type=float, default=30.0,
                    help="no progress for this long after each size change (30, as the artifact)")
    ap.add_argument("--elastic-min", type=int, default=1, help="min GPUs of an elastic job (1)")
    ap.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    args = ap.parse_args(argv)
    try:
        workloads = trace.parse_range(args.workloads)
    except ValueError as exc:
        ap.error(str(exc))
    if args.interval <= 0 or args.rescale_s < 0 or args.elastic_min < 1 or args.jobs < 1:
        ap.error("--interval must be > 0, --rescale-s >= 0, --elastic-min and --jobs >= 1")
    valid = validate()
    tasks = [(n, p, args.interval, args.rescale_s, args.elastic_min)
             for n in workloads for p in sim.POLICIES]
    print(f"cluster {trace.NODES} nodes x {trace.GPUS_PER_NODE} GPUs; workloads {args.workloads}; "
          f"tick {args.interval:g} s; {args.rescale_s:g} s per resize; elastic min "
          f"{args.elastic_min}; GROWTH_MIN_EFFICIENCY {GROWTH_MIN_EFFICIENCY}; {len(tasks)} runs, "
          f"{args.jobs} process(es)", flush=True)
    start = time.perf_counter()
    pool = multiprocessing.Pool(args.jobs) if args.jobs > 1 else None
    results = {}
    try:
        for n, policy, out in (pool.imap(_task, tasks) if pool else map(_task, tasks)):
            results[(n, policy)] = out
            print(f"  workload {n} {policy:>8s}: avg JCT {out['avg_jct']:6.0f} s; {out['steps']} "
                  f"steps of {out['step_ms']:.2f} ms; {out['wall']:.0f} s; {out['decisions']}",
                  flush=True)
    finally:
        if pool:
            pool.terminate()
    print_table(workloads, results, time.perf_counter() - start, valid)
    return 0


HEADER = (f"{'workload':>8s} {'policy':>8s} {'avg JCT':>8s} {'p50 JCT':>8s} {'p99 JCT':>8s} "
          f"{'makespan':>9s} {'avg queue':>9s} {'GPU util':>8s} {'resizes/job':>11s} "
          f"{'spread':>6s}")


def _row(label: str, policy: str, m: dict) -> str:
    return (f"{label:>8s} {policy:>8s} {m['avg_jct']:8.0f} {m['p50_jct']:8.0f} {m['p99_jct']:8.0f}"
            f" {m['makespan']:9.0f} {m['avg_queue']:9.0f} {m['util']:8.1%} {m['resizes']:11.2f}"
            f" {m['spread']:6.0%}")


def print_table(workloads, results, wall: float, valid: bool) -> None:
    print("\nTimes in s. JCT: submission -> end; queue: submission -> first admission; GPU util:"
          "\nallocated GPU-seconds / (64 x makespan); spread: share of GPU-seconds of jobs on more"
          "\nnodes than ceil(GPUs / 4), charged as if packed. 'all': JCTs of every job pooled,"
          "\nthe other columns averaged over workloads.")
    print(HEADER)
    for n in workloads:
        for p in sim.POLICIES:
            print(_row(str(n), p, results[(n, p)]))
    overall = {}
    for p in sim.POLICIES:
        ms = [results[(n, p)] for n in workloads]
        jct = np.concatenate([m["jcts"] for m in ms])
        overall[p] = {"avg_jct": float(jct.mean()), "p50_jct": float(np.percentile(jct, 50)),
                      "p99_jct": float(np.percentile(jct, 99)),
                      **{k: float(np.mean([m[k] for m in ms]))
                         for k in ("makespan", "avg_queue", "util", "resizes", "spread")}}
        print(_row("all", p, overall[p]))
    ours = sim.ELASTIC
    print()
    for base in (sim.RIGID, sim.BACKFILL):
        print(f"ours / {base} average JCT by workload: " + ", ".join(
            f"{n}: {results[(n, ours)]['avg_jct'] / results[(n, base)]['avg_jct']:.2f}"
            for n in workloads))
    ratio = overall[ours]["avg_jct"] / overall[sim.RIGID]["avg_jct"]
    ratio_bf = overall[ours]["avg_jct"] / overall[sim.BACKFILL]["avg_jct"]
    print(f"\nSUMMARY ours / rigid FIFO average JCT {ratio:.2f}x (target <= {TARGET}: "
          f"{'yes' if ratio <= TARGET else 'NO'}; / rigid-bf {ratio_bf:.2f}x) | ours "
          f"{overall[ours]['avg_jct']:.0f} s, rigid {overall[sim.RIGID]['avg_jct']:.0f} s, "
          f"rigid-bf {overall[sim.BACKFILL]['avg_jct']:.0f} s over {len(workloads)} workload(s) | "
          f"p99 ours {overall[ours]['p99_jct']:.0f} s, rigid {overall[sim.RIGID]['p99_jct']:.0f} s"
          f" | job model check {'ok' if valid else 'OFF'} | wall {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
