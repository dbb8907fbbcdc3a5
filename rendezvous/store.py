"""The etcd v3 adapter: one job's keys under /elastic/<run_id>/, read and written atomically.

Layout (all values JSON unless noted):
    spec                 JobSpec, written by the first agent; controllers change only `desired`
    nodes/<node_id>      NodeInfo, bound to the node's lease
    leader               node id (text), bound to the leader's lease
    round                the current Round, only ever replaced by the leader with a compare-and-swap
    master/<round>       "host:port" of the round's rank-0 store, written by the rank-0 agent
    failures/<round>/<node_id>   FailureReport of a node whose workers failed in that round
    state                JobOutcome, written once when the job ends
    inplace              "1" once some node's workers use the in-place API (newcomers pre-warm)
    release/<node_id>    Release: a controller asked this node to leave
    stop                 StopRequest: a controller asked the job to stop
    ext/<name>/...       keys of an extension (integrations.horovod keeps its gloo rendezvous
                         there); never read by snapshot(), never waking watch()

The job's event history is kept beside, at /elastic-events/<run_id>/<node_id>/<seq> (the last
EVENTS_KEPT of every node), so that reading the job does not read its history.

Reading the job costs O(changes), not O(nodes): once `watch()` runs, the store keeps a mirror of
the job's keys (one read, then the watch's events applied in revision order) and `snapshot()`
answers from memory. A store reads its own writes without reading: a put's revision is
remembered and the next snapshot() waits (at most CATCH_UP_S) for the watch to bring it. It reads
the whole job again only after a delete or a compare-and-swap that lost (rare: a dead peer's
lease revoked, a release cleared), when the watch broke (until `rewatch()`) or fell behind; and
every CONFIRM_S at rest it makes two small reads (the round key; the number of registered
nodes), which notice an etcd out of reach or a silently stalled watch, the leader's too. So a
membership change costs each agent no request but the ones it writes, and an agent that starts
watching before it joins reads the job once (see `abandoned()`), however large it is.

`JobStore` is what the agent and membership need; `EtcdStore` implements it (contract tests
against a real etcd in tests/integration/test_store.py). Every client-library error becomes a
RendezvousConnectionError here (`raise ... from`).
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from pyetcd.events import DeleteEvent

from .api import (JobOutcome, JobSpec, NodeInfo, Release, RendezvousConnectionError, Round,
                  StopRequest)
from .connect import EtcdSecurity, connect, describe, is_auth_error, renew_token
from .decision import FailureReport

log = logging.getLogger(__name__)

PREFIX = "/elastic"
EVENTS_PREFIX = "/elastic-events"
EVENTS_KEPT = 200  # per node
CONFIRM_S = 2.0  # at rest, a mirrored snapshot is checked against etcd this often (2 reads)
CATCH_UP_S = 1.0  # how long a snapshot waits for the watch to bring this store's own write


@dataclass(frozen=True)
class Snapshot:
    """Everything about one job, read in a single request (one etcd revision)."""

    nodes: Dict[str, NodeInfo]
    leader: Optional[str]
    round: Optional[Round]
    round_revision: int
    masters: Dict[int, str]
    failures: Dict[int, Tuple[FailureReport, ...]]
    outcome: Optional[JobOutcome]
    spec: Optional[JobSpec]
    in_place: bool = False
    spec_revision: int = 0
    released: Dict[str, Release] = field(default_factory=dict)
    stop: Optional[StopRequest] = None

    def failures_for(self, number: int) -> Tuple[FailureReport, ...]:
        return self.failures.get(number, ())


@runtime_checkable
class JobStore(Protocol):
    """One job's state, as the agent and its membership read and change it."""

    endpoint: str
    run_id: str

    def grant_lease(self, ttl: float) -> int: ...
    def refresh_lease(self, lease_id: int) -> bool: ...
    def revoke_lease(self, lease_id: int) -> None: ...
    def ensure_spec(self, spec: JobSpec) -> JobSpec: ...
    def abandoned(self) -> bool: ...
    def register(self, node: NodeInfo) -> None: ...
    def campaign(self, node_id: str, lease_id: int) -> bool: ...
    def publish_round(self, rnd: Round, expected_revision: int, leader_id: str) -> bool: ...
    def put_master(self, number: int, addr: str) -> None: ...
    def report_failure(self, number: int, report: FailureReport) -> None: ...
    def set_outcome(self, outcome: JobOutcome) -> JobOutcome: ...
    def mark_in_place(self) -> None: ...
    def clear_release(self, node_id: str) -> None: ...
    def put_event(self, node_id: str, seq: int, record: str) -> None: ...
    def delete_job(self) -> None: ...
    def snapshot(self) -> Snapshot: ...
    def watch(self, callback: Callable[[], None]) -> None: ...
    def rewatch(self, callback: Callable[[], None]) -> None: ...
    def close(self) -> None: ...


