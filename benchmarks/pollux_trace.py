"""The Pollux (OSDI'21) artifact workloads, a library for benchmarks/pollux.py: the jobs, what each
must do, and how fast it does it on k GPUs. Data: benchmarks/data/adaptdl/ (README there; derived
by benchmarks/pollux_derive.py).

Our model of a job, simpler than the artifact's (which models goodput: throughput times the
statistical efficiency of the batch size, re-optimised as the job runs):
  - A job of the trace asks for `num_replicas` GPUs and a global batch `batch_size`. Its per-GPU
    (local) batch is fixed at ceil(batch_size / num_replicas) whatever its size: the `linear` batch
    policy, where the global batch grows with the number of workers. Above the largest local batch
    measured for the model (for yolov3, 8: the artifact's own limit) the step accumulates
    gradients over several micro-batches, as in the artifact: a step then takes
    step_time + (steps - 1) * (step_time - sync_time) at the micro-batch.
  - Its work is what the trace's configuration needs to finish training: the artifact's measured
    iterations to the last epoch at `batch_size` (validation-<batch_size>.csv) times `batch_size`
    samples. It stays that many samples at any size: no statistical-efficiency modelling, so a job
    run on more GPUs than it asked for (a larger global batch) is not charged for needing more
    samples, nor one run on fewer credited for needing fewer.
  - Its throughput on k GPUs, k * local batch / step time, uses the step time measured with k GPUs
    packed on ceil(k / 4) nodes of 4 GPUs: the artifact's placements.csv for k <= 16, and for
    larger k linear interpolation in k between 16 GPUs on 4 nodes and the packed points of the
    artifact's scalability sweep (24 GPUs on 6 nodes, 32 on 8, 48 on 12, 64 on 16); linear in the
    local batch between measured ones. Where a job's members actually sit is not charged. (The
    measured placements of k GPUs over several nodes differ by up to +-20% without a pattern; a
    job of <= 4 GPUs split over nodes is up to 2.5x slower for bert and yolov3. Charging the
    measured placement where there is one (<= 4 nodes, <= 16 GPUs) in a scratch run made the
    average JCT 12% longer for ours and 8% longer for rigid; the ratio stayed 0.23.)
  - A job grows at most to the largest global batch the artifact validated for its model
    (max_batch // local batch GPUs), and never past the cluster.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ray.scheduler.model import Gpu, Node, Shape  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "adaptdl")
WORKLOADS = range(1, 9)

# The cluster of the paper's testbed and of its simulator: 16 nodes of 4 GPUs (AWS g4dn.12xlarge:
# 4 T4, 48 vCPUs, 192 GiB). A member is one GPU with a quarter of the node's CPUs and some memory.
NODES, GPUS_PER_NODE = 16, 4
NODE_CPU_MILLI, NODE_MEMORY_MIB, GPU_MODEL, GPU_MEMORY_MIB = 48000, 192 * 1024, "T4", 15360
MEMBER = Shape(gpus=1, cpu_milli=NODE_CPU_MILLI // GPUS_PER_NODE, memory_mib=32 * 1024)
CLUSTER_GPUS = NODES * GPUS_PER_NODE

MAX_LOCAL_BSZ = {"yolov3": 8}  # the artifact's limit (GPU memory); others: the largest measured


def cluster() -> List[Node]:
    return [Node(f"node-{i:02d}", NODE_CPU_MILLI, NODE_MEMORY_MIB,
                 tuple(Gpu(GPU_MODEL, GPU_MEMORY_MIB) for _ in range(GPUS_PER_NODE)))
            for i in range(NODES)]


@dataclass(frozen=True)
class Job:
    name: str
    submit: float  # s after the trace's start
    application: str
    gpus: int  # what the trace asks for (the rigid size)
    batch_size: int  # the trace's global batch at `gpus`
    local_bsz: int
    work: float  # samples to finish
    speeds: Tuple[float, ...]  # samples/s on 1..max GPUs

    @property
    def max_gpus(self) -> int:
        return len(self.speeds)


class StepTimes:
    """Measured step and sync times of every model on k packed GPUs, by local batch."""

    def __init__(self, path: str = os.path.join(DATA, "step_times.csv")):
        rows: Dict[Tuple[str, int], List[Tuple[float, float, float]]] = {}
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                rows.setdefault((r["application"], int(r["num_replicas"])), []).append(
                    (float(r["local_bsz"]), float(r["step_time"]), float(r["sync_time"])))
        self.table = {k: np.array(sorted(v)) for k, v in rows.items()}
        self.anchors: Dict[str, List[int]] = {}
        for app, k in self.table:
            self.anchors.setdefault(app, []).append(k)
        for ks in self.anchors.values():
            ks.sort()

    def largest_local_bsz(self, app: str) -> int:
        return int(self.table[(app, 1)][-1, 0])

    def at(self, app: str, gpus: int, local_bsz: float) -> Tuple[float, float]:
        """(step_time, sync_time) in seconds for one step of `local_bsz` samples per GPU."""
        ks = self.anchors[app]
        if gpus in ks:
            return self._at(app, gpus, local_bsz)
        hi = next((k for k in ks if k > gpus), None)
        if hi is None or gpus < ks[0]:
            raise ValueError(f"{app}: no step time measured around {gpus} GPUs (have {ks})")
        lo = max(k for k in ks if k < gpus)
        a, b = np.array(self._at(app, lo, local_bsz)), np.array(self._at(app, hi, local_bsz))
        w = (gpus - lo) / (hi - lo)
        return tuple((1 - w) * a + w * b)

    def _at(self, app: str, gpus: int, local_bsz: float) -> Tuple[float, float]:
        t = self.table[(app, gpus)]
        if not t[0, 0] <= local_bsz <= t[-1, 0]:
            raise ValueError(f"{app} on {gpus} GPUs: local batch {local_bsz:g} is outside the "
                             f"measured {t[0, 0]:g}..{t[-1, 0]:g}")
        return (float(np.interp(local_bsz, t[:, 0], t[:, 1])),
                float(np.interp(local_bsz, t[:, 0], t[:, 2])))

    def throughput(self, app: str, gpus: int, local_bsz: int) -> float:
        """Samples/s on `gpus` GPUs at `local_bsz` samples per GPU per step (accumulating
        gradients over micro-batches above the model's largest local batch)."""
        largest = MAX_LOCAL_BSZ.get(app, self.largest_local_bsz(app))
        extra = math.ceil(local_bsz / largest) - 1  # micro-batches after the first
        micro = math.ceil(local_bsz / (extra + 1))
        step, sync = self.at(app, gpus, micro)
        return gpus * local_bsz / (step + extra * (step - sync))


def load_work(path: str = os.path.join(DATA, "work.csv")) -> Dict[Tuple[str, int], int]:
    """(application, batch size) -> iterations to finish training at that batch size."""
    with open(path, newline="") as f:
        return {(r["application"], int(r["batch_size"])): int(r["iterations"])
                for r in csv.DictReader(f)}


def load_jobs(workload: int, times: StepTimes, work: Dict[Tuple[str, int], int]) -> List[Job]:
    path = os.path.join(DATA, "workloads", f"workload-{workload}.csv")
    max_batch: Dict[str, int] = {}
    for app, batch in work:
        max_batch[app] = max(max_batch.get(app, 0), batch)
    jobs = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            app, gpus, batch = r["application"], int(r["num_replicas"]), int(r["batch_size"])
            local = math.ceil(batch / gpus)
            top = max(gpus, min(CLUSTER_GPUS, max_batch[app] // local))
            speeds = tuple(times.throughput(app, k, local) for k in range(1, top + 1))
            jobs.append(Job(r["name"], float(r["time"]), app, gpus, batch, local,
                            float(work[(app, batch)] * batch), speeds))
    jobs.sort(key=lambda j: (j.submit, j.name))
    return jobs


def parse_range(text: str) -> List[int]:
    """"1-8", "1,3,5", "2" -> workload numbers."""
    out: List[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or not (hi or lo).strip().isdigit():
            raise ValueError(f"workloads: {text!r} is not like 1-8 or 2,6")
        out.extend(range(int(lo), int(hi or lo) + 1))
    bad = [n for n in out if n not in WORKLOADS]
    if bad:
        raise ValueError(f"no workload {bad[0]}: the artifact has workloads 1-8")
    return out

