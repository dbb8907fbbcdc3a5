"""Which GPUs this node's workers use: a pure choice over the node's devices, their links and
their health (read by integrations/nvml; this module imports nothing of it).

Links are NVML's topology levels between two devices (lower is better), with NVLink below them
all: NV (NVLink), PIX (one PCIe switch), PXB (several), PHB (the host bridge), NODE (one NUMA
node), SYS (across sockets). "Best-connected" k devices are those whose worst pair is best;
ties go to the lowest indices. A node's workers take them in topology order: from the lowest
index, each next one the closest to the last (ties by index), so neighbouring local ranks sit on
neighbouring devices and an NVLink island is filled before the next.

Modes (`GpuRequest` -> `DeviceAssignment`, one environment per local rank):
    shared  the default. Every worker sees the same CUDA_VISIBLE_DEVICES: the nproc chosen
            devices in local-rank order, so `cuda:LOCAL_RANK` is a worker's own device (what
            torchrun scripts use) and NCCL sees its peers' devices (P2P over NVLink). A node
            with fewer GPUs than workers shows them all, unlimited, as torchrun would.
    own     --gpus-per-proc N: each worker sees only its N devices (its first is cuda:0).
    shares  --gpu-memory-fraction F: each worker sees one device, which at most 1/F workers
            share (their fractions never add up to more than the device); the worker limits
            itself to F of its memory through torch (`elastic.gpu`).
    none    --gpus-per-proc 0, no GPU, or a CUDA_VISIBLE_DEVICES we cannot read (MIG): nothing
            is set.
Whenever the agent sets CUDA_VISIBLE_DEVICES it sets CUDA_DEVICE_ORDER=PCI_BUS_ID, so numbers
are nvidia-smi's (NVML's) indices, and ELASTIC_CUDA_DEVICE to a worker's own device ordinal.
A CUDA_VISIBLE_DEVICES the user set is respected: devices are chosen among those it names (read
as CUDA reads it: up to the first entry that is no device), written back in the user's words.

Unhealthy devices are never chosen. When too few healthy ones remain for the request, the node
must not join (`UnhealthyGpus`): its workers could not run as asked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional, Sequence, Tuple

from elastic import contract

INTERNAL, NVLINK, PIX, PXB, PHB, NODE, SYS = 0, 5, 10, 20, 30, 40, 50
LINK_NAMES = {INTERNAL: "X", NVLINK: "NV", PIX: "PIX", PXB: "PXB", PHB: "PHB", NODE: "NODE",
              SYS: "SYS"}
_LINKS_BY_NAME = {name: level for level, name in LINK_NAMES.items()}
PCI_BUS_ID = "PCI_BUS_ID"
_SHARE_EPSILON = 1e-9  # 1/F computed in floating point: 1/0.2 must allow 5 workers


class DeviceError(ValueError):
    """A GPU request this node cannot serve; the message names the flag or variable to change."""


class UnhealthyGpus(DeviceError):
    """Too few healthy GPUs for the request: the node must not join until they are fixed."""


def parse_link(text: str) -> int:
    """A link as `nvidia-smi topo -m` writes it (X, NV4, PIX, PXB, PHB, NODE, SYS) -> level.

    Raises:
        ValueError: not one of those.
    """
    text = text.strip().upper()
    if text.startswith("NV") and text[2:].isdigit():
        return NVLINK
    if text not in _LINKS_BY_NAME:
        raise ValueError(f"link {text!r} is not X, NV<n>, PIX, PXB, PHB, NODE or SYS")
    return _LINKS_BY_NAME[text]


@dataclass(frozen=True)
class Gpu:
    """One device as the assignment sees it. problems: why it is unhealthy (empty: healthy)."""

    index: int
    uuid: str
    name: str = ""
    memory_mib: int = 0
    problems: Tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class NodeGpus:
    """A node's devices (in index order) and the links between them: links[a][b] between
    gpus[a] and gpus[b], INTERNAL on the diagonal. source: where this came from, for messages."""

    gpus: Tuple[Gpu, ...]
    links: Tuple[Tuple[int, ...], ...]
    source: str = "nvml"

    def __post_init__(self) -> None:
        n = len(self.gpus)
        if [g.index for g in self.gpus] != sorted({g.index for g in self.gpus}):
            raise ValueError("GPUs must be listed once each, in index order")
        if len(self.links) != n or any(len(row) != n for row in self.links):
            raise ValueError(f"links must be a {n}x{n} matrix, one row per GPU")
        for a in range(n):
            for b in range(n):
                if self.links[a][b] != self.links[b][a]:
                    raise ValueError(f"links are not symmetric between GPUs "
                                     f"{self.gpus[a].index} and {self.gpus[b].index}")

    def position(self, index: int) -> int:
        return next(p for p, g in enumerate(self.gpus) if g.index == index)

    def link(self, a: int, b: int) -> int:
        """The link between the GPUs with indices a and b."""
        return self.links[self.position(a)][self.position(b)]


@dataclass(frozen=True)
class GpuRequest:
    """What the command line asks for (see the module docstring)."""

    gpus_per_proc: Optional[int] = None      # --gpus-per-proc; None: the shared default
    memory_fraction: Optional[float] = None  # --gpu-memory-fraction
    visible: Optional[str] = None            # the user's CUDA_VISIBLE_DEVICES, if set

    def __post_init__(self) -> None:
        if self.gpus_per_proc is not None and self.gpus_per_proc < 0:
            raise DeviceError(f"--gpus-per-proc must be 0 or more, got {self.gpus_per_proc}")
        f = self.memory_fraction
        if f is not None:
            if not 0 < f <= 1:
                raise DeviceError(f"--gpu-memory-fraction must be in (0, 1], got {f}")
            if self.gpus_per_proc not in (None, 1):
                raise DeviceError("--gpu-memory-fraction shares one GPU between workers; leave "
                                  f"out --gpus-per-proc {self.gpus_per_proc}")

    @property
    def mode(self) -> str:
        if self.memory_fraction is not None:
            return "shares"
        if self.gpus_per_proc == 0:
            return "none"
        return "shared" if self.gpus_per_proc is None else "own"


@dataclass(frozen=True)
class DeviceAssignment:
    """What each local rank is told. visible[r]: its CUDA_VISIBLE_DEVICES entries (empty: leave
    the variable alone); own[r]: the indices of the devices it has to itself or as its share
    (none when more workers than GPUs share them all); ordinal[r]: the device it should use,
    within what it sees."""

    mode: str
    visible: Tuple[Tuple[str, ...], ...] = ()
    own: Tuple[Tuple[int, ...], ...] = ()
    ordinal: Tuple[int, ...] = ()
    used: Tuple[int, ...] = ()  # every device the workers see, in topology order
    memory_fraction: Optional[float] = None
    note: str = ""  # one line for the user: what was chosen and why

    def env(self, local_rank: int) -> Dict[str, str]:
        if not self.visible:
            return {}
        env = {contract.CUDA_VISIBLE_DEVICES: ",".join(self.visible[local_rank]),
               contract.CUDA_DEVICE_ORDER: PCI_BUS_ID,
               contract.CUDA_DEVICE: str(self.ordinal[local_rank])}
        if self.memory_fraction is not None:
            env[contract.GPU_MEMORY_FRACTION] = repr(self.memory_fraction)
        return env

    def local_env(self, nproc: int) -> Tuple[Mapping[str, str], ...]:
        """One environment per local rank, for launcher.workers.WorkerSpec.local_env."""
        return tuple(self.env(r) for r in range(nproc)) if self.visible else ()


def visible_devices(node: NodeGpus, visible: Optional[str]) -> Optional[Dict[int, str]]:
    """{index: the user's entry} for the devices CUDA_VISIBLE_DEVICES shows, in its order (all,
    by index, when unset); None when an entry is not a GPU index or UUID (MIG) and we must not
    touch it. As CUDA, entries after the first that names no device are ignored."""
    if visible is None:
        return {g.index: str(g.index) for g in node.gpus}
    shown: Dict[int, str] = {}
    for entry in (e.strip() for e in visible.split(",")):
        if entry.lstrip("-").isdigit():
            found = [g for g in node.gpus if g.index == int(entry)]
        elif entry.startswith("GPU-"):
            found = [g for g in node.gpus if g.uuid.startswith(entry)]
        elif entry.startswith("MIG-"):
            return None
        else:
            found = []
        if len(found) != 1 or found[0].index in shown:
            break
        shown[found[0].index] = entry
    return shown


def best_connected(node: NodeGpus, candidates: Sequence[int], k: int) -> Tuple[int, ...]:
    """k of the candidate indices whose worst link is best (ties: the lowest indices), in
    topology order (module docstring)."""
    pool = sorted(candidates)
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot choose {k} of {len(pool)} GPUs")
    if k <= 1:
        return tuple(pool[:k])
    levels = sorted({node.link(a, b) for a in pool for b in pool if a != b})
    for level in levels:
        chosen = _first_clique(pool, k, lambda a, b: node.link(a, b) <= level)
        if chosen is not None:
            return topology_order(node, chosen)
    raise AssertionError("unreachable: at the worst level every pair qualifies")


def _first_clique(pool, k, near) -> Optional[Tuple[int, ...]]:
    """The lexicographically first k members of pool that are all pairwise near."""
    def extend(chosen: Tuple[int, ...], start: int) -> Optional[Tuple[int, ...]]:
        if len(chosen) == k:
            return chosen
        for i in range(start, len(pool) - (k - len(chosen)) + 1):
            c = pool[i]
            if all(near(c, x) for x in chosen):
                found = extend(chosen + (c,), i + 1)
                if found is not None:
                    return found
        return None
    return extend((), 0)


def topology_order(node: NodeGpus, indices: Sequence[int]) -> Tuple[int, ...]:
    """From the lowest index, each next device the closest to the last (ties by index)."""
    left = sorted(indices)
    if not left:
        return ()
    order = [left.pop(0)]
    while left:
        nxt = min(left, key=lambda i: (node.link(order[-1], i), i))
        left.remove(nxt)
        order.append(nxt)
    return tuple(order)


def assign(node: NodeGpus, nproc: int, request: GpuRequest) -> DeviceAssignment:
    """Devices for this node's nproc workers (module docstring).

    Raises:
        DeviceError: the request cannot be met by this node (too few GPUs visible).
        UnhealthyGpus: it could, but too few of them are healthy.
    """
    mode = request.mode
    shown = visible_devices(node, request.visible)
    if mode == "none" or not node.gpus or not shown:
        why = ("--gpus-per-proc 0" if mode == "none" else
               "no GPU" if not node.gpus else
               f"CUDA_VISIBLE_DEVICES={request.visible} names MIG devices" if shown is None
               else f"CUDA_VISIBLE_DEVICES={request.visible!r} hides every GPU")
        return DeviceAssignment("none", note=f"GPUs ({node.source}): {why}; "
                                "CUDA_VISIBLE_DEVICES left as it is")
    by_index = {g.index: g for g in node.gpus}
    healthy = [i for i in shown if by_index[i].healthy]
    per_device = 1
    if mode == "shares":
        per_device = math.floor(1 / request.memory_fraction + _SHARE_EPSILON)
        need = math.ceil(nproc / per_device)
    elif mode == "own":
        need = nproc * request.gpus_per_proc
    else:
        need = min(nproc, len(shown))
    if need > len(shown):
        what = (f"--gpus-per-proc {request.gpus_per_proc} x {nproc} workers" if mode == "own"
                else f"{nproc} workers at --gpu-memory-fraction {request.memory_fraction:g} "
                     f"({per_device} per GPU)")
        raise DeviceError(f"{what} need {need} GPUs; this node shows {len(shown)} "
                          f"({_where(node, request)}); ask for fewer")
    if need > len(healthy) or not healthy:
        bad = "; ".join(f"GPU {i} ({by_index[i].uuid}): {', '.join(by_index[i].problems)}"
                        for i in shown if not by_index[i].healthy)
        raise UnhealthyGpus(f"unhealthy GPU ({node.source}): {bad}; the workers need "
                            f"{_count(need, 'healthy GPU')}, {len(healthy)} of the "
                            f"{len(shown)} here {'is' if len(healthy) == 1 else 'are'}, so "
                            "this node stays out of the job until the GPU is fixed (or "
                            "hidden with CUDA_VISIBLE_DEVICES)")
    oversubscribed = mode == "shared" and nproc > len(shown)
    if oversubscribed:
        need = len(healthy)  # more workers than GPUs: they share every healthy one, unlimited
    chosen = best_connected(node, healthy, need)
    if mode == "shared":
        # Everyone sees the chosen list; local rank r's own device is its r-th entry.
        own = tuple(() if oversubscribed else (chosen[r],) for r in range(nproc))
        visible = tuple(tuple(shown[i] for i in chosen) for _ in range(nproc))
        ordinal = tuple(r % len(chosen) for r in range(nproc))
    else:
        step = request.gpus_per_proc if mode == "own" else 1
        own = tuple(chosen[r * step:(r + 1) * step] if mode == "own"
                    else (chosen[r // per_device],) for r in range(nproc))
        visible = tuple(tuple(shown[i] for i in devices) for devices in own)
        ordinal = (0,) * nproc
    result = DeviceAssignment(mode, visible=visible, own=own, ordinal=ordinal, used=chosen,
                              memory_fraction=request.memory_fraction)
    return _with_note(result, node, nproc, shown)


def _where(node: NodeGpus, request: GpuRequest) -> str:
    if request.visible is not None:
        return f"CUDA_VISIBLE_DEVICES={request.visible}"
    return node.source


def _with_note(a: DeviceAssignment, node: NodeGpus, nproc: int,
               shown: Mapping[int, str]) -> DeviceAssignment:
    used = a.used
    groups = a.own if a.mode == "own" else (used,)  # own GPUs: what matters is within a worker's
    worst = max((node.link(x, y) for g in groups for x in g for y in g if x != y),
                default=INTERNAL)
    link = f", worst link {LINK_NAMES[worst]}" if worst != INTERNAL else ""
    unhealthy = [g for g in node.gpus if g.index in shown and not g.healthy]
    left_out = ("; left out as unhealthy: " + ", ".join(
        f"GPU {g.index} ({', '.join(g.problems)})" for g in unhealthy)) if unhealthy else ""
    if a.mode == "shared" and nproc > len(shown):
        what = (f"{nproc} workers share GPUs {_list(used)} (more workers than GPUs; "
                "--gpu-memory-fraction limits each)")
    elif a.mode == "shared":
        ranks = f"local ranks 0-{nproc - 1} on GPUs" if nproc > 1 else "local rank 0 on GPU"
        what = (f"{ranks} {_list(used)}{link}; every worker sees "
                f"CUDA_VISIBLE_DEVICES={','.join(a.visible[0])}, its own is cuda:LOCAL_RANK")
    elif a.mode == "own":
        what = ("each worker sees only its own GPUs (" + _per_rank(a) + f"){link}")
    else:
        what = (f"workers share GPUs at {a.memory_fraction:g} of a GPU's memory each ("
                + _per_rank(a) + ")")
    return replace(a, note=f"GPUs ({node.source}): {what}{left_out}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _per_rank(a: DeviceAssignment) -> str:
    return ", ".join(f"local rank {r}: {_list(own)}" for r, own in enumerate(a.own))


def _list(indices: Sequence[int]) -> str:
    return ",".join(str(i) for i in indices)


def memory_shares(assignment: DeviceAssignment) -> Dict[int, float]:
    """Per device index, the sum of the memory fractions of the workers on it (1.0 for a worker
    with a whole device): what `assign` keeps at or below 1."""
    totals: Dict[int, float] = {}
    share = assignment.memory_fraction if assignment.memory_fraction is not None else 1.0
    for own in assignment.own:
        for i in own:
            totals[i] = totals.get(i, 0.0) + share
    return totals

