"""Decision latency of the cluster scheduler: `step()` with 10,000 pending workloads in 30 cluster
queues on the GPU nodes of Alibaba's openb trace (1,213 nodes, 6,212 GPUs).

    python benchmarks/step_latency.py [--pending 10000] [--queues 30] [--steps 200]
                                      [--placements best_fit,fgd,ours] [--seed 1]

The scenario, the same for every placement policy (one seed):
  - 30 cluster queues in 3 cohorts of 10, each with a nominal quota of 1/30 of the GPUs, CPU and
    memory, borrowing up to as much again; every fifth queue is StrictFIFO, the rest BestEffortFIFO;
  - workloads shaped like the trace's pods (benchmarks/data: whole GPUs, GPU shares, CPU only):
    70% gangs of 1-4 members (a quarter of them same-node), 20% elastic jobs (min 1-2, max 8),
    10% endpoints of 1-4 replicas; priority classes by kind, with a tenth of the gangs raised to
    training; spread evenly over the queues;
  - fill: workloads are submitted and stepped until the pool holds no more (most GPUs allocated,
    the heads blocked) or `--pending` wait; then steps, with pending kept at `--pending`, until
    one makes at most SETTLED decisions (higher classes preempt lower ones first: the first
    steps after a fill admit and preempt thousands), at most `--settle` steps;
  - measure: `--steps` steps, between each a few admitted workloads finish (1-5) and as many new
    ones arrive, so pending stays at `--pending`; each `step(state, now)` is timed alone, then
    `apply` (outside the figure, shown beside it).
One step looks only at queue heads (step.py's docstring): at most LOOKAHEAD workloads per
BestEffortFIFO queue and one per StrictFIFO queue are attempted, with placement, preemption and
reservation for each; every pending workload still gets a reason.

There is no anchor to run here (Kueue needs a Kubernetes API server); the issue's bar is an
absolute one: p99 <= 100 ms. The placements are compared side by side in one run.

Results (2 cores, CPU only, Python 3.11, seed 1, `--placements best_fit --steps 100`: 50 steps
in each GC mode, alternating blocks of 10): GC as it comes p50 29 ms, p99 83 ms, max 94 ms;
loaded state frozen p50 30 ms, p99 68 ms; apply 22 ms; 6.5 decisions per step; 91.4% of the GPUs
allocated. `--placements fgd --steps 60`: p50 79 ms, p99 140 ms as it comes, 88 ms frozen
(94.6% allocated): over the bar. The fill and settle take ~3 minutes per placement.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fgd_trace as trace  # noqa: E402
from integrations.ray.scheduler import (Admit, State, Workload, apply, finish, mark_ready,  # noqa: E402
                                        parse, step, submit)
from integrations.ray.scheduler.fragmentation import WorkloadMix  # noqa: E402
from integrations.ray.scheduler.model import Shape  # noqa: E402


SETTLED = 20  # a step with at most this many decisions: the pool has settled
GC_BLOCK = 10  # measured steps per block of one GC mode


def make_config(nodes, queues: int, placement: str):
    gpus = sum(len(n.gpus) for n in nodes)
    cpu = sum(n.cpu_milli for n in nodes) / 1000
    mem = sum(n.memory_mib for n in nodes)
    share = 1.0 / queues
    cqs = []
    for q in range(queues):
        res = {"gpu": {"nominalQuota": round(gpus * share, 1), "borrowingLimit": round(gpus * share, 1)},
               "cpu": {"nominalQuota": round(cpu * share), "borrowingLimit": round(cpu * share)},
               "memory": {"nominalQuota": f"{int(mem * share)}Mi", "borrowingLimit": f"{int(mem * share)}Mi"}}
        cqs.append({"name": f"q{q:02d}", "cohort": f"c{q % 3}",
                    "queueingStrategy": "StrictFIFO" if q % 5 == 0 else "BestEffortFIFO",
                    "flavors": [{"name": "default", "resources": res}]})
    return parse({"resourceFlavors": [{"name": "default"}],
                  "cohorts": [{"name": f"c{i}"} for i in range(3)],
                  "clusterQueues": cqs, "placement": placement})


class Source:
    """An endless, seeded stream of workloads shaped like the trace's pods."""

    def __init__(self, shapes, queues: int, seed: int):
        self.shapes, self.queues = shapes, queues
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def next(self) -> Workload:
        rng, i = self.rng, self.n
        self.n += 1
        shape: Shape = self.shapes[int(rng.integers(len(self.shapes)))]
        queue = f"q{i % self.queues:02d}"
        name = f"w{i}"
        r = rng.random()
        if r < 0.7:
            size = int(rng.integers(1, 5))
            constraint = "same-node" if size > 1 and rng.random() < 0.25 else None
            klass = "training" if rng.random() < 0.1 else None
            return Workload.gang(name, size, shape, queue=queue, constraint=constraint,
                                 priority_class=klass)
        if r < 0.9:
            low = int(rng.integers(1, 3))
            return Workload.elastic(name, low, 8, shape, queue=queue)
        return Workload.inference(name, int(rng.integers(1, 5)), shape, queue=queue)


def submit_some(state, source: Source, count: int, now: float):
    done = 0
    while done < count:
        try:
            state = submit(state, source.next(), now)
            done += 1
        except Exception as e:  # a same-node gang no node can hold: skipped as a user would be told
            if type(e).__name__ != "SubmissionError":
                raise
    return state


