"""The job client: see and change running jobs from outside (`python -m elastic.job`, the
autoscaler, a dashboard). It speaks only to etcd and imports no torch; the agents react to what
it writes, through their watches.

- `jobs()`, `status(job)` (a typed `JobStatus` with a versioned JSON form, `STATUS_SCHEMA`),
  `events(job)` (the job's history, every node's last events), `watch(job)` (typed changes, in
  order).
- `resize(job, nodes)`: the desired size, within min..max. `release(job, node_ids, reason)`: those
  nodes leave and the desired size drops by the active ones among them. `stop(job, reason)`:
  workers commit, node-local rank 0 checkpoints, the job ends as stopped.
Every write is a transaction that checks the revision it decided on, so two controllers never
undo each other; bad input raises a `JobError` before anything is written.
Finished jobs' records are deleted once they are older than their retention (by `jobs()`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .api import (JobOutcome, JobSpec, NodeInfo, Release, RendezvousError, Round, StopRequest)
from .connect import EtcdSecurity, connect
from .liveness import probe
from .store import PREFIX, EtcdStore, Snapshot, read_jobs

STATUS_SCHEMA = "elastic-run.job-status/1"
WRITE_ATTEMPTS = 5  # a write that lost to a concurrent change is decided again this often
RECENT_EVENTS = 20

LEAVE_IN_PLACE = "at the next step boundary; no committed step is lost"
LEAVE_HOROVOD = "at the next hvd.elastic commit; no committed step is lost"
LEAVE_RESTART = ("workers get SIGTERM; the steps since the script's last checkpoint are trained "
                 "again")


class JobError(RendezvousError):
    """A request the job cannot take (unknown job or node, a size outside min..max, an ended
    job); nothing was written. The message says what to do."""


class UnknownJobError(JobError):
    pass


class UnknownNodeError(JobError):
    pass


class InvalidSizeError(JobError):
    pass


class JobEndedError(JobError):
    pass


class ConflictError(JobError):
    """Others kept changing the job while this request was being decided."""


@dataclass(frozen=True)
class NodeStatus:
    """One registered node. state: active (in the current round), spare (registered, waiting:
    pre-warmed when the job runs in place), or released (asked to leave)."""

    node_id: str
    host: str
    slots: int
    labels: Dict[str, str]
    joined_at: float
    state: str
    health: str = "unknown"  # alive | dead | suspect | unknown (not probed)
    rank_offset: Optional[int] = None
    health_addr: str = ""  # host:port of its agent's health server (GET /health, /metrics)


@dataclass(frozen=True)
class RoundStatus:
    number: int
    world_size: int
    members: Tuple[str, ...]
    cause: str
    restart_count: int
    active: bool


@dataclass(frozen=True)
class JobStatus:
    """A job as etcd holds it at one revision, for people and programs (`to_json`)."""

    job: str
    endpoint: str
    revision: int
    spec: JobSpec
    round: Optional[RoundStatus]
    nodes: Tuple[NodeStatus, ...]
    events: Tuple[dict, ...]
    outcome: Optional[JobOutcome]
    stop_requested: bool
    leaving_costs: str  # what a release or a resize down costs this job's workers

    @property
    def state(self) -> str:
        if self.outcome is not None:
            return self.outcome.status
        if self.stop_requested:
            return "stopping"
        if self.round is None or not self.round.active:
            return "waiting"
        return "running"

    def to_json(self) -> dict:
        """The documented JSON form (README, "Controlling a running job")."""
        spec = self.spec
        return {
            "schema": STATUS_SCHEMA, "job": self.job, "endpoint": self.endpoint,
            "revision": self.revision, "state": self.state,
            "spec": {"min_nodes": spec.min_nodes, "max_nodes": spec.max_nodes,
                     "desired": spec.target, "desired_set": spec.desired is not None,
                     "created_at": spec.created_at, "retention_s": spec.retention_s,
                     **{k: v for k, v in spec.agreed.items()}},
            "round": asdict(self.round) if self.round else None,
            "nodes": [asdict(n) for n in self.nodes],
            "leaving_costs": self.leaving_costs,
            "events": list(self.events),
            "outcome": asdict(self.outcome) if self.outcome else None,
        }


# -- changes, as watch(job) reports them ---------------------------------------------------------
@dataclass(frozen=True)
class RoundPublished:
    round: Round


@dataclass(frozen=True)
class NodeJoined:
    node: NodeInfo


@dataclass(frozen=True)
class NodeLeft:
    node_id: str


@dataclass(frozen=True)
class SpecChanged:
    spec: JobSpec


@dataclass(frozen=True)
class NodeReleased:
    node_id: str
    release: Release


@dataclass(frozen=True)
class StopRequested:
    request: StopRequest


@dataclass(frozen=True)
class JobEnded:
    outcome: JobOutcome


Change = Union[RoundPublished, NodeJoined, NodeLeft, SpecChanged, NodeReleased, StopRequested,
               JobEnded]


class JobWatch:
    """Changes of one job in the order etcd made them; iterate, and `cancel()` (or leave the
    `with` block) when done. Iteration ends after the job ended, or when cancelled."""

    def __init__(self, client, root: str):
        self._root = root
        self._events, self._cancel = client.watch_prefix(root)

    def __iter__(self) -> Iterator[Change]:
        for event in self._events:
            change = self._change(event)
            if change is not None:
                yield change
                if isinstance(change, JobEnded):
                    return

    def _change(self, event) -> Optional[Change]:
        key = event.key.decode()[len(self._root):]
        kind, _, rest = key.partition("/")
        deleted = type(event).__name__ == "DeleteEvent"
        if kind == "round" and not deleted:
            return RoundPublished(Round.from_json(event.value))
        if kind == "nodes" and not rest.count("/"):
            if deleted:
                return NodeLeft(rest)
            if event.create_revision == event.mod_revision:
                return NodeJoined(NodeInfo.from_json(event.value))
            return None
        if kind == "spec" and not deleted:
            return SpecChanged(JobSpec.from_json(event.value))
        if kind == "release" and not deleted:
            return NodeReleased(rest, Release.from_json(event.value))
        if kind == "stop" and not deleted:
            return StopRequested(StopRequest.from_json(event.value))
        if kind == "state" and not deleted:
            return JobEnded(JobOutcome.from_json(event.value))
        return None

    def cancel(self) -> None:
        self._cancel()

    def __enter__(self) -> "JobWatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()


class JobClient:
    """One etcd's jobs. Raises RendezvousConnectionError when etcd cannot be reached (or refuses
    the credentials), JobError for a request the job cannot take."""

    def __init__(self, endpoint: str, timeout: float = 5.0,
                 security: Optional[EtcdSecurity] = None, clock=time.time):
        self.endpoint = endpoint
        self._timeout, self._security, self._clock = timeout, security, clock
        self._client = connect(endpoint, timeout=timeout, security=security)
        self._stores: Dict[str, EtcdStore] = {}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "JobClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _store(self, job: str) -> EtcdStore:
        if job not in self._stores:
            self._stores[job] = EtcdStore.attach(self._client, self.endpoint, job,
                                                 security=self._security)
        return self._stores[job]

    # -- reading ---------------------------------------------------------------------------
    def jobs(self) -> List[str]:
        """The ids of the jobs in this etcd, oldest first; finished jobs past their retention
        are deleted on the way."""
        found = []
        base = f"{PREFIX}/"
        for _, meta in self._client.get_prefix(base, keys_only=True):
            rel = meta.key.decode()[len(base):]
            job, _, rest = rel.partition("/")
            if rest == "spec":
                found.append(job)
        alive = []
        for job in found:
            snap = self._store(job).snapshot()
            if snap.spec is None:
                continue
            if self._expired(snap):
                self._store(job).delete_job()
                continue
            alive.append((snap.spec.created_at, job))
        return [job for _, job in sorted(alive)]

    def statuses(self, clean: bool = True) -> List[JobStatus]:
        """Every job's status (no probes, no events) from one read of etcd, oldest first;
        finished jobs past their retention are deleted (clean=False: left out)."""
        found = []
        for job, snap in read_jobs(self._client).items():
            if snap.spec is None:
                continue
            if self._expired(snap):
                if clean:
                    self._store(job).delete_job()
                continue
            found.append((snap.spec.created_at, job, snap))
        return [self._status(job, snap, False, 0) for _, job, snap in sorted(found)]

    def _expired(self, snap: Snapshot) -> bool:
        """A finished job with no node left, past its retention."""
        return bool(snap.outcome is not None and not snap.nodes and snap.outcome.time
                    and self._clock() > snap.outcome.time + snap.spec.retention_s)

    def _snapshot(self, job: str) -> Snapshot:
        snap = self._store(job).snapshot()
        if snap.spec is None:
            known = ", ".join(self.jobs()) or "none"
            raise UnknownJobError(f"no job {job!r} at etcd {self.endpoint} (jobs there: {known})")
        return snap

    def status(self, job: str, probe: bool = True, recent: int = RECENT_EVENTS) -> JobStatus:
        """Where `job` stands. probe: ask each node's health endpoint (1 s at most each)."""
        return self._status(job, self._snapshot(job), probe, recent)

    def _status(self, job: str, snap: Snapshot, probe: bool, recent: int) -> JobStatus:
        rnd = snap.round
        offsets = {}
        if rnd is not None and rnd.active:
            offsets = {m.node_id: rnd.rank_offset(m.node_id) for m in rnd.members}
        nodes = []
        for nid, info in sorted(snap.nodes.items(), key=lambda kv: (kv[0] not in offsets,
                                                                    offsets.get(kv[0], 0),
                                                                    kv[1].joined_at)):
            state = ("released" if nid in snap.released else
                     "active" if nid in offsets else "spare")
            nodes.append(NodeStatus(
                node_id=nid, host=info.host, slots=info.nproc, labels=dict(info.labels),
                joined_at=info.joined_at, state=state,
                health=_health(info) if probe else "unknown", rank_offset=offsets.get(nid),
                health_addr=info.health_addr))
        events = tuple(self._store(job).events()[-recent:]) if recent else ()
        round_status = None
        if rnd is not None:
            round_status = RoundStatus(rnd.number, rnd.world_size, tuple(rnd.node_ids),
                                       rnd.cause, rnd.restart_count, rnd.active)
        return JobStatus(job=job, endpoint=self.endpoint, revision=snap.spec_revision,
                         spec=snap.spec, round=round_status, nodes=tuple(nodes), events=events,
                         outcome=snap.outcome, stop_requested=snap.stop is not None,
                         leaving_costs=self._leaving_costs(job, snap))

    def _leaving_costs(self, job: str, snap: Snapshot) -> str:
        if snap.spec.agreed.get("backend") == "horovod":
            elastic = self._store(job).ext_get("horovod", "elastic") is not None
            return LEAVE_HOROVOD if elastic else LEAVE_RESTART
        return LEAVE_IN_PLACE if snap.in_place else LEAVE_RESTART

    def events(self, job: str) -> List[dict]:
        self._snapshot(job)
        return self._store(job).events()

    def watch(self, job: str) -> JobWatch:
        """The job's changes from now on (RoundPublished, NodeJoined, ...), in order."""
        return JobWatch(self._client, f"{PREFIX}/{job}/")

    # -- changing --------------------------------------------------------------------------
    def _change(self, job: str, decide) -> JobSpec:
        """Read the job, let decide(snap) return (new spec, releases), and write them only if
        the spec did not change meanwhile; decide again if it did."""
        for _ in range(WRITE_ATTEMPTS):
            snap = self._snapshot(job)
            if snap.outcome is not None:
                raise JobEndedError(f"job {job!r} has ended ({snap.outcome.status}); there is "
                                    "nothing to change")
            if snap.stop is not None:
                raise JobEndedError(f"job {job!r} is stopping; there is nothing to change")
            spec, releases = decide(snap)
            if self._store(job).change_spec(spec, snap.spec_revision, releases):
                return spec
        raise ConflictError(f"job {job!r} kept changing while this request was decided; try "
                            "again")

    def resize(self, job: str, nodes: int) -> JobSpec:
        """Set the job's desired size (within its min..max): it grows into spares and waiting
        nodes, or leaves nodes out (they stay as spares; see rendezvous.decision)."""
        def decide(snap: Snapshot):
            spec = snap.spec
            if not spec.min_nodes <= nodes <= spec.max_nodes:
                raise InvalidSizeError(f"{nodes} nodes is outside job {job!r}'s "
                                       f"{spec.min_nodes}..{spec.max_nodes} (its --nnodes)")
            return replace(spec, desired=nodes), {}
        return self._change(job, decide)

    def release(self, job: str, node_ids: Sequence[str], reason: str = "") -> JobSpec:
        """Ask these nodes to leave; the desired size drops by the active ones among them, so
        no spare takes their place unless asked."""
        node_ids = list(dict.fromkeys(node_ids))
        if not node_ids:
            raise UnknownNodeError("name the nodes to release (their ids: see `status`)")

        def decide(snap: Snapshot):
            missing = [n for n in node_ids if n not in snap.nodes]
            if missing:
                raise UnknownNodeError(
                    f"job {job!r} has no node {', '.join(missing)} (its nodes: "
                    f"{', '.join(sorted(snap.nodes)) or 'none'})")
            active = snap.round.node_ids if snap.round and snap.round.active else ()
            leaving = sum(1 for n in node_ids if n in active and n not in snap.released)
            spec = snap.spec
            now = self._clock()
            releases = {n: Release(reason=reason, time=now) for n in node_ids}
            if not leaving:  # only spares: the size stays
                return spec, releases
            # From the size the job has (it may be below its target), so that no spare or
            # waiting node is admitted in their place.
            desired = min(spec.target, len(active)) - leaving
            if desired < spec.min_nodes:
                raise InvalidSizeError(
                    f"releasing {leaving} active node(s) would take job {job!r} to {desired}, "
                    f"below its minimum of {spec.min_nodes}; release fewer, or stop the job")
            return replace(spec, desired=desired), releases
        return self._change(job, decide)

    def stop(self, job: str, reason: str = "") -> None:
        """End the job: workers commit at the next boundary, node-local rank 0 checkpoints,
        the outcome is `stopped` and every agent exits 0."""
        snap = self._snapshot(job)
        if snap.outcome is not None:
            raise JobEndedError(f"job {job!r} has ended ({snap.outcome.status}) already")
        self._store(job).request_stop(StopRequest(reason=reason, time=self._clock()))


def _health(info: NodeInfo) -> str:
    return probe(info.health_addr, info.node_id)
