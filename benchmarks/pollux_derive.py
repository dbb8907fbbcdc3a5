"""Derive benchmarks/data/adaptdl/ (the data of benchmarks/pollux.py) from the Pollux OSDI'21
artifact: the `simulator/` folder of petuum/adaptdl at commit
de25dcc90c350b8ade3a710e437a651a8d2efae6 (branch osdi21-artifact).

    python benchmarks/pollux_derive.py /path/to/adaptdl/simulator

What it writes (every value is copied as text from the artifact, none is computed):
  workloads/workload-1.csv .. workload-8.csv   byte-for-byte copies of simulator/workloads/;
  step_times.csv  the rows of traces/<app>/placements.csv whose placement is the packed one for
                  its GPU count (k GPUs on ceil(k/4) nodes of 4, up to 16 GPUs), and the rows of
                  traces/<app>/scalability.csv with 4 GPUs on every node (24, 32, 48, 64 GPUs);
  work.csv        for every traces/<app>/validation-<batch>.csv: the batch size, its number of
                  rows (epochs) and the `iteration` of its last row (steps to finish training).
"""
from __future__ import annotations

import csv
import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "adaptdl")
GPUS_PER_NODE = 4
APPLICATIONS = ("bert", "cifar10", "deepspeech2", "imagenet", "ncf", "yolov3")


def packed(gpus: int) -> str:
    """The artifact's placement id for `gpus` GPUs packed on nodes of 4: GPUs per node, written in
    the rotation that sorts first (5 GPUs: "14")."""
    full, rest = divmod(gpus, GPUS_PER_NODE)
    return (str(rest) if rest else "") + str(GPUS_PER_NODE) * full


def derive(simulator: str, out: str = OUT) -> None:
    os.makedirs(os.path.join(out, "workloads"), exist_ok=True)
    for n in range(1, 9):
        name = f"workload-{n}.csv"
        shutil.copyfile(os.path.join(simulator, "workloads", name),
                        os.path.join(out, "workloads", name))
    steps, work = [], []
    for app in APPLICATIONS:
        traces = os.path.join(simulator, "traces", app)
        seen = set()
        with open(os.path.join(traces, "placements.csv"), newline="") as f:
            for row in csv.DictReader(f):
                p = row["placement"]
                gpus = sum(int(c) for c in p)
                if p != packed(gpus):
                    continue
                key = (len(p), gpus, row["local_bsz"])
                if key in seen:
                    raise ValueError(f"{app}: placement {p} at local batch "
                                     f"{row['local_bsz']} twice")
                seen.add(key)
                steps.append([app, str(len(p)), str(gpus), row["local_bsz"], row["step_time"],
                              row["sync_time"]])
        with open(os.path.join(traces, "scalability.csv"), newline="") as f:
            for row in csv.DictReader(f):
                if int(row["num_replicas"]) == GPUS_PER_NODE * int(row["num_nodes"]):
                    steps.append([app, row["num_nodes"], row["num_replicas"], row["local_bsz"],
                                  row["step_time"], row["sync_time"]])
        for path in glob.glob(os.path.join(traces, "validation-*.csv")):
            batch = os.path.basename(path)[len("validation-"):-len(".csv")]
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            work.append([app, batch, str(len(rows)), rows[-1]["iteration"]])
    steps.sort(key=lambda r: (r[0], int(r[2]), float(r[3])))
    work.sort(key=lambda r: (r[0], int(r[1])))
    _write(os.path.join(out, "step_times.csv"), ["application", "num_nodes", "num_replicas",
                                                 "local_bsz", "step_time", "sync_time"], steps)
    _write(os.path.join(out, "work.csv"), ["application", "batch_size", "epochs", "iterations"],
           work)


def _write(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], "traces")):
        sys.exit("usage: python benchmarks/pollux_derive.py /path/to/adaptdl/simulator "
                 "(petuum/adaptdl at de25dcc90c350b8ade3a710e437a651a8d2efae6)")
    derive(sys.argv[1])
