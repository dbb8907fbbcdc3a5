"""GPU fragmentation of a node with respect to a target workload mix (FGD, ATC'23).

Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation
Gradient Descent" (USENIX ATC '23) measure how much of a node's idle GPU compute is useless to the
workloads the cluster expects. For one workload type t (CPU, GPUs, per-GPU compute, GPU model) the
node's idle GPU compute is all fragment if t cannot run there now (too little CPU, not enough GPUs
with room for its per-GPU share, wrong model, or t asks for no GPU at all); if t can run, only the
idle compute of GPUs too full for t's per-GPU share is fragment. The node's fragmentation is the
expectation of that over the mix: F(node) = sum_t p_t * frag_t(node).

We compute it as F = W * idle - U, with W = sum_t p_t and U the expected *usable* idle compute:
U = sum_t p_t * [t can run] * (idle compute of the GPUs t could use). A placement's FGD score is
F(before) - F(after) = W * demand + U(after) - U(before); everything below is about U.

Our refinement (`cpu_feed` = lambda > 0, used by placement_fgd.Ours): FGD asks only whether one
member of t fits, so a node whose CPU can feed one more member but not its other idle GPUs looks
unfragmented. We also count, with weight lambda, the part of t's usable GPU compute that the
node's free CPU cannot feed at t's CPU-per-GPU ratio: usable_t -= lambda * max(0, usable_t -
cpu_free * gpu_milli_t * gpus_t / cpu_t). That steers CPU-hungry members to CPU-rich nodes and
keeps CPU on GPU-rich nodes for GPU work (see benchmarks/fgd.py for what it buys).

It owns:
  - `WorkloadMix`: the target mix, built from the shapes the cluster sees (the most frequent
    shapes covering `coverage` of them, as the FGD authors' simulator does with 95%);
  - vectorised U over a `pool.PoolIndex`, for the nodes as they are, after a whole-GPU or
    CPU-only member, and after a share on each of a node's GPUs;
  - `node_fragmentation`, a plain-Python F for one `model.Node` (reference and tests).
Host memory is not part of the measure (as in the paper); GPU memory is, when the mix asks for it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from .model import GPU_MILLI, Node, Shape
from .pool import PoolIndex

MAX_TYPES = 64  # the Alibaba trace needs 35 types for 95% of its pods

# One workload type of the mix: (cpu_milli, per-GPU milli, GPUs, gpu_memory_mib, gpu_model).
TypeKey = Tuple[int, int, int, int, Optional[str]]


def type_key(shape: Shape) -> TypeKey:
    """A shape as a workload type: whole GPUs are `gpus` x 1000 milli, a share 1 x gpu_milli."""
    if shape.gpus:
        return (shape.cpu_milli, GPU_MILLI, shape.gpus, shape.gpu_memory_mib, shape.gpu_model)
    if shape.gpu_milli:
        return (shape.cpu_milli, shape.gpu_milli, 1, shape.gpu_memory_mib, shape.gpu_model)
    return (shape.cpu_milli, 0, 0, 0, None)


@dataclass(frozen=True)
class WorkloadMix:
    """Workload types and their probabilities (summing to 1)."""

    types: Tuple[TypeKey, ...]
    weights: Tuple[float, ...]

    @classmethod
    def from_shapes(cls, shapes: Iterable[Shape], coverage: float = 0.95,
                    max_types: int = MAX_TYPES) -> "WorkloadMix":
        """The most frequent types (ties: larger type first) until they cover `coverage` of the
        shapes, renormalised, as the FGD authors' simulator derives its "typical pods"; at most
        `max_types` of them (scoring cost grows with the number of types)."""
        counts = Counter(type_key(s) for s in shapes)
        total = sum(counts.values())
        if not total:
            raise ValueError("an empty workload has no mix")
        order = sorted(counts.items(), key=lambda kv: (kv[1], _order(kv[0])), reverse=True)
        kept, cum = [], 0
        for key, cnt in order:
            if cum >= coverage * total or len(kept) >= max_types:
                break
            kept.append((key, cnt))
            cum += cnt
        return cls(tuple(k for k, _ in kept), tuple(c / cum for _, c in kept))

    @classmethod
    def of(cls, weighted: Sequence[Tuple[Shape, float]]) -> "WorkloadMix":
        total = float(sum(w for _, w in weighted))
        return cls(tuple(type_key(s) for s, _ in weighted), tuple(w / total for _, w in weighted))

    def arrays(self, pool: PoolIndex, cpu_feed: float = 0.0) -> "MixArrays":
        cpu, milli, count, gmem, model = (np.array(c) for c in zip(*self.types)) \
            if self.types else (np.zeros(0, np.int64),) * 5
        codes = np.array([pool.code(m) for m in model], dtype=np.int64)
        with np.errstate(divide="ignore"):  # CPU-free types: their CPU feeds any GPU
            per_cpu = np.where(cpu > 0, milli * count / np.maximum(cpu, 1), np.inf)
        return MixArrays(cpu.astype(np.int64), milli.astype(np.int64), count.astype(np.int64),
                         gmem.astype(np.int64), codes, np.array(self.weights, dtype=float),
                         per_cpu.astype(float), float(cpu_feed))


def _order(key: TypeKey):
    cpu, milli, count, gmem, model = key
    return (cpu, milli, count, gmem, model or "")


@dataclass(frozen=True)
class MixArrays:
    """A mix as per-type arrays, model names resolved to a pool's codes."""

    cpu: np.ndarray
    milli: np.ndarray
    count: np.ndarray
    gmem: np.ndarray
    code: np.ndarray
    weight: np.ndarray
    gpu_per_cpu: np.ndarray  # milli-GPU a type uses per millicore
    cpu_feed: float = 0.0  # lambda of the refinement; 0 is FGD's measure

    @property
    def total_weight(self) -> float:
        return float(self.weight.sum())

    def slot_ok(self, pool: PoolIndex, rows, gpu_mem_free: Optional[np.ndarray] = None):
        """[rows, slots, types] bool: slot is a GPU of a model type t accepts, with its memory."""
        ok = pool.present[rows][:, :, None] & (self.milli > 0)
        if (self.code != -1).any():
            ok = ok & ((self.code == -1) | (pool.gpu_model[rows][:, :, None] == self.code))
        if (self.gmem > 0).any():
            mem = pool.gpu_mem_free[rows] if gpu_mem_free is None else gpu_mem_free
            ok = ok & (mem[:, :, None] >= self.gmem)
        return ok


