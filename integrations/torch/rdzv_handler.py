"""torchrun's `--rdzv-backend elastic-etcd`: a torch RendezvousHandler on our etcd membership.

    torchrun --rdzv-backend elastic-etcd --rdzv-endpoint 127.0.0.1:2379 --rdzv-id JOB \\
        --nnodes 1:2 --nproc-per-node 1 train.py

Each torchrun agent is one node (one `Member`, nproc 1) of the job in `rendezvous.membership`:
its group rank is its place in the round, its world size the number of members (torch's agent
multiplies by --nproc-per-node itself). The leader among the agents publishes rounds exactly as
for `elastic-run`; this module only maps them onto torch's contract:

- `next_rendezvous` waits for an active round that includes this node and is newer than the one
  it returned last. Group rank 0 serves a fresh TCPStore for each round and publishes its address
  at `master/<round>`; every member connects and waits until all have arrived, so a round with a
  dead member is abandoned for its successor instead of being handed to torch.
- torchrun calls `num_nodes_waiting` every --monitor-interval while workers run; that call is
  also this node's turn to lead (publish a round for joins and departures). It is > 0 when
  newcomers fit in the job or when a newer round replaced ours, so the agent re-rendezvouses
  without spending one of its --max-restarts.
- A node is removed when its lease expires (`lease_ttl`, rdzv-conf): torchrun agents serve no
  health endpoint, so there is no fast path. A dead peer usually breaks our workers first; with
  --max-restarts >= 1 the agent then asks for a new round, which still lists the dead node until
  its lease expires, and the one after it does not.
- torchrun counts restarts itself (--max-restarts), so the leader is never told a limit.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Optional, Tuple

from torch.distributed import DistError, PrefixStore, Store, TCPStore
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousHandlerCreator,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)

from rendezvous import api as ours
from rendezvous.api import JobOutcome, RendezvousSettings, Round
from rendezvous.connect import format_endpoint, parse_endpoint
from rendezvous.decision import FailureReport
from rendezvous.membership import Membership, new_node_id
from rendezvous.store import EtcdStore, Snapshot

log = logging.getLogger(__name__)

BACKEND = "elastic-etcd"
# How often a waiting next_rendezvous re-reads the job when no etcd watch event wakes it earlier.
POLL_INTERVAL_S = 0.1
# One attempt to reach a round's rank-0 store; retried (while the round stands) when it fails.
STORE_CONNECT_TIMEOUT_S = 5.0
# Timeout of store operations on the returned store (torch's rank assignment, for one).
STORE_TIMEOUT_S = 300.0
ETCD_TIMEOUT_S = 5.0
# torchrun's --max-restarts is the limit; the leader must never end the job for restarts.
UNLIMITED_RESTARTS = 2**31 - 1
ARRIVED_KEY = "elastic/arrived"
_CONFIG_SECONDS = ("join_timeout", "last_call_timeout", "join_settle", "lease_ttl")

_clock = time.monotonic

# Ours -> torch's; subclasses before the base class.
_ERRORS = (
    (ours.RendezvousConnectionError, RendezvousConnectionError),
    (ours.RendezvousTimeoutError, RendezvousTimeoutError),
    (ours.RendezvousClosedError, RendezvousClosedError),
    (ours.RendezvousStateError, RendezvousStateError),
    (ours.RendezvousError, RendezvousError),
)


@contextlib.contextmanager
def _as_torch_errors():
    try:
        yield
    except ours.RendezvousError as exc:
        torch_type = next(t for o, t in _ERRORS if isinstance(exc, o))
        raise torch_type(str(exc)) from exc


def settings_from_params(params: RendezvousParameters) -> RendezvousSettings:
    """Our settings from torchrun's: --nnodes, --rdzv-id and --rdzv-conf KEY=SECONDS,...

    join_timeout falls back to torch's own `timeout` key (torchrun always sets it, 900 s by
    default), so `--rdzv-conf timeout=60` means the same as with the c10d backend.
    """
    seconds = {}
    for key in _CONFIG_SECONDS:
        value = params.get(key)
        if value is None and key == "join_timeout":
            value = params.get("timeout")
        if value is None:
            continue
        try:
            seconds[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--rdzv-conf {key}={value!r}: expected a number of seconds") from None
    return RendezvousSettings(run_id=params.run_id, min_nodes=params.min_nodes,
                              max_nodes=params.max_nodes, max_restarts=UNLIMITED_RESTARTS,
                              # torchrun re-enters the rendezvous after any worker failure and
                              # we cannot tell whose it was: no strikes, no cooldowns.
                              blacklist_after=0, **seconds)


class EtcdRendezvousHandler(RendezvousHandler):
    """One torchrun agent's membership in a job; see the module docstring for the mapping."""

    def __init__(self, membership: Membership, host: str):
        self._membership = membership
        self._settings = membership.settings
        self._host = host
        self._joined = False
        self._round: Optional[Round] = None  # the round next_rendezvous returned last
        self._asked: Optional[int] = None  # the round we reported as failed to get a new one
        self._tcp_store: Optional[TCPStore] = None  # keeps that round's store (rank 0: server) open
        self._wake = threading.Event()
        self._wake_at: Optional[float] = None  # when the leader wants to look again (wall clock)

    @property
    def node_id(self) -> str:
        return self._membership.node_id

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        """False: the workers' rank 0 serves its own store on the bootstrap port, so a worker
        group never depends on a store that the next round's rendezvous replaces."""
        return False

    def get_run_id(self) -> str:
        return self._settings.run_id

    # -- the barrier -----------------------------------------------------------------------
    def next_rendezvous(self) -> RendezvousInfo:
        """Block until this node is a member of a new active round whose members all arrived.

        Raises:
            RendezvousClosedError: the job has ended (set_closed, or failed for another reason).
            RendezvousTimeoutError: the job failed for lack of nodes within join_timeout, or this
                node was not admitted to a complete round within join_timeout.
            RendezvousConnectionError: etcd cannot be reached.
        """
        with _as_torch_errors():
            deadline = _clock() + self._settings.join_timeout
            if not self._joined:
                self._membership.join()
                self._membership.store.watch(self._wake.set)
                self._joined = True
                log.info("node %s joined job %s", self.node_id, self.get_run_id())
            while True:
                rnd = self._await_round(deadline)
                opened = self._open_round_store(rnd, deadline)
                if opened is not None:
                    break
            self._tcp_store, store, bootstrap = opened
            self._round = rnd
            rank = rnd.group_rank(self.node_id)
            log.info("node %s: round %d, group rank %d of %d (cause %s)", self.node_id,
                     rnd.number, rank, len(rnd.members), rnd.cause)
            return RendezvousInfo(store, rank, len(rnd.members), bootstrap)

    def _await_round(self, deadline: float) -> Round:
        while True:
            snap = self._step()
            if snap.outcome is not None:
                raise self._ended(snap.outcome)
            rnd = snap.round
            if self._is_next(rnd):
                return rnd
            if self._round is not None and rnd is not None and rnd.number == self._round.number:
                self._ask_for_new_round(snap)
            self._check_deadline(deadline)
            self._sleep()

    def _ask_for_new_round(self, snap: Snapshot) -> None:
        """torchrun re-entered while our round still stands: its workers stopped. Unless
        newcomers are about to be admitted (a new round is coming anyway), tell the leader the
        round failed; it answers with a new round of the same nodes."""
        number = snap.round.number
        if self._waiting(snap) == 0 and self._asked != number:
            self._membership.report_failure(number, FailureReport(
                node_id=self.node_id, time=time.time(),
                description=f"torchrun agent on node {self.node_id} restarted its workers"))
            self._asked = number
            log.info("node %s asked for a round after round %d", self.node_id, number)

    def _is_next(self, rnd: Optional[Round]) -> bool:
        return (rnd is not None and rnd.active and self.node_id in rnd.node_ids
                and (self._round is None or rnd.number > self._round.number))

    def _open_round_store(self, rnd: Round, deadline: float
                          ) -> Optional[Tuple[TCPStore, Store, RendezvousStoreInfo]]:
        """The round's store once every member reached it; None when a newer round replaced it."""
        rank = rnd.group_rank(self.node_id)
        if rank == 0:
            tcp = TCPStore(self._host, 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=STORE_TIMEOUT_S))
            store = PrefixStore(f"/round{rnd.number}", tcp)
            # Set before the address is published, so the others' build() never waits on it.
            bootstrap = RendezvousStoreInfo.build(0, store, self._host)
            self._membership.publish_master(rnd.number, format_endpoint(self._host, tcp.port))
        else:
            tcp = self._connect(rnd, deadline)
            if tcp is None:
                return None
            store = PrefixStore(f"/round{rnd.number}", tcp)
        try:
            store.add(ARRIVED_KEY, 1)
            while store.add(ARRIVED_KEY, 0) < len(rnd.members):
                if self._replaced(rnd, deadline):
                    return None
            if rank != 0:
                bootstrap = RendezvousStoreInfo.build(rank, store, self._host)
        except DistError as exc:  # rank 0's agent is gone; its lease will end the round
            log.warning("round %d store failed (%s); waiting for the next round", rnd.number, exc)
            return self._wait_replaced(rnd, deadline)
        return tcp, store, bootstrap

    def _connect(self, rnd: Round, deadline: float) -> Optional[TCPStore]:
        while True:
            master = self._step().masters.get(rnd.number)
            if master is not None:
                host, port = parse_endpoint(master)
                try:
                    tcp = TCPStore(host, port, is_master=False,
                                   timeout=timedelta(seconds=STORE_CONNECT_TIMEOUT_S))
                    tcp.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
                    return tcp
                except DistError as exc:
                    log.warning("cannot reach round %d's store at %s: %s", rnd.number, master, exc)
            if self._replaced(rnd, deadline):
                return None

    def _replaced(self, rnd: Round, deadline: float) -> bool:
        """Step the membership once (after a short wait); True when a newer round is out."""
        self._check_deadline(deadline)
        self._sleep()
        snap = self._step()
        return snap.outcome is not None or snap.round is None or snap.round.number != rnd.number

    def _wait_replaced(self, rnd: Round, deadline: float) -> None:
        while not self._replaced(rnd, deadline):
            pass

    # -- while workers run -----------------------------------------------------------------
    def num_nodes_waiting(self) -> int:
        """Newcomers the leader will admit, or 1 if a newer round replaced ours (a node left).

        Also this node's turn to lead: torchrun calls it every --monitor-interval.
        """
        try:
            snap = self._step()
        except ours.RendezvousConnectionError as exc:
            # The workers do not need etcd; a blip must not end them. Look again next interval.
            log.warning("cannot check for waiting nodes: %s", exc)
            return 0
        if snap.outcome is not None or self._round is None:
            return 0  # an ended job shows in is_closed() and in the next rendezvous
        waiting = self._waiting(snap)
        if snap.round is None or snap.round.number != self._round.number:
            return max(1, waiting)
        return waiting

    def _waiting(self, snap: Snapshot) -> int:
        """Live nodes outside the current round that fit in it (the leader admits no more)."""
        members = snap.round.node_ids if snap.round is not None else ()
        max_nodes = snap.spec.target if snap.spec else self._settings.max_nodes
        outside = sum(1 for nid in snap.nodes if nid not in members)
        return max(0, min(outside, max_nodes - len(members)))

    # -- the end ---------------------------------------------------------------------------
    def is_closed(self) -> bool:
        with _as_torch_errors():
            return self._membership.store.snapshot().outcome is not None

    def set_closed(self) -> None:
        """End the job for every node: write a terminal outcome ("succeeded": a node decided the
        job is finished, as torch's contract puts it). Later rendezvous raise RendezvousClosedError.
        """
        with _as_torch_errors():
            self._membership.finish(JobOutcome(
                status="succeeded", node_id=self.node_id,
                reason=f"node {self.node_id} closed the rendezvous"))

    def shutdown(self) -> bool:
        """Leave the job (revoke our lease, so the others see us go at once) and close etcd.

        Unlike torch's c10d handler this does not close the rendezvous: the others carry on
        without us, within --nnodes. torchrun skips shutdown when the agent is signalled; then
        our lease expires after lease_ttl.
        """
        if self._joined:
            self._membership.leave()
            self._joined = False
        self._tcp_store = None
        self._membership.store.close()
        return True

    # -- helpers ---------------------------------------------------------------------------
    def _step(self) -> Snapshot:
        snap, _action, self._wake_at = self._membership.step()
        return snap

    def _sleep(self) -> None:
        timeout = POLL_INTERVAL_S
        if self._wake_at is not None:
            timeout = max(0.0, min(timeout, self._wake_at - time.time()))
        self._wake.wait(timeout)
        self._wake.clear()

    def _check_deadline(self, deadline: float) -> None:
        if _clock() >= deadline:
            raise RendezvousTimeoutError(
                f"node {self.node_id} was not admitted to a complete round of job "
                f"{self.get_run_id()} within join_timeout={self._settings.join_timeout:g}s; "
                "start more agents, or raise --rdzv-conf join_timeout=SECONDS")

    def _ended(self, outcome: JobOutcome) -> RendezvousError:
        text = f"job {self.get_run_id()} has ended ({outcome.status}): {outcome.reason}"
        # The leader's only reason to fail a job torchrun runs is too few nodes for too long.
        if outcome.status == "failed" and "join_timeout" in outcome.reason:
            return RendezvousTimeoutError(text)
        return RendezvousClosedError(text)


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """A handler for torchrun's parameters; the node's address is --local-addr or this host's name.

    Raises:
        ValueError: --rdzv-endpoint, --rdzv-id, --nnodes or --rdzv-conf is invalid.
        RendezvousConnectionError: no etcd answers at --rdzv-endpoint.
    """
    if not params.endpoint:
        raise ValueError("--rdzv-backend elastic-etcd needs --rdzv-endpoint HOST:PORT of an etcd; "
                         "start one with `python -m rendezvous`")
    settings = settings_from_params(params)
    host = params.local_addr or socket.getfqdn()
    try:
        store = EtcdStore(params.endpoint, settings.run_id, timeout=ETCD_TIMEOUT_S)
    except ours.RendezvousConnectionError as exc:
        # connect's advice names elastic-run's embedded etcd; torchrun has none.
        raise RendezvousConnectionError(
            f"--rdzv-endpoint {params.endpoint}: no etcd answered within {ETCD_TIMEOUT_S:g}s; "
            "start one with `python -m rendezvous --listen HOST:PORT` and pass that address"
        ) from exc
    # torchrun does not tell the handler --nproc-per-node; one member is one node (nproc 1).
    membership = Membership(store, settings, host=host, nproc=1, health_addr="",
                            node_id=new_node_id())
    return EtcdRendezvousHandler(membership, host)


def handler_creator() -> RendezvousHandlerCreator:
    """The `torchrun.handlers` entry point: torch calls it with no arguments when
    torch.distributed.elastic.rendezvous is imported and registers what it returns."""
    return create_handler
