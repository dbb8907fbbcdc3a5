"""The rendezvous contract: settings, the records kept in etcd, and the errors a user can meet.

Everything here is plain data. The records serialise to JSON so that any agent (or an operator
with `etcdctl`) can read what the job looks like from etcd alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple


class RendezvousError(Exception):
    """Base class of every rendezvous error."""


class RendezvousConnectionError(RendezvousError):
    """etcd cannot be reached, or what answered is not etcd."""


class RendezvousTimeoutError(RendezvousError):
    """Fewer than min nodes joined within join_timeout."""


class RendezvousClosedError(RendezvousError):
    """The job has ended (succeeded or failed); no new round will be published."""


class RendezvousStateError(RendezvousError):
    """The state in etcd is not what this agent expected (for example a lost compare-and-swap)."""


class JobMismatchError(RendezvousStateError):
    """An agent was started with other job-wide settings than the job's first agent."""


@dataclass(frozen=True)
class RendezvousSettings:
    """How one job's membership behaves.

    join_timeout: how long the job may stay below min_nodes (at the start, or after nodes left)
        before it fails.
    last_call_timeout: once min_nodes are present, how long the leader waits for more before it
        publishes the first round (skipped when max_nodes are present).
    join_settle: joins that arrive within this window of the first waiting node are coalesced into
        one round, so that N nodes starting together cause one rescale, not N.
    lease_ttl: a node whose agent stops refreshing its lease for this long is removed.
    max_restarts: worker failures the job survives; membership changes do not count (exact rules
        in `rendezvous.decision`).
    blacklist_after: a node whose own workers failed this many times is cooled down (left out of
        new rounds); 0 turns blacklisting off.
    blacklist_cooldown: how long a node's first cooldown lasts; each later one lasts twice as
        long as the one before, up to blacklist_max_cooldown.
    """

    run_id: str
    min_nodes: int = 1
    max_nodes: int = 1
    join_timeout: float = 600.0
    last_call_timeout: float = 3.0
    join_settle: float = 0.2
    lease_ttl: float = 10.0
    max_restarts: int = 0
    blacklist_after: int = 2
    blacklist_cooldown: float = 60.0
    blacklist_max_cooldown: float = 3600.0

    def __post_init__(self) -> None:
        if not self.run_id or "/" in self.run_id:
            raise ValueError(f"run id {self.run_id!r} must be non-empty and contain no '/'")
        if self.min_nodes < 1:
            raise ValueError(f"min nodes must be at least 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ValueError(
                f"max nodes ({self.max_nodes}) is below min nodes ({self.min_nodes}); "
                "write --nnodes MIN:MAX with MIN <= MAX"
            )
        for name in ("join_timeout", "last_call_timeout", "join_settle"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lease_ttl < 1:
            raise ValueError(f"lease_ttl must be at least 1 second, got {self.lease_ttl}")
        if self.max_restarts < 0:
            raise ValueError(f"max restarts must not be negative, got {self.max_restarts}")
        if self.blacklist_after < 0:
            raise ValueError(f"blacklist_after must not be negative (0 turns blacklisting off), "
                             f"got {self.blacklist_after}")
        if self.blacklist_cooldown < 0:
            raise ValueError(
                f"blacklist_cooldown must not be negative, got {self.blacklist_cooldown}")
        if self.blacklist_max_cooldown < self.blacklist_cooldown:
            raise ValueError(
                f"blacklist_max_cooldown ({self.blacklist_max_cooldown:g}s) is below "
                f"blacklist_cooldown ({self.blacklist_cooldown:g}s)"
            )


def _plain(obj: Any) -> Any:
    """What dataclasses.asdict returns for our records, without its deep copies (a round of
    1,000 members is written in 2 ms instead of 12)."""
    if type(obj) in _SCALARS:
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return {name: _plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (dict, Mapping)):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _dumps(obj) -> str:
    return json.dumps(_plain(obj), sort_keys=True)


@dataclass(frozen=True)
class NodeInfo:
    """One agent's registration, kept under its lease at nodes/<node_id>."""

    node_id: str
    host: str
    nproc: int
    health_addr: str
    lease_id: int
    joined_at: float
    # --node-rank: nodes waiting for a round are ranked by it (lowest first), then by join order;
    # so in a job started with every node's rank, node rank 0 holds global rank 0, as in torchrun.
    rank_hint: Optional[int] = None
    # --node-label key=value; well-known keys: capacity-type (spot | on-demand) and zone
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))

    @property
    def spot(self) -> bool:
        return self.labels.get(CAPACITY_TYPE) == "spot"

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "NodeInfo":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in _NODE_FIELDS})


