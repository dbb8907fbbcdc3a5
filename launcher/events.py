"""What happens to a job, as typed events; the event log file is one listener of them.

Each event is a frozen dataclass naming its own fields. An agent's `EventBus` stamps it with the
time and the node and hands it to every listener: `EventLogFile` appends it to the job's
`events.jsonl`; metrics and the job client listen the same way.

A record in the file (one JSON object per line, appended by every agent of the job) has the keys
    time        unix seconds (float) when the agent emitted it
    event       the event's name (below)
    node        id of the agent's node
    round       round number the event belongs to, or null
    world_size  workers in that round, or null
    members     node ids of that round in rank order, or null
    cause       why it happened, or null (the README lists every value)
and then the event's own fields, those that are set.

Several agents on one host may share the file: each record is one write() on an O_APPEND
descriptor, which the kernel appends as a whole, so lines are never split or interleaved.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, List, Optional, Tuple

log = logging.getLogger(__name__)

_COMMON = ("round", "world_size", "members", "cause")


@dataclass(frozen=True)
class Event:
    """Fields every event has; a subclass names the event and adds its own."""

    name: ClassVar[str] = ""
    round: Optional[int] = None
    world_size: Optional[int] = None
    members: Optional[Tuple[str, ...]] = None
    cause: Optional[str] = None

    def extra(self) -> dict:
        """The event's own fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _COMMON and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Joined(Event):
    """This node registered (cause start, or prewarmed: its workers were started in standby)."""

    name: ClassVar[str] = "joined"


@dataclass(frozen=True)
class Rendezvous(Event):
    """The first round this node's workers run in."""

    name: ClassVar[str] = "rendezvous"
    in_place: Optional[bool] = None


@dataclass(frozen=True)
class Rescale(Event):
    """A later round reached this node's workers, duration_s after its cause."""

    name: ClassVar[str] = "rescale"
    duration_s: Optional[float] = None
    restart_count: Optional[int] = None
    in_place: Optional[bool] = None


@dataclass(frozen=True)
class Waiting(Event):
    """A round without this node: its workers stand by, or it has none."""

    name: ClassVar[str] = "waiting"


@dataclass(frozen=True)
class WorkerFailed(Event):
    """A worker exited non-zero (cause exit), or an in-place collective failed (collective)."""

    name: ClassVar[str] = "worker_failed"
    rank: Optional[int] = None
    exit_code: Optional[int] = None
    pid: Optional[int] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class WorkerHung(Event):
    """A worker made no progress for --hang-timeout; its stacks are dumped and it is killed."""

    name: ClassVar[str] = "worker_hung"
    local_rank: Optional[int] = None
    pid: Optional[int] = None
    idle_s: Optional[float] = None


@dataclass(frozen=True)
class NodeLeft(Event):
    """Nodes left: removed by the leader (nodes), or this node after a notice (outcome)."""

    name: ClassVar[str] = "node_left"
    nodes: Optional[Tuple[str, ...]] = None
    outcome: Optional[str] = None
    grace_s: Optional[float] = None


@dataclass(frozen=True)
class NodeExcluded(Event):
    """The leader cooled a node down after repeated failures, until `until`."""

    name: ClassVar[str] = "node_excluded"
    nodes: Optional[Tuple[str, ...]] = None
    until: Optional[float] = None
    exclusions: Optional[int] = None


@dataclass(frozen=True)
class PreemptionNotice(Event):
    """This node will be taken away (cause: the notice's source)."""

    name: ClassVar[str] = "preemption_notice"
    detail: Optional[str] = None
    grace_s: Optional[float] = None


@dataclass(frozen=True)
class EtcdUnreachable(Event):
    """etcd stopped answering (cause: the error); the workers train on."""

    name: ClassVar[str] = "etcd_unreachable"


@dataclass(frozen=True)
class EtcdReconnected(Event):
    """etcd answers again after duration_s."""

    name: ClassVar[str] = "etcd_reconnected"
    duration_s: Optional[float] = None


@dataclass(frozen=True)
class JobFinished(Event):
    name: ClassVar[str] = "job_finished"
    exit_code: Optional[int] = None


@dataclass(frozen=True)
class JobFailed(Event):
    name: ClassVar[str] = "job_failed"
    exit_code: Optional[int] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class Stamped:
    """An event as it happened: when, and on which node."""

    time: float
    node: str
    event: Event

    def to_dict(self) -> dict:
        e = self.event
        record = {"time": self.time, "event": e.name, "node": self.node, "round": e.round,
                  "world_size": e.world_size,
                  "members": list(e.members) if e.members is not None else None,
                  "cause": e.cause}
        record.update({k: list(v) if isinstance(v, tuple) else v for k, v in e.extra().items()})
        return record


Listener = Callable[[Stamped], None]


class EventBus:
    """Stamps this node's events and hands them to every listener, in order. A listener that
    raises is logged and skipped: an event must not take the agent down."""

    def __init__(self, node_id: str, clock: Callable[[], float] = time.time):
        self.node_id = node_id
        self._clock = clock
        self._listeners: List[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: Event) -> Stamped:
        stamped = Stamped(self._clock(), self.node_id, event)
        for listener in self._listeners:
            try:
                listener(stamped)
            except Exception:  # noqa: BLE001 (a listener's bug is not the job's)
                log.exception("event listener %r failed on %s", listener, event.name)
        return stamped


class EventLogFile:
    """The listener that appends every event to the job's events.jsonl."""

    def __init__(self, path: str):
        self.path = path
        # Fail at startup, not at the first event, if the file cannot be written.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    def __call__(self, stamped: Stamped) -> None:
        # default=str: an odd field value must not take the agent down with it.
        data = (json.dumps(stamped.to_dict(), default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)  # unbuffered: nothing is left to flush
            while written < len(data):  # only on a full disk or a signal; keep the rest
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)


class EtcdEventHistory:
    """The listener that keeps this node's events in etcd (the job's bounded history, which
    `status`, `events` and a dashboard read). Written in order on a thread of its own, so that
    an etcd that is slow or gone never holds up the agent; such an etcd loses events (the file
    log keeps them), never the job."""

    QUEUE_SIZE = 1000

    def __init__(self, store, node_id: str):
        self._store, self._node_id = store, node_id
        self._queue: "queue.Queue[Optional[Stamped]]" = queue.Queue(self.QUEUE_SIZE)
        self._warned = False
        self._thread = threading.Thread(target=self._write, name="event-history", daemon=True)
        self._thread.start()

    def __call__(self, stamped: Stamped) -> None:
        try:
            self._queue.put_nowait(stamped)
        except queue.Full:
            self._warn("too many events waiting for etcd")

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _write(self) -> None:
        seq = 0
        while True:
            stamped = self._queue.get()
            if stamped is None:
                return
            record = json.dumps(stamped.to_dict(), default=str)
            try:
                self._store.put_event(self._node_id, seq, record)
                seq += 1
            except Exception as exc:  # noqa: BLE001 (etcd down: the file log still has it)
                self._warn(str(exc))

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("could not keep an event in the job's history in etcd (%s); later ones "
                        "may be missing from it too", why)


def read_events(path: str) -> List[dict]:
    """All whole records in the file, oldest first; a trailing line still being written is skipped.

    Raises:
        FileNotFoundError: no event was ever logged at path.
        ValueError: a whole line is not JSON (the file is not an event log).
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the last piece has no newline yet
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not an event record: {exc}") from exc
    return records