def _converted(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                # etcd's auth tokens expire (5 minutes by default): log in again, once.
                if is_auth_error(exc) and renew_token(self._client, self._security):
                    return method(self, *args, **kwargs)
                raise
        except RendezvousConnectionError:
            raise
        except Exception as exc:  # grpc and pyetcd raise many unrelated types
            if type(exc).__module__.split(".")[0] not in ("grpc", "pyetcd", "google"):
                raise
            raise RendezvousConnectionError(
                f"etcd at {self.endpoint} failed during {method.__name__}: {describe(exc)}"
            ) from exc
    return wrapper


def _writes(method):
    """A write to the job's keys whose revision is not known (a delete, a compare-and-swap that
    may lose): this store's next snapshot() reads etcd (read your writes)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._dirty = True
        try:
            return method(self, *args, **kwargs)
        finally:
            # Again once it is done: a read on another thread may have cleared the flag in
            # between, without seeing this write.
            self._dirty = True
    return wrapper


def _parse(rel: List[str], value: bytes):
    """The record stored at a job-relative key (split at "/"); None for keys snapshot() skips."""
    kind = rel[0]
    if kind == "nodes":
        return NodeInfo.from_json(value)
    if kind == "leader":
        return value.decode()
    if kind == "round":
        return Round.from_json(value)
    if kind == "master":
        return value.decode()
    if kind == "failures":
        return FailureReport(**json.loads(value))
    if kind == "state":
        return JobOutcome.from_json(value)
    if kind == "spec":
        return JobSpec.from_json(value)
    if kind == "inplace":
        return True
    if kind == "release":
        return Release.from_json(value)
    if kind == "stop":
        return StopRequest.from_json(value)
    return None


def _assemble(entries, nodes: Dict[str, NodeInfo]) -> Snapshot:
    """A Snapshot of the nodes and the other parsed entries: (rel key parts, record, mod
    revision) each."""
    masters, failures, released = {}, {}, {}
    leader = rnd = outcome = spec = stop = None
    revision, in_place, spec_revision = 0, False, 0
    for rel, record, mod_revision in entries:
        kind = rel[0]
        if kind == "nodes":
            nodes[rel[1]] = record
        elif kind == "leader":
            leader = record
        elif kind == "round":
            rnd, revision = record, mod_revision
        elif kind == "master":
            masters[int(rel[1])] = record
        elif kind == "failures":
            failures.setdefault(int(rel[1]), []).append(record)
        elif kind == "state":
            outcome = record
        elif kind == "spec":
            spec, spec_revision = record, mod_revision
        elif kind == "inplace":
            in_place = True
        elif kind == "release":
            released[rel[1]] = record
        elif kind == "stop":
            stop = record
    return Snapshot(
        nodes=nodes, leader=leader, round=rnd, round_revision=revision, masters=masters,
        failures={k: tuple(v) for k, v in failures.items()}, outcome=outcome, spec=spec,
        in_place=in_place, spec_revision=spec_revision, released=released, stop=stop,
    )


def read_jobs(client) -> Dict[str, Snapshot]:
    """Every job's Snapshot from one read of the whole prefix (a reader of many jobs: the job
    client's list, a dashboard), by job id."""
    base = f"{PREFIX}/"
    entries: Dict[str, list] = {}
    nodes: Dict[str, Dict[str, NodeInfo]] = {}
    for value, meta in client.get_prefix(base):
        job, *rel = meta.key.decode()[len(base):].split("/")
        if not rel or rel[0] == "ext":
            continue
        record = _parse(rel, value)
        if record is None:
            continue
        if rel[0] == "nodes":
            nodes.setdefault(job, {})[rel[1]] = record
        else:
            entries.setdefault(job, []).append((rel, record, meta.mod_revision))
    return {job: _assemble(entries.get(job, ()), nodes.get(job, {}))
            for job in set(entries) | set(nodes)}


class _Mirror:
    """The job's keys (extensions' aside) as of `revision`, parsed; rebuilt into a Snapshot
    only after a change, the nodes (the one part that grows with the job) copied, not parsed."""

    def __init__(self, root: str, kvs, revision: int) -> None:
        self._root = root
        self._read_at = self.revision = revision
        self._nodes: Dict[str, NodeInfo] = {}
        self._entries: Dict[str, tuple] = {}  # every other key: (rel parts, record, revision)
        for kv in kvs:
            self._put(kv.key.decode(), kv.value, kv.mod_revision)
        self._built: Optional[Snapshot] = None

    def _put(self, key: str, value: bytes, mod_revision: int) -> None:
        rel = key[len(self._root):].split("/")
        record = _parse(rel, value)
        if record is None:
            return
        if rel[0] == "nodes":
            self._nodes[rel[1]] = record
        else:
            self._entries[key] = (rel, record, mod_revision)

    def _delete(self, key: str) -> None:
        rel = key[len(self._root):].split("/")
        if rel[0] == "nodes" and len(rel) > 1:
            self._nodes.pop(rel[1], None)
        else:
            self._entries.pop(key, None)

    def apply(self, events) -> bool:
        """Apply a watch response's events in order; True if a job key changed."""
        changed = False
        for event in events:
            # One revision can hold several events (a revoked lease deletes all its keys).
            if event.mod_revision <= self._read_at:
                continue  # already in the read this mirror started from
            key = event.key.decode()
            if key[len(self._root):].startswith("ext/"):
                continue
            if isinstance(event, DeleteEvent):
                self._delete(key)
            else:
                self._put(key, event.value, event.mod_revision)
            self.revision = max(self.revision, event.mod_revision)
            changed = True
        if changed:
            self._built = None
        return changed

    def round_revision(self) -> int:
        entry = self._entries.get(self._root + "round")
        return entry[2] if entry else 0

    def node_count(self) -> int:
        return len(self._nodes)

    def snapshot(self) -> Snapshot:
        if self._built is None:
            self._built = _assemble(self._entries.values(), dict(self._nodes))
        return self._built


class EtcdStore:
    """One job's view of etcd. Thread-safe: the underlying gRPC channel is."""

    def __init__(self, endpoint: str, run_id: str, timeout: float = 5.0,
                 security: Optional[EtcdSecurity] = None):
        self.endpoint = endpoint
        self.run_id = run_id
        self._root = f"{PREFIX}/{run_id}/"
        self._events = f"{EVENTS_PREFIX}/{run_id}/"
        self._security = security
        self._client = connect(endpoint, timeout=timeout, security=security)
        self._watch_id = None
        self._lock = threading.Lock()
        self._init_mirror()

    def _init_mirror(self) -> None:
        self._mirror: Optional[_Mirror] = None  # while the watch runs
        self._mirror_lock = threading.Lock()
        self._confirmed_at = 0.0
        self._dirty = False
        self._expected = 0  # the revision of this store's last write the mirror must hold
        self._caught_up = threading.Condition(self._mirror_lock)  # notified per watch response

    @classmethod
    def attach(cls, client, endpoint: str, run_id: str,
               security: Optional[EtcdSecurity] = None) -> "EtcdStore":
        """A store for another job on an open client (the job client reads many jobs); its
        close() leaves the client open."""
        store = cls.__new__(cls)
        store.endpoint, store.run_id, store._security = endpoint, run_id, security
        store._root, store._events = f"{PREFIX}/{run_id}/", f"{EVENTS_PREFIX}/{run_id}/"
        store._client, store._watch_id, store._lock = client, None, threading.Lock()
        store._attached = True
        store._init_mirror()
        return store

    def _key(self, *parts) -> str:
        return self._root + "/".join(str(p) for p in parts)

    # -- leases --------------------------------------------------------------------------
    @_converted
    def grant_lease(self, ttl: float) -> int:
        return self._client.lease(max(1, int(round(ttl)))).id

    @_converted
    def refresh_lease(self, lease_id: int) -> bool:
        """Keep a lease alive; False when it no longer exists (expired or revoked)."""
        responses = list(self._client.refresh_lease(lease_id))
        return bool(responses) and responses[-1].TTL > 0

    @_converted
    @_writes
    def revoke_lease(self, lease_id: int) -> None:
        try:
            self._client.revoke_lease(lease_id)
        except Exception as exc:
            if "not found" not in str(exc).lower():
                raise

    # -- writes --------------------------------------------------------------------------
    def _expect(self, revision: int) -> None:
        """This store changed a job key at `revision`: snapshot() waits until the mirror has it."""
        with self._mirror_lock:
            self._expected = max(self._expected, revision)

    def _put_and_get(self, key: str, compare, puts) -> "tuple[bool, Optional[bytes]]":
        """A transaction that writes `puts` if `compare` holds, and reads `key` either way;
        snapshot() then waits for the key's revision. Returns (succeeded, the key's value)."""
        tx = self._client.transactions
        ok, responses = self._client.transaction(compare=compare,
                                                 success=[*puts, tx.get(key)],
                                                 failure=[tx.get(key)])
        found = responses[-1] if responses else []
        if not found:  # deleted meanwhile: read everything next time
            self._dirty = True
            return ok, None
        value, meta = found[0]
        self._expect(meta.mod_revision)
        return ok, value

    @_converted
    def ensure_spec(self, spec: JobSpec) -> JobSpec:
        """Write the job spec unless one exists; return the spec in force."""
        key = self._key("spec")
        tx = self._client.transactions
        _, value = self._put_and_get(key, [tx.create(key) == 0], [tx.put(key, spec.to_json())])
        if value is None:
            raise RendezvousConnectionError(f"job {self.run_id!r} was deleted while joining it")
        return JobSpec.from_json(value)

    @_converted
    def abandoned(self) -> bool:
        """A job is stored under this id but no node is registered in it: it finished or was
        left, and a new job may take the id (as with torchrun). Two small reads, or none from
        the mirror."""
        with self._mirror_lock:
            if self._mirror is not None and not self._dirty:
                snap = self._mirror.snapshot()
                return snap.spec is not None and not snap.nodes
        if not self._client.get_response(self._key("spec")).kvs:
            return False
        return self._client.get_prefix_response(self._key("nodes", ""), count_only=True).count == 0

    @_converted
    @_writes
    def change_spec(self, spec: JobSpec, expected_revision: int,
                    releases: Dict[str, Release] = None) -> bool:
        """Replace the spec (and write release records) only if nobody changed it since it was
        read at expected_revision and the job has not ended."""
        tx = self._client.transactions
        puts = [tx.put(self._key("spec"), spec.to_json())]
        puts += [tx.put(self._key("release", nid), r.to_json())
                 for nid, r in (releases or {}).items()]
        ok, _ = self._client.transaction(
            compare=[tx.mod(self._key("spec")) == expected_revision,
                     tx.create(self._key("state")) == 0],
            success=puts, failure=[])
        return ok

    @_converted
    @_writes
    def request_stop(self, request: StopRequest) -> bool:
        """Ask the job to stop, once, unless it ended; True if this call made the request."""
        tx = self._client.transactions
        ok, _ = self._client.transaction(
            compare=[tx.create(self._key("stop")) == 0, tx.create(self._key("state")) == 0,
                     tx.create(self._key("spec")) != 0],
            success=[tx.put(self._key("stop"), request.to_json())], failure=[])
        return ok

    @_converted
    @_writes
    def clear_release(self, node_id: str) -> None:
        self._client.delete(self._key("release", node_id))

    # -- the event history --------------------------------------------------------------
    @_converted
    def put_event(self, node_id: str, seq: int, record: str) -> None:
        """Keep one of this node's events; its oldest beyond EVENTS_KEPT goes."""
        tx = self._client.transactions
        ops = [tx.put(f"{self._events}{node_id}/{seq:012d}", record)]
        if seq >= EVENTS_KEPT:
            ops.append(tx.delete(f"{self._events}{node_id}/{seq - EVENTS_KEPT:012d}"))
        self._client.transaction(compare=[], success=ops, failure=[])

    @_converted
    def events(self) -> List[dict]:
        """The job's kept events, every node's, oldest first."""
        records = [json.loads(value) for value, _ in self._client.get_prefix(self._events)]
        return sorted(records, key=lambda r: (r.get("time", 0.0), r.get("node", "")))

    def _put(self, key: str, value, lease=None) -> None:
        self._expect(self._client.put(key, value, lease=lease).header.revision)

    @_converted
    def register(self, node: NodeInfo) -> None:
        self._put(self._key("nodes", node.node_id), node.to_json(), lease=node.lease_id)

    @_converted
    def campaign(self, node_id: str, lease_id: int) -> bool:
        """Become leader if nobody is; the key vanishes with the lease, so a dead leader is replaced."""
        key = self._key("leader")
        tx = self._client.transactions
        ok, _ = self._put_and_get(key, [tx.create(key) == 0],
                                  [tx.put(key, node_id, lease=lease_id)])
        return ok

    @_converted
    def publish_round(self, rnd: Round, expected_revision: int, leader_id: str) -> bool:
        """Replace the round only if nobody replaced it since we read it and we still lead.

        This is the fencing: a leader that lost its lease (and maybe does not know yet) cannot
        overwrite a round published by its successor.
        """
        key = self._key("round")
        tx = self._client.transactions
        ok, _ = self._put_and_get(key, [tx.mod(key) == expected_revision,
                                        tx.value(self._key("leader")) == leader_id],
                                  [tx.put(key, rnd.to_json())])
        if not ok:
            self._dirty = True  # maybe the leadership was lost: read the whole job
        return ok

    @_converted
    def put_master(self, number: int, addr: str) -> None:
        self._put(self._key("master", number), addr)

    @_converted
    def report_failure(self, number: int, report: FailureReport) -> None:
        self._put(self._key("failures", number, report.node_id), json.dumps(asdict(report)))

    @_converted
    def set_outcome(self, outcome: JobOutcome) -> JobOutcome:
        """Write the terminal state once; return whichever outcome won."""
        key = self._key("state")
        tx = self._client.transactions
        _, value = self._put_and_get(key, [tx.create(key) == 0], [tx.put(key, outcome.to_json())])
        return JobOutcome.from_json(value) if value is not None else outcome

    @_converted
    def mark_in_place(self) -> None:
        self._put(self._key("inplace"), "1")

    @_converted
    @_writes
    def delete_job(self) -> None:
        self._client.delete_prefix(self._root)
        self._client.delete_prefix(self._events)

    # -- an extension's keys (ext/<name>/...) ----------------------------------------------
    def _ext(self, name: str, key: str = "") -> str:
        return self._key("ext", name, key)

    @_converted
    def ext_put(self, name: str, key: str, value: bytes) -> None:
        self._client.put(self._ext(name, key), value)

    @_converted
    def ext_get(self, name: str, key: str) -> Optional[bytes]:
        value, _ = self._client.get(self._ext(name, key))
        return value

    @_converted
    def ext_delete(self, name: str, *keys: str) -> None:
        for key in keys:
            self._client.delete(self._ext(name, key))

    @_converted
    def ext_keys(self, name: str) -> List[str]:
        """Every key of the extension, relative to ext/<name>/."""
        base = self._ext(name)
        return [meta.key.decode()[len(base):]
                for _, meta in self._client.get_prefix(base, keys_only=True)]

    @_converted
    def ext_delete_prefix(self, name: str, prefix: str) -> None:
        self._client.delete_prefix(self._ext(name, prefix))

    @_converted
    def ext_watch(self, name: str, callback: Callable[[], None]):
        """Call `callback()` (from a client thread) whenever a key of the extension changes;
        returns the id for `cancel_watch`."""
        return self._client.add_watch_prefix_callback(self._ext(name),
                                                      lambda _response: callback())

    def cancel_watch(self, watch_id) -> None:
        try:
            self._client.cancel_watch(watch_id)
        except Exception:
            pass  # gone with a broken stream, or etcd is gone

    # -- reads ---------------------------------------------------------------------------
    @_converted
    def snapshot(self) -> Snapshot:
        """The job as of one etcd revision: from the mirror while the watch runs (see the
        module's docstring), else read."""
        with self._mirror_lock:
            if self._mirror is not None and not self._dirty:
                # This store's own last write: the watch brings it within milliseconds.
                self._caught_up.wait_for(
                    lambda: self._mirror is None or self._mirror.revision >= self._expected,
                    timeout=CATCH_UP_S)
            mirror = self._mirror
            dirty = self._dirty or (mirror is not None and mirror.revision < self._expected)
            if mirror is not None and not dirty:
                if time.monotonic() - self._confirmed_at < CONFIRM_S:
                    return mirror.snapshot()
        if mirror is not None and not dirty:
            # The round (changed by the leader) and the number of nodes (which the leader
            # itself watches for): two small reads that a stalled watch cannot pass.
            rounds = self._client.get_response(self._key("round")).kvs
            nodes = self._client.get_prefix_response(self._key("nodes", ""),
                                                     count_only=True).count
            found = rounds[0].mod_revision if rounds else 0
            with self._mirror_lock:
                if (self._mirror is mirror and mirror.round_revision() == found
                        and mirror.node_count() == nodes):
                    self._confirmed_at = time.monotonic()
                    return mirror.snapshot()
        return self._read()

    def _read(self) -> Snapshot:
        """Read the whole job; a running watch's mirror starts over from what was read."""
        with self._mirror_lock:
            self._dirty = False  # a write from now on is after this read: dirty again
        response = self._client.get_prefix_response(self._root)
        read = _Mirror(self._root, response.kvs, response.header.revision)
        with self._mirror_lock:
            if self._mirror is not None and read.revision > self._mirror.revision:
                self._mirror = read
                self._confirmed_at = time.monotonic()
                self._caught_up.notify_all()
        return read.snapshot()

    # -- change notification -------------------------------------------------------------
    @_converted
    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from a client thread) whenever any key of the job changes, except
        an extension's: Horovod workers write dozens of rendezvous keys per round and no agent
        decision depends on them."""
        def on_response(response) -> None:
            events = getattr(response, "events", None)
            if events is None:  # the stream broke: snapshot() reads until rewatch()
                with self._mirror_lock:
                    self._mirror = None
                    self._caught_up.notify_all()
                callback()
                return
            with self._mirror_lock:
                # The mirror in use, maybe started over by _read(): its revision skips the rest.
                current = self._mirror
                try:
                    changed = current.apply(events) if current is not None else bool(events)
                except Exception:  # a record it cannot parse: read etcd, and fail there
                    log.exception("job %s: a watched change could not be applied; reading "
                                  "etcd from now on", self.run_id)
                    self._mirror, changed = None, True
                self._caught_up.notify_all()
            if changed:
                callback()

        with self._lock:
            if self._watch_id is None:
                response = self._client.get_prefix_response(self._root)
                mirror = _Mirror(self._root, response.kvs, response.header.revision)
                with self._mirror_lock:
                    self._mirror, self._confirmed_at = mirror, time.monotonic()
                    self._dirty = False
                # From the revision after the read: no change is missed or applied twice.
                self._watch_id = self._client.add_watch_prefix_callback(
                    self._root, on_response, start_revision=mirror.revision + 1)

    def rewatch(self, callback: Callable[[], None]) -> None:
        """Watch again after an outage: the client drops a watch whose stream broke."""
        with self._lock:
            if self._watch_id is not None:
                try:
                    self._client.cancel_watch(self._watch_id)
                except Exception:
                    pass  # already gone with the broken stream
                self._watch_id = None
            with self._mirror_lock:
                self._mirror = None
        self.watch(callback)

    def close(self) -> None:
        if getattr(self, "_attached", False):
            return
        with self._lock:
            if self._watch_id is not None:
                try:
                    self._client.cancel_watch(self._watch_id)
                except Exception:
                    pass  # closing anyway; etcd may be gone
                self._watch_id = None
        try:
            self._client.close()
        except Exception:
            pass
