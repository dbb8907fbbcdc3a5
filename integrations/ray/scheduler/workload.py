"""What is submitted to the scheduler, and what it tracks about admitted work.

Three kinds of workload, each a number of identical members of one `model.Shape`:

  gang       `size` members, all placed at once or none (a batch job, a rigid training job);
  elastic    an elastic training job: admitted at `min_size` members, grown into idle capacity up
             to `max_size`, shrunk (members released at a step boundary, nothing lost) to make room,
             never below `min_size` once admitted;
  inference  an endpoint's replicas: the serving layer says how many it wants (`max_size`, changed
             with `state.set_replicas`); admitted with at least `min_size` and grown to the ask.

A gang may require its members on one node (`same-node`) or in one zone (`same-zone`).
The priority class (inference > training > batch by default) follows the kind unless given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from .model import Binding, ModelError, Shape

GANG, ELASTIC, INFERENCE = "gang", "elastic", "inference"
KINDS = (GANG, ELASTIC, INFERENCE)
SAME_NODE, SAME_ZONE = "same-node", "same-zone"
DEFAULT_CLASS = {GANG: "batch", ELASTIC: "training", INFERENCE: "inference"}


class SubmissionError(ValueError):
    """A workload the scheduler refuses at submission; the message says what to change."""


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    shape: Shape
    min_size: int
    max_size: int
    queue: str = "default"
    priority_class: Optional[str] = None  # None: by kind (DEFAULT_CLASS)
    constraint: Optional[str] = None  # SAME_NODE | SAME_ZONE, gangs only
    # Elastic jobs: samples/s at 1..max_size members (measured throughputs); growth goes where
    # one more member adds the most. Empty: linear.
    throughput: Tuple[float, ...] = ()

    @classmethod
    def gang(cls, name: str, size: int, shape: Shape, **kw) -> "Workload":
        return cls(name, GANG, shape, size, size, **kw)

    @classmethod
    def elastic(cls, name: str, min_size: int, max_size: int, shape: Shape, **kw) -> "Workload":
        return cls(name, ELASTIC, shape, min_size, max_size, **kw)

    @classmethod
    def inference(cls, name: str, replicas: int, shape: Shape, min_replicas: int = 1, **kw) -> "Workload":
        return cls(name, INFERENCE, shape, min(min_replicas, replicas), replicas, **kw)

    @property
    def klass(self) -> str:
        return self.priority_class or DEFAULT_CLASS[self.kind]

    @property
    def resizable(self) -> bool:
        return self.kind != GANG

    def speed(self, members: int) -> float:
        """Throughput at `members` members (linear without measurements)."""
        if members <= 0:
            return 0.0
        if not self.throughput:
            return float(members)
        return self.throughput[min(members, len(self.throughput)) - 1]


def check(w: Workload) -> None:
    """The checks that need nothing but the workload itself."""
    where = f"workload {w.name!r}"
    if not w.name or "/" in w.name:
        raise SubmissionError(f"{where}: a name must be non-empty and without '/'")
    if w.kind not in KINDS:
        raise SubmissionError(f"{where}: kind must be one of {', '.join(KINDS)}, got {w.kind!r}")
    if w.min_size < 1 or w.max_size < 1:
        raise SubmissionError(f"{where}: sizes must be at least 1 (min {w.min_size}, max {w.max_size})")
    if w.min_size > w.max_size:
        raise SubmissionError(f"{where}: min size {w.min_size} is above max size {w.max_size}")
    if w.kind == GANG and w.min_size != w.max_size:
        raise SubmissionError(f"{where}: a gang has one size; use kind elastic for min..max")
    if w.constraint not in (None, SAME_NODE, SAME_ZONE):
        raise SubmissionError(f"{where}: constraint must be {SAME_NODE} or {SAME_ZONE}, "
                              f"got {w.constraint!r}")
    if w.constraint is not None and w.kind != GANG:
        raise SubmissionError(f"{where}: only gangs take a placement constraint")
    if w.throughput and (len(w.throughput) < w.max_size or any(t <= 0 for t in w.throughput)):
        raise SubmissionError(f"{where}: throughput needs a positive figure for each size "
                              f"1..{w.max_size}")
    try:
        Shape(**{k: getattr(w.shape, k) for k in w.shape.__dataclass_fields__})
    except ModelError as exc:
        raise SubmissionError(f"{where}: {exc}") from None
    if not (w.shape.cpu_milli or w.shape.memory_mib or w.shape.gpu_demand_milli):
        raise SubmissionError(f"{where}: a member must ask for some CPU, memory or GPU")


@dataclass(frozen=True)
class Member:
    """One placed member of an admitted workload."""

    id: str  # "<workload>/<n>", n counting up over the workload's life
    binding: Binding
    joined_at: float
    spot: bool = False

    @property
    def node(self) -> str:
        return self.binding.node


@dataclass(frozen=True)
class Admitted:
    workload: Workload
    flavor: str
    members: Tuple[Member, ...]  # in join order: the first holds rank 0
    admitted_at: float
    submitted_at: float = 0.0  # kept across preemptions: an evicted workload keeps its place
    ready: bool = False  # every member has started (Kueue's PodsReady)
    next_member: int = 0  # the number the next member's id takes
    requeues: int = 0  # how often it was requeued before this admission

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Pending:
    workload: Workload
    submitted_at: float
    requeues: int = 0
    retry_at: float = 0.0  # back-off after a requeue: not considered before this time
    last_reason: str = ""


@dataclass(frozen=True)
class Reservation:
    """Nodes held for the head gang that cannot fit yet: only it may be placed there."""

    workload: str
    nodes: Tuple[str, ...]
    since: float


@dataclass(frozen=True)
class NodeRequest:
    node_type: str
    count: int
    at: float
    names: Tuple[str, ...] = field(default=())
