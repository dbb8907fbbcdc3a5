"""The scheduler's model of a pool: nodes with CPUs, memory and GPUs (whole or shared), and what a
workload's member asks for. Plain frozen data; no Ray, no torch, no clock.

Units: CPU in millicores, memory in MiB, GPU compute in milli-GPUs (1000 = one whole GPU). A
member asks either for `gpus` whole GPUs (each with at least `gpu_memory_mib` free), or for a
share of one GPU (`gpu_milli` < 1000 of its compute and `gpu_memory_mib` of its memory), as in
GPU-sharing clusters; `gpu_model` pins the GPU model (a resource flavor).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Mapping, Optional, Tuple

GPU_MILLI = 1000
CAPACITY_TYPE, ZONE = "capacity-type", "zone"
SPOT, ON_DEMAND = "spot", "on-demand"


class ModelError(ValueError):
    """A shape, node or workload that cannot exist; the message says which field is wrong."""


@dataclass(frozen=True)
class Shape:
    """What one member of a workload asks for."""

    cpu_milli: int = 0
    memory_mib: int = 0
    gpus: int = 0  # whole GPUs
    gpu_milli: int = 0  # a share of one GPU's compute, 1..999, when gpus == 0
    gpu_memory_mib: int = 0  # per whole GPU, or of the shared GPU
    gpu_model: Optional[str] = None  # None: any model

    def __post_init__(self) -> None:
        for name in ("cpu_milli", "memory_mib", "gpus", "gpu_milli", "gpu_memory_mib"):
            if getattr(self, name) < 0:
                raise ModelError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.gpus and self.gpu_milli:
            raise ModelError("ask for whole GPUs (gpus) or a share of one (gpu_milli), not both")
        if self.gpu_milli >= GPU_MILLI:
            raise ModelError(f"gpu_milli {self.gpu_milli} is a whole GPU or more: use gpus")

    @property
    def gpu_demand_milli(self) -> int:
        """GPU compute asked for, in milli-GPUs."""
        return self.gpus * GPU_MILLI + self.gpu_milli

    @property
    def shares_gpu(self) -> bool:
        return self.gpu_milli > 0


@dataclass(frozen=True)
class Gpu:
    model: str
    memory_mib: int
    used_milli: int = 0
    used_memory_mib: int = 0

    @property
    def free_milli(self) -> int:
        return GPU_MILLI - self.used_milli

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib


@dataclass(frozen=True)
class Node:
    """A node of the pool and what is allocated on it."""

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: Tuple[Gpu, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    used_cpu_milli: int = 0
    used_memory_mib: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        if self.cpu_milli < 0 or self.memory_mib < 0:
            raise ModelError(f"node {self.name}: negative capacity")

    @property
    def free_cpu_milli(self) -> int:
        return self.cpu_milli - self.used_cpu_milli

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib

    @property
    def spot(self) -> bool:
        return self.labels.get(CAPACITY_TYPE) == SPOT

    @property
    def zone(self) -> Optional[str]:
        return self.labels.get(ZONE)

    @property
    def gpu_model(self) -> Optional[str]:
        return self.gpus[0].model if self.gpus else None


@dataclass(frozen=True)
class Binding:
    """Where one member runs: a node, and for GPU shapes which of its GPUs (by index) and how
    much of each (milli-GPUs; GPU memory follows the shape)."""

    node: str
    gpu_indices: Tuple[int, ...] = ()


def can_hold(node: Node, shape: Shape) -> bool:
    """Whether this node, empty, could ever hold one member of `shape` (for rejecting shapes no
    node type can hold)."""
    if shape.cpu_milli > node.cpu_milli or shape.memory_mib > node.memory_mib:
        return False
    gpus = [g for g in node.gpus if shape.gpu_model in (None, g.model)
            and g.memory_mib >= shape.gpu_memory_mib]
    if shape.gpus:
        return len(gpus) >= shape.gpus
    if shape.gpu_milli:
        return bool(gpus)
    return True


def gpu_choice(node: Node, shape: Shape) -> Optional[Tuple[int, ...]]:
    """GPUs of this node that can take one member of `shape` now, or None. Whole GPUs: the
    first free ones of the model; a share: the GPU with the least free compute that fits (so
    shares pack onto partly used GPUs). CPU and memory are checked too."""
    if shape.cpu_milli > node.free_cpu_milli or shape.memory_mib > node.free_memory_mib:
        return None
    if not shape.gpu_demand_milli:
        return ()
    fits = [i for i, g in enumerate(node.gpus) if shape.gpu_model in (None, g.model)]
    if shape.gpus:
        free = [i for i in fits if node.gpus[i].used_milli == 0
                and node.gpus[i].free_memory_mib >= shape.gpu_memory_mib]
        return tuple(free[:shape.gpus]) if len(free) >= shape.gpus else None
    shared = [i for i in fits if node.gpus[i].free_milli >= shape.gpu_milli
              and node.gpus[i].free_memory_mib >= shape.gpu_memory_mib]
    if not shared:
        return None
    return (min(shared, key=lambda i: (node.gpus[i].free_milli, i)),)


def allocate(node: Node, shape: Shape, gpu_indices: Tuple[int, ...], sign: int = 1) -> Node:
    """The node with one member of `shape` added on those GPUs (sign -1: removed)."""
    gpus = list(node.gpus)
    for i in gpu_indices:
        g = gpus[i]
        milli = GPU_MILLI if shape.gpus else shape.gpu_milli
        gpus[i] = replace(g, used_milli=g.used_milli + sign * milli,
                          used_memory_mib=g.used_memory_mib + sign * shape.gpu_memory_mib)
    return replace(node, gpus=tuple(gpus),
                   used_cpu_milli=node.used_cpu_milli + sign * shape.cpu_milli,
                   used_memory_mib=node.used_memory_mib + sign * shape.memory_mib)


def totals(nodes: Mapping[str, Node]) -> Dict[str, int]:
    """Capacity of the pool: cpu_milli, memory_mib, gpu_milli."""
    return {"cpu_milli": sum(n.cpu_milli for n in nodes.values()),
            "memory_mib": sum(n.memory_mib for n in nodes.values()),
            "gpu_milli": sum(len(n.gpus) * GPU_MILLI for n in nodes.values())}
