"""FGD's Figure 9(a) on Alibaba's cluster-trace-gpu-v2023 (openb, default trace), for our placement
policies: unallocated GPUs (% of the cluster's) after 100% and 130% of the cluster's GPU capacity
has arrived, median over seeds, side by side with the FGD authors' simulator.

    python benchmarks/fgd.py [--seeds 10] [--policies random,best_fit,packing,fgd,ours] [--jobs 1]

A policy may carry options after a colon: `fgd:exact` scores with exact deltas instead of the
simulator's integer scores (`:quantized` forces them). What is replayed and how it is measured:
benchmarks/fgd_trace.py. Seeds are seed-base, seed-base + 1, ...; every policy sees the same arrival
sequence and node tie-break order for a given seed. The data: benchmarks/data/README.md.

Reference (`REFERENCE`): medians over the 10 seeds of the authors' recorded results for this
trace (hkust-adsl/kubernetes-scheduler-simulator, experiments/analysis/expected_results/
analysis_allo_discrete.csv, workload openb_pod_list_default, tune 1.3, 6,212 GPUs), as 100 minus
their allocation ratio. Validation: best_fit and fgd within 0.5 points of the reference at 130%.

Results (seeds 42..51, one process, ~1 minute on 2 cores): unallocated at 100% / 130% arrived,
random 13.87 / 12.49 (ref 13.75 / 12.62), best_fit 7.16 / 6.95 (7.09 / 6.89), packing 8.30 / 8.05
(8.20 / 7.94), fgd 4.80 / 4.64 (4.77 / 4.60), ours 4.36 / 4.27 (lower than fgd on every seed).
For comparison: fgd:exact 8.11 / 7.86, ours:exact 4.52 / 4.33, spread 7.18 / 5.50, binpack
8.40 / 8.17.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fgd_trace as trace  # noqa: E402
from integrations.ray.scheduler.fragmentation import WorkloadMix  # noqa: E402

REFERENCE = {"random": (13.75, 12.62), "packing": (8.20, 7.94), "best_fit": (7.09, 6.89),
             "fgd": (4.77, 4.60)}  # (at 100%, at 130%)
VALIDATE = ("best_fit", "fgd")
TOLERANCE = 0.5
POINTS = (100, 130)

_STATE = {}


def _init(ratio: float) -> None:
    nodes, shapes = trace.load_nodes(), trace.load_pods()
    _STATE.update(nodes=nodes, shapes=shapes, mix=WorkloadMix.from_shapes(shapes), ratio=ratio,
                  gpu_total=sum(len(n.gpus) for n in nodes) * 1000)


def _seeds(seed: int):
    """Independent streams for the arrivals, the node tie-break order and the policy."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3)]


def run_one(task):
    spec, seed = task
    name, _, option = spec.partition(":")
    quantize = {"": None, "exact": False, "quantized": True}[option]
    s = _STATE
    arrive_seed, rank_seed, policy_seed = _seeds(seed)
    order = trace.arrivals(s["shapes"], s["gpu_total"], s["ratio"],
                           np.random.default_rng(arrive_seed))
    start = time.perf_counter()
    run = trace.replay(s["nodes"], s["shapes"], order, name, rank_seed, s["mix"], quantize,
                       policy_seed=policy_seed)
    wall = time.perf_counter() - start
    return (spec, seed, [trace.unallocated_at(run, x) for x in POINTS], int(run["failed"].sum()),
            int(order.size), wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="number of seeds (default 10)")
    ap.add_argument("--seed-base", type=int, default=42, help="first seed (default 42)")
    ap.add_argument("--policies", default="random,best_fit,packing,fgd,ours")
    ap.add_argument("--ratio", type=float, default=1.3, help="arrived demand / GPUs (1.3)")
    ap.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--budget", type=float, default=1800.0,
                    help="seconds after which no new run is started (default 1800)")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    tasks = [(p, s) for s in seeds for p in policies]
    start = time.perf_counter()
    _init(args.ratio)
    print(f"trace: {len(_STATE['nodes'])} nodes, {_STATE['gpu_total'] // 1000} GPUs, "
          f"{len(_STATE['shapes'])} pods, {len(_STATE['mix'].types)} types in the FGD target mix; "
          f"{len(tasks)} runs ({len(policies)} policies x {len(seeds)} seeds {seeds[0]}.."
          f"{seeds[-1]}), {args.jobs} process(es)", flush=True)
    results = {p: [] for p in policies}
    pool = multiprocessing.Pool(args.jobs, _init, (args.ratio,)) if args.jobs > 1 else None
    results_iter = pool.imap(run_one, tasks) if pool else map(run_one, tasks)
    skipped = 0
    for k, (spec, seed, values, failed, arrivals, wall) in enumerate(results_iter, 1):
        results[spec].append((values, failed))
        print(f"[{k}/{len(tasks)}] {spec:>12s} seed {seed}: unallocated "
              + ", ".join(f"{v:5.2f}% at {x}%" for v, x in zip(values, POINTS))
              + f"; {failed}/{arrivals} pods failed; {wall:.1f}s", flush=True)
        if time.perf_counter() - start > args.budget and k < len(tasks):
            skipped = len(tasks) - k
            print(f"budget of {args.budget:.0f}s spent: {skipped} runs not started", flush=True)
            break
    if pool:
        pool.terminate()
    wall = time.perf_counter() - start
    print_table(policies, results, wall, skipped)
    return 0


def print_table(policies, results, wall: float, skipped: int) -> None:
    print()
    print("Unallocated GPUs, % of the cluster's 6,212 (median over seeds; lower is better)")
    print(f"{'policy':>18s} {'seeds':>5s} {'@100%':>7s} {'ref':>6s} {'@130%':>7s} {'ref':>6s}"
          f" {'130% min..max':>14s} {'failed pods':>11s}")
    medians = {}
    for p in policies:
        rows = results[p]
        if not rows:
            continue
        vals = np.array([v for v, _ in rows])
        med = np.median(vals, axis=0)
        medians[p] = med
        ref = REFERENCE.get(p)
        refs = [f"{r:6.2f}" for r in ref] if ref else ["     -"] * 2
        print(f"{p:>18s} {len(rows):5d} {med[0]:7.2f} {refs[0]} {med[1]:7.2f} {refs[1]}"
              f" {vals[:, 1].min():6.2f}..{vals[:, 1].max():<6.2f}"
              f" {int(np.median([f for _, f in rows])):11d}")
    parts = []
    for p, med in medians.items():
        text = f"{p} {med[1]:.2f}"
        if p in REFERENCE:
            text += f" (ref {REFERENCE[p][1]:.2f}"
            if p in VALIDATE:
                text += ", ok" if abs(med[1] - REFERENCE[p][1]) <= TOLERANCE else ", OFF"
            text += ")"
        if p == "ours":
            text += " (< fgd ref 4.60: " + ("yes" if med[1] < REFERENCE["fgd"][1] else "NO") + ")"
        parts.append(text)
    seeds = max((len(r) for r in results.values()), default=0)
    print(f"\nSUMMARY unallocated GPUs at 130% arrived, median of {seeds} seeds: "
          + " | ".join(parts) + f" | wall {wall:.0f}s"
          + (f", {skipped} runs skipped" if skipped else ""))


if __name__ == "__main__":
    sys.exit(main())