_NODE_FIELDS = {"node_id", "host", "nproc", "health_addr", "lease_id", "joined_at", "rank_hint",
                "labels"}
CAPACITY_TYPE, ZONE = "capacity-type", "zone"
DEFAULT_RETENTION_S = 86400.0
SPEC_VERSION = 1


@dataclass(frozen=True)
class JobSpec:
    """A job as its first agent created it, at spec; controllers change only `desired`.

    desired: the size the job should have, within min..max (None: max, which is what a job does
        when nobody resizes it). agreed: settings every agent of the job must share (workers per
        node, backend, batch policy); an agent started with others is refused. retention_s: how
        long the job's keys are kept once it ended.
    """

    min_nodes: int
    max_nodes: int
    created_at: float
    desired: Optional[int] = None
    agreed: Mapping[str, Any] = field(default_factory=dict)
    retention_s: float = DEFAULT_RETENTION_S
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "agreed", dict(self.agreed))
        if self.desired is not None and not self.min_nodes <= self.desired <= self.max_nodes:
            raise ValueError(f"desired size {self.desired} is outside {self.min_nodes}.."
                             f"{self.max_nodes}")

    @property
    def target(self) -> int:
        """The size the leader aims for: desired, or max."""
        return self.max_nodes if self.desired is None else self.desired

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "JobSpec":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Release:
    """A controller's request that a node leave the job (release/<node_id>)."""

    reason: str = ""
    time: float = 0.0

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "Release":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class StopRequest:
    """A controller's request that the job stop: commit, checkpoint, end (stop)."""

    reason: str = ""
    time: float = 0.0

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "StopRequest":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Member:
    """A node's place in a round."""

    node_id: str
    host: str
    nproc: int


@dataclass(frozen=True)
class BlacklistEntry:
    """A node's record of worker failures, kept in the Round so that it outlives the leader.

    strikes: failures attributed to the node since its last cooldown began.
    excluded_until: when its latest cooldown ends (0.0: never cooled down).
    exclusions: how many cooldowns it has served; the next one lasts twice as long.
    """

    node_id: str
    strikes: int = 0
    excluded_until: float = 0.0
    exclusions: int = 0


@dataclass(frozen=True)
class Round:
    """One generation of the job, published by the leader at `round`.

    members are in rank order: survivors keep their order, newcomers are appended. A round with
    active=False means the job is waiting for nodes (below min): members run no workers.
    cause names what made the leader publish it; cause_time is when the leader observed it, so
    agents can report how long the rescale took. blacklist holds the strike records of nodes
    whose workers failed (see `rendezvous.blacklist`), sorted by node id; every round carries it
    over from the one before.
    """

    number: int
    members: Tuple[Member, ...]
    active: bool = True
    restart_count: int = 0
    cause: str = "start"
    cause_time: float = 0.0
    blacklist: Tuple[BlacklistEntry, ...] = ()

    @property
    def node_ids(self) -> Tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    @property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members) if self.active else 0

    def group_rank(self, node_id: str) -> Optional[int]:
        ids = self.node_ids
        return ids.index(node_id) if node_id in ids else None

    def rank_offset(self, node_id: str) -> int:
        """Global rank of the node's local rank 0."""
        offset = 0
        for m in self.members:
            if m.node_id == node_id:
                return offset
            offset += m.nproc
        raise KeyError(node_id)

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "Round":
        data = json.loads(text)
        data["members"] = tuple(Member(**m) for m in data["members"])
        # Rounds written before blacklisting existed have no such field.
        data["blacklist"] = tuple(BlacklistEntry(**e) for e in data.get("blacklist", ()))
        return cls(**data)


@dataclass(frozen=True)
class JobOutcome:
    """The terminal state, written once at `state`; no round follows it."""

    status: str  # "succeeded", "failed" or "stopped"
    reason: str = ""
    node_id: str = ""
    exit_code: int = 0
    details: dict = field(default_factory=dict)
    time: float = 0.0  # when it was written

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, text) -> "JobOutcome":
        return cls(**json.loads(text))
