"""What a step boundary costs: plain DDP under torchrun against the same loop with the in-place
API (`run()` + `world.step_boundary()`) under `elastic.run`, interleaved, in one run.

    python benchmarks/overhead.py [--reps 3] [--steps 200] [--widths 384,1152,2560]

Two workers on this machine (gloo over loopback, one thread each), a 3-layer MLP of --width
units, a batch of 64, the same data every step; widths chosen for steps of about 10, 50 and
200 ms here. Each run reports every step's time after 20 warm-up steps (rank 0, the boundary
included); a configuration's figure is the median step of each run, then the median over
--reps runs. Overhead = elastic - plain, in microseconds and percent of the plain step.
`elastic-sync` is the same with the boundary's all-reduce blocking, as it was before it was made
to overlap the next step: today's figure next to the old one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "overhead_train.py"


def one(mode, width, steps, out):
    common = ["--nproc-per-node", "2"]
    if mode == "plain":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *common]
    else:
        cmd = [sys.executable, "-m", "elastic.run", *common]
    cmd += [str(WORKER), "--mode", mode, "--width", str(width), "--steps", str(steps),
            "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} width {width} failed:\n{r.stderr[-2000:]}")
    return statistics.median(json.loads(Path(out).read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--widths", default="384,1152,2560")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        got = {"plain": [], "elastic": [], "elastic-sync": []}
        for rep in range(args.reps):
            order = ("plain", "elastic", "elastic-sync")
            for mode in (order if rep % 2 == 0 else order[::-1]):
                got[mode].append(one(mode, width, args.steps, tmp / f"{mode}-{width}-{rep}.json"))
                print(f"width {width} rep {rep} {mode}: median step "
                      f"{got[mode][-1] * 1e3:.2f} ms", flush=True)
        rows.append((width, {m: statistics.median(v) for m, v in got.items()},
                     {m: (min(v), max(v)) for m, v in got.items()}))
    print(f"\n{'width':>6}{'plain ms':>10}{'elastic ms':>12}{'overhead us':>13}{'overhead %':>12}"
          f"{'sync us':>9}{'sync %':>8}   (medians of {args.reps} interleaved runs of "
          f"{args.steps} steps; spread in [])")
    for w, med, spread in rows:
        pl, el, sy = med["plain"], med["elastic"], med["elastic-sync"]
        print(f"{w:>6}{pl * 1e3:>10.2f}{el * 1e3:>12.2f}{(el - pl) * 1e6:>13.0f}"
              f"{(el - pl) / pl * 100:>11.1f}%{(sy - pl) * 1e6:>9.0f}{(sy - pl) / pl * 100:>7.1f}%"
              "   [" + ", ".join(f"{m} {a * 1e3:.2f}-{b * 1e3:.2f}" for m, (a, b) in spread.items())
              + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
