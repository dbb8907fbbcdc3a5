"""What one `step` decides: typed, frozen, each with a reason a person can read.

The caller (the Ray binding, or the simulator through `state.apply`) carries them out in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple, Union

from .workload import Member


@dataclass(frozen=True)
class Admit:
    """Start the workload with these members (all of a gang's; an elastic job's or an endpoint's
    first ones)."""

    workload: str
    flavor: str
    members: Tuple[Member, ...]
    reason: str


@dataclass(frozen=True)
class Resize:
    """Grow an admitted elastic job or endpoint: these members join."""

    workload: str
    added: Tuple[Member, ...]
    size: int  # members after the change
    reason: str


@dataclass(frozen=True)
class Release:
    """Shrink an admitted elastic job or endpoint: these members leave (chosen by the victim
    rule: never rank 0's, spot first, newest first). Elastic training loses nothing: they leave
    at a step boundary."""

    workload: str
    members: Tuple[str, ...]  # member ids
    size: int
    reason: str


@dataclass(frozen=True)
class Preempt:
    """Evict a whole admitted workload; it goes back to its queue (keeping its place)."""

    workload: str
    reason: str


@dataclass(frozen=True)
class Requeue:
    """An admitted workload whose members did not all start in time: evicted and back in its
    queue after a back-off (deactivated past the requeue limit)."""

    workload: str
    retry_at: float
    deactivate: bool
    reason: str


@dataclass(frozen=True)
class Reserve:
    """Hold these nodes for the head workload that cannot fit yet: nothing else starts there
    (backfill goes around them), so what runs there now ends and the head fits."""

    workload: str
    nodes: Tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Unreserve:
    workload: str
    reason: str


@dataclass(frozen=True)
class RequestNodes:
    """Ask the cloud for nodes of a configured type."""

    node_type: str
    count: int
    reason: str


@dataclass(frozen=True)
class ReleaseNodes:
    """Give back added nodes idle past the timeout (spot first)."""

    nodes: Tuple[str, ...]
    reason: str


Decision = Union[Admit, Resize, Release, Preempt, Requeue, Reserve, Unreserve, RequestNodes,
                 ReleaseNodes]


@dataclass(frozen=True)
class Step:
    decisions: Tuple[Decision, ...]
    reasons: Mapping[str, str]  # every pending workload -> why it waits
    now: float

    def of(self, kind) -> Tuple[Decision, ...]:
        return tuple(d for d in self.decisions if isinstance(d, kind))
