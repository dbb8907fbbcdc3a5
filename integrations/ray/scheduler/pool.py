"""A numpy index over a pool's nodes, kept up to date one bind/unbind at a time.

Placement policies score every node of a pool for every member they place; done over
`model.Node` objects that is a Python loop over ~1,500 nodes per call. `PoolIndex` holds the same
state as arrays (one row per node, one column per GPU slot) so a policy can filter and score all
nodes with a few vectorised operations, and it changes only one row per bind or unbind.

It owns:
  - the free CPU, memory, and per-GPU free compute / memory of every node, with the GPU model of
    every slot (nodes with fewer GPUs than the widest node have padding slots that never fit);
  - `version`, a stamp per node, new on every change and unique across all indexes of the
    process (copies included), so a policy may cache per-node scores and recompute only the rows
    whose stamp changed (see placement_fgd); `layout`, shared by an index and its copies while
    the nodes, their order and their capacities stay the same, says when such a cache applies;
  - `rank`, a fixed per-node order used to break ties between equally good nodes (seeded: the
    FGD authors' simulator also breaks ties by a random but fixed order of the nodes);
  - the current `model.Node` of every node, updated with `model.allocate`, so what the index says
    and what the model says never drift apart.

`bind` refuses (ModelError) anything that would overcommit CPU, memory, or a GPU's compute or
memory: the index is the last line of defence whatever a policy chose.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from .model import GPU_MILLI, Binding, ModelError, Node, Shape, allocate

NO_MODEL = -2  # code of a gpu_model the pool does not have: matches no slot
_STAMPS = itertools.count(1)  # node version stamps: never reused, so caches keyed on them hold


class PoolIndex:
    """Arrays over the pool's nodes; see the module docstring."""

    def __init__(self, nodes: Union[Mapping[str, Node], Iterable[Node]],
                 seed: Optional[int] = None):
        nodes = list(nodes.values()) if isinstance(nodes, Mapping) else list(nodes)
        self.nodes: List[Node] = nodes
        self.names: List[str] = [n.name for n in nodes]
        self.pos: Dict[str, int] = {name: i for i, name in enumerate(self.names)}
        if len(self.pos) != len(nodes):
            raise ModelError("node names must be unique")
        n, g = len(nodes), max([len(x.gpus) for x in nodes] + [1])
        self.models: List[str] = sorted({gpu.model for x in nodes for gpu in x.gpus})
        self.model_code: Dict[str, int] = {m: i for i, m in enumerate(self.models)}
        self.cpu_cap = np.array([x.cpu_milli for x in nodes], dtype=np.int64)
        self.mem_cap = np.array([x.memory_mib for x in nodes], dtype=np.int64)
        self.cpu_free = np.zeros(n, dtype=np.int64)
        self.mem_free = np.zeros(n, dtype=np.int64)
        self.gpu_count = np.array([len(x.gpus) for x in nodes], dtype=np.int64)
        self.present = np.zeros((n, g), dtype=bool)
        self.gpu_model = np.full((n, g), -1, dtype=np.int64)
        self.gpu_free = np.zeros((n, g), dtype=np.int64)  # milli; padding 0: fits nothing
        self.gpu_mem_cap = np.zeros((n, g), dtype=np.int64)
        self.gpu_mem_free = np.full((n, g), -1, dtype=np.int64)  # padding -1: fits nothing
        self.version = np.zeros(n, dtype=np.int64)
        self.layout = object()
        self.rank = (np.arange(n) if seed is None
                     else np.random.default_rng(seed).permutation(n)).astype(np.int64)
        for i in range(n):
            self._load(i)
        self.gpu_total_milli = int(self.gpu_count.sum()) * GPU_MILLI

    def __len__(self) -> int:
        return len(self.names)

    def copy(self) -> "PoolIndex":
        """An independent copy (same layout and stamps until either changes)."""
        new = object.__new__(PoolIndex)
        new.__dict__.update(self.__dict__)
        for key, value in self.__dict__.items():
            if isinstance(value, np.ndarray):
                new.__dict__[key] = value.copy()
        new.nodes = list(self.nodes)
        return new

    def _load(self, i: int) -> None:
        node = self.nodes[i]
        self.cpu_free[i] = node.free_cpu_milli
        self.mem_free[i] = node.free_memory_mib
        for j, gpu in enumerate(node.gpus):
            self.present[i, j] = True
            self.gpu_model[i, j] = self.model_code[gpu.model]
            self.gpu_free[i, j] = gpu.free_milli
            self.gpu_mem_cap[i, j] = gpu.memory_mib
            self.gpu_mem_free[i, j] = gpu.free_memory_mib
        self.version[i] = next(_STAMPS)

    def node(self, name: str) -> Node:
        return self.nodes[self.pos[name]]

    def code(self, gpu_model: Optional[str]) -> int:
        """-1 for any model, NO_MODEL for a model no node has, else the model's code."""
        if gpu_model is None:
            return -1
        return self.model_code.get(gpu_model, NO_MODEL)

    # -- what fits -------------------------------------------------------------------------------

    def gpu_fits(self, shape: Shape, rows=slice(None)) -> np.ndarray:
        """[nodes, slots] bool: slots that could take (one GPU of) `shape` now. Whole GPUs need
        an unused GPU; a share needs that much free compute. Both need the GPU memory and model."""
        code = self.code(shape.gpu_model)
        ok = self.present[rows] & (self.gpu_mem_free[rows] >= shape.gpu_memory_mib)
        if code != -1:
            ok &= self.gpu_model[rows] == code
        if shape.gpus:
            return ok & (self.gpu_free[rows] == GPU_MILLI)
        return ok & (self.gpu_free[rows] >= shape.gpu_milli)

    def feasible(self, shape: Shape) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(nodes mask, slots mask or None for a shape without GPUs): nodes that can take one
        member of `shape` now, and on them the GPU slots that could serve it."""
        ok = (self.cpu_free >= shape.cpu_milli) & (self.mem_free >= shape.memory_mib)
        if not shape.gpu_demand_milli:
            return ok, None
        fits = self.gpu_fits(shape)
        need = shape.gpus if shape.gpus else 1
        return ok & (fits.sum(axis=1) >= need), fits

    # -- changes ---------------------------------------------------------------------------------

    def bind(self, binding: Binding, shape: Shape, sign: int = 1) -> None:
        """Record one member of `shape` placed as `binding` (sign -1: removed). Raises ModelError,
        changing nothing, if it does not fit or names GPUs that do not fit."""
        i = self.pos.get(binding.node)
        if i is None:
            raise ModelError(f"no node {binding.node!r} in the pool")
        gpus = tuple(binding.gpu_indices)
        want = shape.gpus if shape.gpus else (1 if shape.gpu_milli else 0)
        if len(gpus) != want or len(set(gpus)) != len(gpus) \
                or any(j < 0 or j >= self.gpu_count[i] for j in gpus):
            raise ModelError(f"binding {binding} does not name {want} distinct GPUs of its node")
        milli = GPU_MILLI if shape.gpus else shape.gpu_milli
        if sign > 0:
            fits = self.gpu_fits(shape, rows=slice(i, i + 1))[0]
            if shape.cpu_milli > self.cpu_free[i] or shape.memory_mib > self.mem_free[i] \
                    or not all(fits[j] for j in gpus):
                raise ModelError(f"{shape} does not fit on {binding}")
        else:
            if any(self.gpu_free[i, j] + milli > GPU_MILLI for j in gpus) \
                    or self.cpu_free[i] + shape.cpu_milli > self.cpu_cap[i] \
                    or self.mem_free[i] + shape.memory_mib > self.mem_cap[i]:
                raise ModelError(f"{shape} is not bound on {binding}")
        self.nodes[i] = allocate(self.nodes[i], shape, gpus, sign)
        self.cpu_free[i] -= sign * shape.cpu_milli
        self.mem_free[i] -= sign * shape.memory_mib
        for j in gpus:
            self.gpu_free[i, j] -= sign * milli
            self.gpu_mem_free[i, j] -= sign * shape.gpu_memory_mib
        self.version[i] = next(_STAMPS)

    def unbind(self, binding: Binding, shape: Shape) -> None:
        self.bind(binding, shape, sign=-1)

    def replace(self, node: Node) -> None:
        """Take a node's new state wholesale (e.g. after a resync); its GPU layout must stay."""
        i = self.pos[node.name]
        if len(node.gpus) != self.gpu_count[i] \
                or any(g.model not in self.model_code for g in node.gpus):
            raise ModelError(f"node {node.name}: GPU count or model changed; build a new index")
        old = self.nodes[i]
        self.nodes[i] = node
        if (old.cpu_milli, old.memory_mib, [g.memory_mib for g in old.gpus], old.labels) != \
                (node.cpu_milli, node.memory_mib, [g.memory_mib for g in node.gpus], node.labels):
            self.layout = object()
        self.cpu_cap[i], self.mem_cap[i] = node.cpu_milli, node.memory_mib
        self._load(i)

    # -- summaries -------------------------------------------------------------------------------

    def used_gpu_milli(self) -> int:
        return self.gpu_total_milli - int(self.gpu_free.sum())

    def gpu_free_total(self) -> np.ndarray:
        return self.gpu_free.sum(axis=1)
