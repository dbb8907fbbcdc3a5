"""Placement policies: which node (and which of its GPUs) one member of a workload goes to.

Each policy is a small class with `choose(pool, shape, nodes, fits)`: given a `pool.PoolIndex`,
the member's `model.Shape`, the mask of nodes that can take it now and the mask of their GPU
slots that could serve it (both from `PoolIndex.feasible`), it returns (node row, GPU slots) or
None. Policies only choose among feasible nodes and slots, and `PoolIndex.bind` refuses any
overcommit, so no policy can overcommit CPU, memory, or a GPU's compute or memory. Ties between
equally scored nodes go to the lowest `pool.rank` (a fixed, optionally seeded, order of nodes).

Policies (by name, see `make`):
  random     uniform over feasible nodes (seeded); a share goes to a uniformly drawn fitting GPU.
  best_fit   the node left with the least free resources: minimises 0.5*cpu_left/max_cpu +
             0.5*gpu_left/max_gpu after placement (the FGD paper's Best-fit baseline; max_* are
             the largest node's capacities).
  packing    GPU packing (the FGD paper's baseline): a share onto an already shared GPU first
             (the fuller the better), then free GPUs on partly used nodes, then empty nodes.
  fgd        Fragmentation Gradient Descent (placement_fgd): where the expected fragmentation
             of the target workload mix grows least.
  ours       FGD over a CPU-aware fragmentation measure (placement_fgd.Ours; see its docstring).
  binpack    fewest free resources after placement (mean of CPU, memory, GPU fractions).
  spread     most free resources after placement (same measure); a share on the emptiest GPU.

`quantize=True` reproduces the FGD authors' simulator, whose Kubernetes score plugins return
integer scores 0..100, so close candidates tie and fall to the node order. It is the default for
fgd and ours, where it matters a lot (placement_fgd explains why), and off by default for
best_fit, where it does not.

`Placer` keeps an index and a policy together for repeated calls (bind each choice you act on);
`place` is the one-shot convenience over plain `model.Node`s.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple, Union

import numpy as np

from .fragmentation import WorkloadMix
from .model import GPU_MILLI, Binding, Node, Shape
from .pool import PoolIndex

Choice = Optional[Tuple[int, Tuple[int, ...]]]


def best_row(score: np.ndarray, rows: np.ndarray, rank: np.ndarray) -> int:
    """Among `rows` (scored by `score`, aligned with them), the one with the highest score;
    ties go to the lowest rank."""
    tied = rows[score == score.max()]
    return int(tied[np.argmin(rank[tied])]) if tied.size > 1 else int(tied[0])


def first_slots(fits_row: np.ndarray, k: int) -> Tuple[int, ...]:
    return tuple(int(j) for j in np.flatnonzero(fits_row)[:k])


def tightest_slot(free_row: np.ndarray, fits_row: np.ndarray) -> int:
    """The fitting slot with the least free compute (lowest index on ties)."""
    return int(np.argmin(np.where(fits_row, free_row, np.iinfo(np.int64).max)))


def slots_for(pool: PoolIndex, i: int, shape: Shape, fits: Optional[np.ndarray],
              share_slot=tightest_slot) -> Tuple[int, ...]:
    """GPU slots of node i for `shape`: whole GPUs are the first fitting ones, a share the slot
    `share_slot` picks, no GPUs ()."""
    if fits is None:
        return ()
    if shape.gpus:
        return first_slots(fits[i], shape.gpus)
    return (share_slot(pool.gpu_free[i], fits[i]),)


class Random:
    """Uniform over feasible nodes; a share on a uniformly drawn fitting GPU."""

    name = "random"

    def __init__(self, seed: Optional[int] = None):
        self.rng = np.random.default_rng(seed)

    def choose(self, pool: PoolIndex, shape: Shape, nodes: np.ndarray, fits) -> Choice:
        rows = np.flatnonzero(nodes)
        i = int(rows[self.rng.integers(rows.size)])
        if fits is not None and not shape.gpus:
            slots = np.flatnonzero(fits[i])
            return i, (int(slots[self.rng.integers(slots.size)]),)
        return i, slots_for(pool, i, shape, fits)


class BestFit:
    """Least weighted free CPU and GPU left after placement (FGD paper's Best-fit)."""

    name = "best_fit"

    def __init__(self, quantize: bool = False, cpu_weight: float = 0.5, gpu_weight: float = 0.5):
        self.quantize, self.wc, self.wg = quantize, cpu_weight, gpu_weight

    def choose(self, pool: PoolIndex, shape: Shape, nodes: np.ndarray, fits) -> Choice:
        rows = np.flatnonzero(nodes)
        max_cpu = float(pool.cpu_cap.max()) or 1.0
        max_gpu = float(pool.gpu_count.max() * GPU_MILLI) or 1.0
        left = (pool.cpu_free[rows] - shape.cpu_milli) / max_cpu * self.wc \
            + (pool.gpu_free[rows].sum(axis=1) - shape.gpu_demand_milli) / max_gpu * self.wg
        score = (1.0 - left) * 100.0
        if self.quantize:
            score = np.trunc(score)
        i = best_row(score, rows, pool.rank)
        return i, slots_for(pool, i, shape, fits)


class Packing:
    """GPU packing, with the FGD authors' integer scores: a share on a shared GPU scores
    100 - (its free tenths) (at least 50); a member that must open free GPUs on a partly used
    node 50 - (GPUs opened) (at least 33); a fully free node 33 - its GPUs; GPU-less members tie
    (node order). GPUs: the tightest fitting one for a share, the first free ones otherwise."""

    name = "packing"

    def choose(self, pool: PoolIndex, shape: Shape, nodes: np.ndarray, fits) -> Choice:
        rows = np.flatnonzero(nodes)
        if fits is None:
            i = best_row(np.zeros(rows.size), rows, pool.rank)
            return i, ()
        free = pool.gpu_free[rows]
        full = ((free == GPU_MILLI) & pool.present[rows]).sum(axis=1)
        if shape.gpus:
            used = np.maximum(50 - shape.gpus, 33) + np.zeros(rows.size, dtype=np.int64)
        else:
            tight = np.where(fits[rows], free, np.iinfo(np.int64).max).min(axis=1)
            tenths = (tight * 100 // GPU_MILLI) // 10
            used = np.where(tight == GPU_MILLI, 49, np.maximum(100 - tenths, 50))
        score = np.where(full == pool.gpu_count[rows], np.maximum(33 - full, full), used)
        i = best_row(score, rows, pool.rank)
        return i, slots_for(pool, i, shape, fits)


class _Balance:
    """Mean free fraction of CPU, memory and (on GPU nodes) GPU compute after placement."""

    sign = 1.0

    def choose(self, pool: PoolIndex, shape: Shape, nodes: np.ndarray, fits) -> Choice:
        rows = np.flatnonzero(nodes)
        cpu = (pool.cpu_free[rows] - shape.cpu_milli) / np.maximum(pool.cpu_cap[rows], 1)
        mem = (pool.mem_free[rows] - shape.memory_mib) / np.maximum(pool.mem_cap[rows], 1)
        has = pool.gpu_count[rows] > 0
        gpu = (pool.gpu_free[rows].sum(axis=1) - shape.gpu_demand_milli) \
            / np.maximum(pool.gpu_count[rows] * GPU_MILLI, 1)
        frac = (cpu + mem + np.where(has, gpu, 0.0)) / np.where(has, 3.0, 2.0)
        i = best_row(self.sign * frac, rows, pool.rank)
        return i, slots_for(pool, i, shape, fits, self.share_slot)


class Binpack(_Balance):
    """Fewest free resources after placement; a share on the tightest GPU."""

    name, sign = "binpack", -1.0
    share_slot = staticmethod(tightest_slot)


def emptiest_slot(free_row: np.ndarray, fits_row: np.ndarray) -> int:
    return int(np.argmax(np.where(fits_row, free_row, -1)))


class Spread(_Balance):
    """Most free resources after placement; a share on the emptiest GPU."""

    name, sign = "spread", 1.0
    share_slot = staticmethod(emptiest_slot)


STRATEGIES = ("random", "best_fit", "packing", "fgd", "ours", "binpack", "spread")


def make(name: str, *, seed: Optional[int] = None, mix: Optional[WorkloadMix] = None,
         quantize: Optional[bool] = None):
    """A policy by name. fgd and ours need the target workload `mix`; quantize None is the
    policy's default."""
    from . import placement_fgd
    if name == "random":
        return Random(seed)
    if name == "best_fit":
        return BestFit(quantize=bool(quantize))
    if name == "packing":
        return Packing()
    if name == "binpack":
        return Binpack()
    if name == "spread":
        return Spread()
    if name in ("fgd", "ours"):
        if mix is None:
            raise ValueError(f"{name} needs the target workload mix (fragmentation.WorkloadMix)")
        cls = placement_fgd.Fgd if name == "fgd" else placement_fgd.Ours
        return cls(mix) if quantize is None else cls(mix, quantize=quantize)
    raise ValueError(f"unknown placement strategy {name!r}; known: {', '.join(STRATEGIES)}")


class Placer:
    """An index and a policy: `place` chooses, `bind`/`unbind` record what was done."""

    def __init__(self, nodes: Union[PoolIndex, Mapping[str, Node], Iterable[Node]],
                 strategy="best_fit", *, seed: Optional[int] = None,
                 mix: Optional[WorkloadMix] = None, quantize: Optional[bool] = None):
        self.pool = nodes if isinstance(nodes, PoolIndex) else PoolIndex(nodes, seed=seed)
        self.strategy = make(strategy, seed=seed, mix=mix, quantize=quantize) \
            if isinstance(strategy, str) else strategy

    def place(self, shape: Shape) -> Optional[Binding]:
        """Where one member of `shape` should go now, or None if no node can take it."""
        nodes, fits = self.pool.feasible(shape)
        if not nodes.any():
            return None
        choice = self.strategy.choose(self.pool, shape, nodes, fits)
        if choice is None:
            return None
        i, gpus = choice
        return Binding(self.pool.names[i], tuple(gpus))

    def bind(self, binding: Binding, shape: Shape) -> None:
        self.pool.bind(binding, shape)

    def unbind(self, binding: Binding, shape: Shape) -> None:
        self.pool.unbind(binding, shape)

    def place_and_bind(self, shape: Shape) -> Optional[Binding]:
        binding = self.place(shape)
        if binding is not None:
            self.pool.bind(binding, shape)
        return binding


def place(nodes: Union[Mapping[str, Node], Iterable[Node]], shape: Shape, strategy="best_fit",
          *, seed: Optional[int] = None, mix: Optional[WorkloadMix] = None,
          quantize: Optional[bool] = None) -> Optional[Binding]:
    """One-shot: where one member of `shape` goes in this pool, or None. Builds an index each
    call; for many calls over the same pool keep a `Placer`."""
    return Placer(nodes, strategy, seed=seed, mix=mix, quantize=quantize).place(shape)