def _fed(mix: MixArrays, usable: np.ndarray, cpu_free: np.ndarray) -> np.ndarray:
    """usable [..., t] less cpu_feed x the part the free CPU [..., 1] cannot feed."""
    if not mix.cpu_feed:
        return usable
    return usable - mix.cpu_feed * np.maximum(0.0, usable - cpu_free * mix.gpu_per_cpu)


def _usable(mix: MixArrays, free: np.ndarray, ok: np.ndarray, cpu_free: np.ndarray) -> np.ndarray:
    """U per row from slot free compute [r, s], slot acceptance [r, s, t] and free CPU [r]."""
    fit = ok & (free[:, :, None] >= mix.milli)
    usable = _fed(mix, (fit * free[:, :, None]).sum(axis=1), cpu_free[:, None])  # [r, t]
    runs = (fit.sum(axis=1) >= mix.count) & (cpu_free[:, None] >= mix.cpu) & (mix.milli > 0)
    return (runs * usable) @ mix.weight


def usable_now(pool: PoolIndex, mix: MixArrays, rows) -> np.ndarray:
    """U of the given nodes as they are."""
    return _usable(mix, pool.gpu_free[rows], mix.slot_ok(pool, rows), pool.cpu_free[rows])


def usable_after(pool: PoolIndex, mix: MixArrays, rows: np.ndarray, shape: Shape,
                 chosen: Optional[np.ndarray]) -> np.ndarray:
    """U of the given nodes after one whole-GPU or GPU-less member of `shape`; `chosen` [r, s]
    marks the GPUs it would take (None for no GPUs)."""
    free, mem = pool.gpu_free[rows], pool.gpu_mem_free[rows]
    if chosen is not None:
        free = np.where(chosen, 0, free)
        mem = np.where(chosen, mem - shape.gpu_memory_mib, mem)
    ok = mix.slot_ok(pool, rows, mem)
    return _usable(mix, free, ok, pool.cpu_free[rows] - shape.cpu_milli)


def usable_after_share(pool: PoolIndex, mix: MixArrays, rows: np.ndarray, shape: Shape,
                       fits: np.ndarray) -> np.ndarray:
    """[r, s] U of the given nodes after a share of `shape` on each slot (-inf where it does not
    fit). Only the chosen slot changes, so U is updated per slot rather than recomputed."""
    free = pool.gpu_free[rows]
    ok = mix.slot_ok(pool, rows)
    fit = ok & (free[:, :, None] >= mix.milli)  # [r, s, t]
    usable = (fit * free[:, :, None]).sum(axis=1)  # [r, t]
    count = fit.sum(axis=1)
    after = free - shape.gpu_milli  # [r, s]
    ok_after = ok if not shape.gpu_memory_mib else mix.slot_ok(
        pool, rows, pool.gpu_mem_free[rows] - shape.gpu_memory_mib)
    fit_after = ok_after & (after[:, :, None] >= mix.milli)
    usable2 = usable[:, None, :] - fit * free[:, :, None] + fit_after * after[:, :, None]
    count2 = count[:, None, :] - fit + fit_after
    cpu_after = (pool.cpu_free[rows] - shape.cpu_milli)[:, None, None]
    usable2 = _fed(mix, usable2, cpu_after)
    runs = (count2 >= mix.count) & (cpu_after >= mix.cpu) & (mix.milli > 0)
    u = (runs * usable2) @ mix.weight
    return np.where(fits, u, -np.inf)


def node_fragmentation(node: Node, mix: WorkloadMix, cpu_feed: float = 0.0) -> float:
    """F(node) in milli-GPUs, straight from the definition (no numpy): the expected idle GPU
    compute of `node` that a member drawn from `mix` could not use (with `cpu_feed`, also that
    share of what its free CPU could not feed)."""
    idle = sum(g.free_milli for g in node.gpus)
    frag = 0.0
    for (cpu, milli, count, gmem, model), p in zip(mix.types, mix.weights):
        fit = [g.free_milli for g in node.gpus if milli and model in (None, g.model)
               and g.free_milli >= milli and g.free_memory_mib >= gmem]
        runs = milli > 0 and len(fit) >= count and node.free_cpu_milli >= cpu
        usable = float(sum(fit))
        if cpu_feed and cpu:
            usable -= cpu_feed * max(0.0, usable - node.free_cpu_milli * milli * count / cpu)
        frag += p * (idle - usable if runs else idle)
    return frag
