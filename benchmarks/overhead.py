"""What a step boundary costs: plain DDP under torchrun against the same loop with the in-place
API (`run()` + `world.step_boundary()`) under `elastic.run`, interleaved, in one run.

    python benchmarks/overhead.py [--reps 3] [--steps 200] [--widths 384,1152,2560]

Two workers on this machine (gloo over loopback, one thread each), a 3-layer MLP of --width
units, a batch of 64, the same data every step; widths chosen for steps of about 10, 50 and
200 ms here. Each run reports every step's time after 20 warm-up steps (rank 0, the boundary
included); a configuration's figure is the median step of each run, then the median over
--reps runs. The boundary's own cost is timed inside the workers (the median time spent in
`step_boundary()`, rank 0) and given in microseconds and in percent of the plain step: the
difference of two step times is within this machine's run-to-run noise (+-10% on 2 shared cores).
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


def one(mode, width, steps, out, nproc=2, extra=()):
    """(median step, median time inside the boundary) of one run; extra: the worker's flags
    (e.g. --device cuda)."""
    common = ["--nproc-per-node", str(nproc)]
    if mode == "plain":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *common]
    else:
        cmd = [sys.executable, "-m", "elastic.run", *common]
    cmd += [str(WORKER), "--mode", mode, "--width", str(width), "--steps", str(steps),
            "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} width {width} failed:\n{r.stderr[-2000:]}")
    boundary = Path(str(out) + ".boundary")
    inside = statistics.median(json.loads(boundary.read_text())) if boundary.exists() else 0.0
    return statistics.median(json.loads(Path(out).read_text())), inside


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--widths", default="384,1152,2560")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        got = {"plain": [], "elastic": [], "elastic-sync": [], "elastic boundary": [],
               "elastic-sync boundary": []}
        for rep in range(args.reps):
            order = ("plain", "elastic", "elastic-sync")
            for mode in (order if rep % 2 == 0 else order[::-1]):
                step, inside = one(mode, width, args.steps, tmp / f"{mode}-{width}-{rep}.json")
                got[mode].append(step)
                if mode != "plain":
                    got[f"{mode} boundary"].append(inside)
                print(f"width {width} rep {rep} {mode}: median step {step * 1e3:.2f} ms"
                      + (f", inside the boundary {inside * 1e6:.0f} us" if mode != "plain" else ""),
                      flush=True)
        rows.append((width, {m: statistics.median(v) for m, v in got.items()},
                     {m: (min(v), max(v)) for m, v in got.items() if "boundary" not in m}))
    print(f"\n{'width':>6}{'plain ms':>10}{'elastic ms':>12}{'in boundary us':>16}{'%':>6}"
          f"{'sync ms':>9}{'sync boundary us':>18}{'%':>6}   (medians of {args.reps} "
          f"interleaved runs of {args.steps} steps; step-time spread in [])")
    for w, med, spread in rows:
        pl, el, sy = med["plain"], med["elastic"], med["elastic-sync"]
        eb, sb = med["elastic boundary"], med["elastic-sync boundary"]
        print(f"{w:>6}{pl * 1e3:>10.2f}{el * 1e3:>12.2f}{eb * 1e6:>16.0f}{eb / pl * 100:>5.2f}%"
              f"{sy * 1e3:>9.2f}{sb * 1e6:>18.0f}{sb / pl * 100:>5.2f}%"
              "   [" + ", ".join(f"{m} {a * 1e3:.2f}-{b * 1e3:.2f}" for m, (a, b) in spread.items())
              + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