def carry_out(state, result):
    """What the binding does with a step: apply it, and the admitted members start."""
    state = apply(state, result)
    for d in result.decisions:
        if isinstance(d, Admit):
            state = mark_ready(state, d.workload)
    return state


def run(placement: str, nodes, shapes, args):
    config = make_config(nodes, args.queues, placement)
    mix = WorkloadMix.from_shapes(shapes)
    state = State.of(config, nodes, mix=mix)
    source = Source(shapes, args.queues, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    now = 0.0
    fill_start = time.perf_counter()
    # fill: submit in batches and step until a step admits nothing (or enough are waiting)
    while len(state.pending) < args.pending:
        state = submit_some(state, source, 300, now)
        now += 1
        result = step(state, now)
        state = carry_out(state, result)
        admitted = sum(1 for d in result.decisions if isinstance(d, Admit))
        if admitted == 0:
            break
    # settle: with the queues full, steps admit by priority and preemption until little changes
    settle = 0
    while settle < args.settle:
        state = submit_some(state, source, max(0, args.pending - len(state.pending)), now)
        now += 1
        result = step(state, now)
        state = carry_out(state, result)
        settle += 1
        if args.verbose:
            print(f"  settle {settle}: {len(result.decisions)} decisions", flush=True)
        if len(result.decisions) <= SETTLED:
            break
    fill_s = time.perf_counter() - fill_start
    state = submit_some(state, source, max(0, args.pending - len(state.pending)), now)
    gpu_total = sum(len(n.gpus) for n in nodes) * 1000
    times: dict = {"default": [], "frozen": []}
    apply_times, decisions = [], 0
    for k in range(args.steps):
        # Python's GC, A B A B in blocks of GC_BLOCK steps: as it comes ("default"), and with
        # what exists frozen out of the collector ("frozen": gc.freeze(), what a long-running
        # controller does after loading its state). The default is the fair figure.
        mode = "default" if (k // GC_BLOCK) % 2 == 0 else "frozen"
        if k % GC_BLOCK == 0:
            gc.unfreeze() if mode == "default" else gc.freeze()
        now += 10
        ended = sorted(state.admitted)
        k = int(rng.integers(1, 6))
        for j in rng.choice(len(ended), size=min(k, len(ended)), replace=False):
            state = finish(state, ended[int(j)], now)
        state = submit_some(state, source, max(0, args.pending - len(state.pending)), now)
        t0 = time.perf_counter()
        result = step(state, now)
        t1 = time.perf_counter()
        state = carry_out(state, result)
        t2 = time.perf_counter()
        if args.verbose:
            kinds: dict = {}
            for d in result.decisions:
                kinds[type(d).__name__] = kinds.get(type(d).__name__, 0) + 1
            print(f"  step {k} ({mode} GC): {1000 * (t1 - t0):.0f} ms, {kinds}", flush=True)
        times[mode].append(t1 - t0)
        apply_times.append(t2 - t1)
        decisions += len(result.decisions)
        assert set(result.reasons) >= set(state.pending) - {d.workload for d in result.decisions
                                                           if hasattr(d, "workload")}
    gc.unfreeze()
    used = gpu_total - sum(sum(g.free_milli for g in n.gpus) for n in state.nodes.values())
    out = {}
    for mode, values in times.items():
        ms = np.array(values) * 1000
        out[mode] = {"placement": placement, "p50": float(np.percentile(ms, 50)),
                     "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
                     "apply_p50": float(np.percentile(np.array(apply_times) * 1000, 50)),
                     "pending": len(state.pending), "admitted": len(state.admitted),
                     "gpu_alloc": 100.0 * used / gpu_total, "decisions": decisions / args.steps,
                     "fill_s": fill_s}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pending", type=int, default=10000)
    ap.add_argument("--queues", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--placements", default="best_fit,fgd,ours")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=int, default=50, help="most steps to let the pool settle")
    ap.add_argument("--verbose", action="store_true", help="print every step's decisions")
    args = ap.parse_args(argv)
    nodes, shapes = trace.load_nodes(), trace.load_pods()
    print(f"openb GPU nodes: {len(nodes)}, GPUs: {sum(len(n.gpus) for n in nodes)}; "
          f"{args.pending} pending in {args.queues} queues; {args.steps} measured steps")
    print(f"{'placement':<10} {'GC':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'apply ms':>9} "
          f"{'pending':>8} {'admitted':>9} {'GPU alloc':>10} {'decisions/step':>15} {'fill s':>7}")
    worst = {"default": 0.0, "frozen": 0.0}
    for placement in args.placements.split(","):
        for mode, r in run(placement, nodes, shapes, args).items():
            worst[mode] = max(worst[mode], r["p99"])
            print(f"{r['placement']:<10} {mode:<8} {r['p50']:8.1f} {r['p99']:8.1f} {r['max']:8.1f} "
                  f"{r['apply_p50']:9.1f} {r['pending']:8d} {r['admitted']:9d} "
                  f"{r['gpu_alloc']:9.1f}% {r['decisions']:15.1f} {r['fill_s']:7.1f}", flush=True)
    print(f"summary: step() p99 {worst['default']:.1f} ms with Python's GC as it comes, "
          f"{worst['frozen']:.1f} ms with the loaded state frozen out of it, at {args.pending} "
          f"pending in {args.queues} queues (target <= 100 ms): "
          f"{'met' if worst['default'] <= 100 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
