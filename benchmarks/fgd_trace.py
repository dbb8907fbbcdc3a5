"""The FGD trace experiment, as a library for benchmarks/fgd.py: load Alibaba's
cluster-trace-gpu-v2023 "openb" CSVs into scheduler model objects, build a seed's arrival sequence,
replay it through a placement policy, and read off the unallocated-GPU curve.

What is reproduced (FGD paper Fig. 9(a); the authors' simulator, hkust-adsl/kubernetes-scheduler-
simulator, experiments on openb_pod_list_default with workload tuning ratio 1.3):
  - the cluster: every GPU node of openb_node_list_gpu_node.csv (1,213 nodes, 6,212 GPUs);
  - arrivals: the trace's pods in a random order, then pods drawn at random (with replacement)
    from the trace appended until the arrived GPU demand would pass 130% of the cluster's GPUs;
    pods never leave; a pod that fits nowhere is counted as failed and dropped;
  - the target workload mix for FGD: the trace's most frequent pod types covering 95% of its pods
    (CPU-only pods included), from the original trace, not the arrival sequence;
  - ties between equally scored nodes: a random order of the nodes drawn once per seed;
  - x = arrived GPU demand / cluster GPUs (failed pods count as arrived), y = unallocated GPU
    compute / cluster GPU compute; the value at x is the mean of y over the arrivals whose x
    rounds to it (as the authors' merge_alloc_discrete.py reads their logs).
GPU memory is not in the trace (pods ask none); nodes get their model's memory for completeness.
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ray.scheduler.fragmentation import WorkloadMix  # noqa: E402
from integrations.ray.scheduler.model import GPU_MILLI, Gpu, Node, Shape  # noqa: E402
from integrations.ray.scheduler.placement import Placer, make  # noqa: E402
from integrations.ray.scheduler.pool import PoolIndex  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
NODES_CSV = os.path.join(DATA, "openb_node_list_gpu_node.csv")
PODS_CSV = os.path.join(DATA, "openb_pod_list_default.csv")

# GPU memory per model, MiB (G2 and G3 are undisclosed models: placeholders; no pod asks for any).
GPU_MEMORY_MIB = {"P100": 16384, "T4": 15360, "V100M16": 16384, "V100M32": 32768, "A10": 24576,
                  "G2": 16384, "G3": 32768}


def load_nodes(path: str = NODES_CSV) -> List[Node]:
    nodes = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            count, gpu_model = int(row["gpu"]), row["model"]
            gpus = tuple(Gpu(gpu_model, GPU_MEMORY_MIB.get(gpu_model, 16384)) for _ in range(count))
            nodes.append(Node(row["sn"], int(row["cpu_milli"]), int(row["memory_mib"]), gpus))
    return nodes


def pod_shape(row: Dict[str, str]) -> Shape:
    cpu, mem = int(row["cpu_milli"]), int(row["memory_mib"])
    num, milli = int(row["num_gpu"]), int(row["gpu_milli"])
    spec = [m for m in (row.get("gpu_spec") or "").split("|") if m]
    if len(spec) > 1:
        raise NotImplementedError(f"pod {row['name']}: a choice of GPU models ({spec})")
    model = spec[0] if spec else None
    if num == 0:
        return Shape(cpu, mem)
    if num == 1 and 0 < milli < GPU_MILLI:
        return Shape(cpu, mem, gpu_milli=milli, gpu_model=model)
    return Shape(cpu, mem, gpus=num, gpu_model=model)


def load_pods(path: str = PODS_CSV) -> List[Shape]:
    with open(path, newline="") as f:
        return [pod_shape(row) for row in csv.DictReader(f)]


def arrivals(shapes: Sequence[Shape], gpu_milli_total: int, ratio: float,
             rng: np.random.Generator) -> np.ndarray:
    """Indices into `shapes`: all of them shuffled, then random draws appended while the total
    GPU demand stays within ratio x the cluster's GPUs."""
    demand = np.array([s.gpu_demand_milli for s in shapes], dtype=np.int64)
    order = list(rng.permutation(len(shapes)))
    total, target = int(demand.sum()), ratio * gpu_milli_total
    while True:
        j = int(rng.integers(len(shapes)))
        if total + demand[j] > target:
            break
        total += int(demand[j])
        order.append(j)
    return np.array(order, dtype=np.int64)


def replay(nodes: Sequence[Node], shapes: Sequence[Shape], order: np.ndarray, policy: str,
           seed: int, mix: WorkloadMix, quantize=None,
           policy_seed: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Place the arrivals in order, never removing any (`seed`: the node tie-break order,
    `policy_seed`: the policy's own draws, default `seed`). Returns per arrival the arrived and
    the allocated GPU milli after it, and whether it failed."""
    pool = PoolIndex(nodes, seed=seed)
    policy_seed = seed if policy_seed is None else policy_seed
    placer = Placer(pool, make(policy, seed=policy_seed, mix=mix, quantize=quantize))
    arrived = np.zeros(order.size, dtype=np.int64)
    used = np.zeros(order.size, dtype=np.int64)
    failed = np.zeros(order.size, dtype=bool)
    a = u = 0
    for k, j in enumerate(order):
        shape = shapes[j]
        a += shape.gpu_demand_milli
        binding = placer.place(shape)
        if binding is None:
            failed[k] = True
        else:
            pool.bind(binding, shape)
            u += shape.gpu_demand_milli
        arrived[k], used[k] = a, u
    assert u == pool.used_gpu_milli()
    return {"arrived": arrived, "used": used, "failed": failed,
            "gpu_total": np.int64(pool.gpu_total_milli)}


def unallocated_at(run: Dict[str, np.ndarray], x: int) -> float:
    """Unallocated GPUs (% of the cluster's) at x% arrived: mean over the arrivals whose arrived
    percentage rounds to x (within x +- 1 if none does)."""
    total = float(run["gpu_total"])
    pct_arrived = np.round(run["arrived"] / total * 100.0)
    alloc = run["used"] / total * 100.0
    hit = pct_arrived == x
    if not hit.any():
        hit = np.abs(pct_arrived - x) <= 1
    if not hit.any():
        return float("nan")
    return 100.0 - float(alloc[hit].mean())
