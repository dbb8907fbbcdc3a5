"""Writes benchmarks/data/genai/qps_5min.csv from the Alibaba GenAI trace's `qps.csv`.

    python benchmarks/genai_derive.py PATH/TO/qps.csv

`qps.csv` (in `qps.tar.gz` of alibaba/clusterdata, `cluster-trace-v2026-GenAI/`) holds raw QPS
samples, one per container and time. As the trace's README says to, the values are summed over
all containers per time window: here generative requests only (the API requests are another
service), per 5-minute window from the first sample, windows with no sample written as 0.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

WINDOW_S = 300
OUT = Path(__file__).resolve().parent / "data" / "genai" / "qps_5min.csv"


def derive(rows):
    sums, first = defaultdict(float), None
    for r in rows:
        if r["request_type"] != "Generative Requests":
            continue
        t = float(r["timestamp_anon"])
        first = t if first is None else min(first, t)
        sums[int(t // WINDOW_S)] += float(r["value"])
    lo, hi = min(sums), max(sums)
    return [(k - lo, k * WINDOW_S, round(sums.get(k, 0.0), 6)) for k in range(lo, hi + 1)]


def main(argv) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/genai_derive.py PATH/TO/qps.csv", file=sys.stderr)
        return 2
    with open(argv[0], newline="") as f:
        out = derive(csv.DictReader(f))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["window", "start_s", "qps_sum"])
        w.writerows(out)
    print(f"wrote {OUT} ({len(out)} windows of {WINDOW_S} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
