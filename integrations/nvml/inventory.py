"""This machine's GPUs for the cluster scheduler: its `Node` (integrations/ray/scheduler) and
the `ray start` flags that give Ray the same picture.

Only healthy GPUs are offered: a node with a failed GPU has one GPU less for the scheduler.
The core's GPU memory is the device's total (its own bookkeeping tracks what members use).
The Ray binding reads a node's GPU model and memory from its labels (`integrations.ray.
inventory`: gpu-model, gpu-memory-mib) and its GPU count from Ray's GPU resource, so
`ray_start_args` gives `--num-gpus` (healthy ones) and `--labels`; `python -m integrations.nvml
ray-args` prints them for a node's start script.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import List, Mapping, Optional

from integrations.ray.inventory import GPU_MEMORY_LABEL
from integrations.ray.scheduler.config import GPU_MODEL_LABEL
from integrations.ray.scheduler.model import Gpu, Node

from .probe import GpuProbe, node_gpus


def scheduler_gpus(probe: GpuProbe) -> tuple:
    """The healthy GPUs, as the scheduler core's `Gpu`s, in index order."""
    return tuple(Gpu(model=g.name, memory_mib=g.memory_mib) for g in node_gpus(probe).gpus
                 if g.healthy)


def scheduler_node(name: str, probe: Optional[GpuProbe], *, cpu_milli: Optional[int] = None,
                   memory_mib: Optional[int] = None,
                   labels: Optional[Mapping[str, str]] = None) -> Node:
    """This machine as one node of the pool: its CPUs and memory (this process's affinity and
    the machine's memory unless given) and its healthy GPUs (none without a probe)."""
    if cpu_milli is None:
        cpu_milli = len(os.sched_getaffinity(0)) * 1000
    if memory_mib is None:
        import psutil
        memory_mib = psutil.virtual_memory().total // 2**20
    gpus = scheduler_gpus(probe) if probe is not None else ()
    return Node(name=name, cpu_milli=cpu_milli, memory_mib=memory_mib, gpus=gpus,
                labels=dict(labels or {}))


def ray_start_args(probe: GpuProbe) -> List[str]:
    """`ray start` flags: the healthy GPUs' count, model and memory (the most common model, and
    the smallest memory of that model, when they differ)."""
    gpus = scheduler_gpus(probe)
    if not gpus:
        return ["--num-gpus", "0"]
    model = Counter(g.model for g in gpus).most_common(1)[0][0]
    memory = min(g.memory_mib for g in gpus if g.model == model)
    return ["--num-gpus", str(len(gpus)),
            "--labels", f"{GPU_MODEL_LABEL}={model},{GPU_MEMORY_LABEL}={memory}"]
