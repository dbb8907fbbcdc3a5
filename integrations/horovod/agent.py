"""The agent's side of Horovod workers: their gloo rendezvous, backed by etcd, and the mapping of
rounds onto Horovod's elastic resets.

`HorovodBackend` is a `launcher.backend.WorkerBackend`, so the agent drives it as any other: a
round is applied in place when every local worker runs `hvd.elastic.run` (or is a newcomer still
starting in a job that does, or waits in standby), otherwise by restarting the workers.

- Pre-warm. Workers run through `integrations.horovod.prewarm`: a joining node starts them in
  standby, where they import torch and Horovod, and registers once all of them wait for their
  world (`GET /elastic_start`); the round that names the node answers it.
- Rendezvous. Each local rank has its own HTTP endpoint (endpoint.py) on 127.0.0.1; its keys go
  to etcd under horovod/<round>/ of the round that worker was given (at spawn, or by its last
  rank_and_size), so every agent sees the same rendezvous and nothing lives on one node only.
  A rank's keys are deleted once it passed the scope's barrier, older rounds once all local
  workers joined a newer one.
- In place. A worker that entered `hvd.elastic.run` registers its notification service. On a new
  round those still in an older one are notified (Horovod drops a notice that arrives during its
  reset, so it is repeated until the worker asks for its new slot), raise HostsUpdatedInterrupt
  at their next `state.commit()`, and re-initialise: `GET rank_and_size` answers with their slot
  in the newest round. A worker whose collective failed (HorovodInternalError) asks the same
  question; with no newer round yet, the agent hears `collective_failed` and finds out why.
  Notice timestamps grow with the round number, never with the wall clock.
"""
from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from elastic.contract import CollectiveFailed
from launcher.backend import (PREWARM_ALWAYS, PREWARM_NEVER, BackendTraits, ProcessBackend,
                              WorkerStatus)
from launcher.network import iface_of
from launcher.workers import WorkerSpec, WorldAssignment, worker_env as launcher_env
from rendezvous.api import RendezvousConnectionError
from rendezvous.store import EtcdStore

from .endpoint import BackendUnavailable, SlotBackend, SlotEndpoint
from .keys import HorovodKeys
from .prewarm import ENV_ENDPOINTS, runner_argv
from .slots import PLAN_SCOPE, REMOVED, Slot, node_slots, worker_env

log = logging.getLogger(__name__)

NOTIFY_INTERVAL_S = 0.5     # a worker still in an older round is notified again this often
LONG_POLL_S = 0.5           # a GET of a missing key is held this long before the 404
RECHECK_S = 0.1             # ... and re-reads etcd at least this often meanwhile
ETCD_PATIENCE_S = 10.0      # a request waits this long for an unreachable etcd before failing
WAIT_S = 1.0                # rank_and_size re-checks the worker at least this often
STAMP_PER_ROUND = 1_000_000  # notice timestamp: round * this + a counter
PLANS_KEPT = 8


def require_horovod() -> None:
    """Raise ImportError with the reason when Horovod with PyTorch cannot be imported."""
    import importlib.util

    import horovod  # noqa: F401  (light: it does not load torch)
    if importlib.util.find_spec("horovod.torch") is None:
        raise ImportError("horovod was built without PyTorch")


@dataclass
class _Worker:
    generation: int = 0              # bumped when the workers are stopped: old requests give up
    waiting: bool = False            # in standby, asking for its world
    start: Optional[bytes] = None    # the world given to it in standby (JSON)
    round: Optional[int] = None      # the round whose slot and rendezvous keys it uses
    client: object = None            # its WorkerNotificationClient, once in hvd.elastic.run
    running: Optional[int] = None    # the round whose global rendezvous it completed
    notified: Tuple[int, float] = (0, 0.0)  # (round, time) of the last notice


@dataclass(frozen=True)
class _Round:
    number: int
    member: bool
    slots: Tuple[Slot, ...] = ()


class HorovodBackend(ProcessBackend, SlotBackend):
    """Horovod workers for one agent. `spec` is the agent's; the workers run through the pre-warm
    runner and get their Horovod variables at each spawn. in_place: follow rounds in place (the
    default, auto); False: restart the workers on every change (--rescale-mode restart)."""

    def __init__(self, store: EtcdStore, spec: WorkerSpec, *, node_id: str, host: str,
                 wake: Callable[[], None], in_place: bool = True):
        self.nproc = nproc = spec.nproc
        self.keys, self._hostname, self._wake = HorovodKeys(store), node_id, wake
        self._iface = iface_of(host)
        self._in_place = in_place
        self._cond = threading.Condition(threading.RLock())
        self._workers = [_Worker() for _ in range(nproc)]
        self._round: Optional[_Round] = None
        self._plans: Dict[int, bytes] = {}
        self._leaving = self._closed = False
        self._elastic = False
        self._stamp = 0
        self._messages: "queue.Queue[tuple[int, CollectiveFailed]]" = queue.Queue()
        self._kv_cond = threading.Condition()
        self._kv_version = 0
        self._endpoints = [SlotEndpoint(k, self) for k in range(nproc)]
        runner = runner_argv(spec.argv)
        self.can_prewarm = runner is not None
        super().__init__(replace(
            spec, argv=runner or spec.argv, rank_env=self.spawn_env,
            extra_env={**spec.extra_env, ENV_ENDPOINTS: ",".join(
                f"127.0.0.1:{e.port}" for e in self._endpoints)}))
        # A Horovod worker that entered a world cannot go back to standby; workers report no
        # step progress; every joining node pre-warms (importing Horovod takes seconds).
        self.traits = BackendTraits(
            in_place=in_place,
            prewarm=PREWARM_ALWAYS if in_place and self.can_prewarm else PREWARM_NEVER)
        try:
            self._watch_id = self.keys.watch(self._kv_changed)
        except RendezvousConnectionError:
            self._watch_id = None  # GETs of missing keys then just re-read etcd every RECHECK_S
        threading.Thread(target=self._notify_loop, name="hvd-notify", daemon=True).start()

    # -- what the agent calls (launcher.backend.WorkerBackend) -------------------------------
    def spawn_env(self, a: WorldAssignment, local_rank: int) -> Dict[str, str]:
        """WorkerSpec.rank_env: the Horovod variables of a worker starting in round a."""
        slot = node_slots(a.member_nprocs, a.group_rank)[local_rank]
        with self._cond:
            self._set_round(a)
            w = self._workers[local_rank]
            w.round, w.client, w.running = a.round, None, None
            self._cond.notify_all()
        port = self._endpoints[local_rank].port
        return worker_env(slot, hostname=self._hostname, port=port, iface=self._iface,
                          plan_url=f"http://127.0.0.1:{port}/{PLAN_SCOPE}/"
                                   f"{self._hostname}:{local_rank}")

    def push_round(self, a: WorldAssignment) -> None:
        with self._cond:
            self._set_round(a)
            self._leaving = False
            for k, w in enumerate(self._workers):
                if w.waiting and w.start is None:  # in standby: this round is its first
                    w.start = json.dumps(launcher_env({}, self.spec, a, k)).encode()
            self._cond.notify_all()

    def push_standby(self, number: int) -> None:
        with self._cond:
            self._round = _Round(number, member=False)
            self._cond.notify_all()

    def push_leave(self, checkpoint: bool) -> None:
        """The node leaves: its workers are told they were removed at their next reset, and
        notified so that a rank 0 among them starts that reset for everyone."""
        with self._cond:
            self._leaving = True
            self._cond.notify_all()

    def stop(self, sig: int = signal.SIGTERM, grace: Optional[float] = None) -> None:
        super().stop(sig, grace)
        # The workers were stopped: forget them and whatever they still had to say.
        with self._cond:
            for w in self._workers:
                w.generation += 1
                w.waiting, w.start, w.round, w.client, w.running = False, None, None, None, None
            self._cond.notify_all()
        while not self._messages.empty():
            self._messages.get_nowait()

    def drain(self) -> List[Tuple[int, CollectiveFailed]]:
        out = []
        while not self._messages.empty():
            out.append(self._messages.get_nowait())
        return out

    def status(self) -> WorkerStatus:
        base = super().status()
        if base.state == "none":
            return base
        return replace(base, capable=base.state == "running" and self.can_follow(len(base.pids)),
                       all_ready=self.all_in_standby(), running_round=self.common_round())

    def can_follow(self, count: int) -> bool:
        """All `count` local workers can follow a new round in their processes: they wait in
        standby, run hvd.elastic.run, or are starting in a job whose workers do (they will)."""
        if not self._in_place or count != self.nproc:
            return False
        with self._cond:
            if any(w.round is None and not w.waiting for w in self._workers):
                return False
            if all(w.client is not None or w.round is None for w in self._workers):
                return True  # in hvd.elastic.run, or in standby
        return self._job_is_elastic()

    def all_in_standby(self) -> bool:
        with self._cond:
            return all(w.waiting and w.start is None for w in self._workers)

    def common_round(self) -> Optional[int]:
        """The round whose global rendezvous every local worker completed, if one."""
        with self._cond:
            rounds = {w.running for w in self._workers}
        return next(iter(rounds)) if len(rounds) == 1 else None

    def close(self) -> None:
        super().close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for endpoint in self._endpoints:
            endpoint.close()
        if self._watch_id is not None:
            self.keys.cancel(self._watch_id)

    # -- what the workers ask (endpoint.SlotBackend) --------------------------------------
    def kv_get(self, local_rank: int, scope: str, key: str) -> Optional[bytes]:
        number = self._round_of(local_rank)
        deadline = time.monotonic() + LONG_POLL_S
        while True:
            seen = self._kv_version
            value = self._etcd(lambda: self.keys.get(number, scope, key))
            left = deadline - time.monotonic()
            if value is not None or left <= 0:
                return value
            with self._kv_cond:
                self._kv_cond.wait_for(lambda: self._kv_version != seen, min(RECHECK_S, left))

    def kv_put(self, local_rank: int, scope: str, key: str, value: bytes) -> None:
        number = self._round_of(local_rank)
        self._etcd(lambda: self.keys.put(number, scope, key, value))

    def kv_finalize(self, local_rank: int, scope: str, rank: str) -> None:
        number = self._round_of(local_rank)
        # Every peer passed the barrier, so none reads this rank's keys of the scope again.
        self._etcd(lambda: self.keys.delete(number, scope, rank, f"rank_{rank}"))
        if scope != "global":
            return
        with self._cond:
            w = self._workers[local_rank]
            if w.round != number:
                return
            w.running = number
            everyone = all(x.running == number for x in self._workers)
        self._wake()
        if everyone:  # no member of this round still needs an older round's keys
            try:
                self.keys.delete_rounds_before(number)
            except RendezvousConnectionError as exc:
                log.info("could not delete old Horovod rendezvous keys: %s", exc)

    def rank_and_size(self, local_rank: int, worker_id: str) -> str:
        with self._cond:
            w = self._workers[local_rank]
            generation, asked, reported = w.generation, w.round, False
            while True:
                if w.generation != generation or asked is None or self._closed or self._leaving:
                    w.client = None
                    return REMOVED
                rnd = self._round
                if rnd is not None and rnd.number > asked:
                    if not rnd.member:
                        w.client = None
                        return REMOVED
                    w.round, w.running = rnd.number, None
                    log.info("Horovod worker %s re-initialises in round %d as %s", worker_id,
                             rnd.number, rnd.slots[local_rank])
                    return rnd.slots[local_rank].answer()
                if not reported:  # not told of a new round: a collective failed in its world
                    reported = True
                    self._messages.put((local_rank, CollectiveFailed(
                        round=asked,
                        error=f"Horovod worker {worker_id} (local rank {local_rank}) reset "
                              f"after a failed collective in round {asked}")))
                    self._wake()
                self._cond.wait(WAIT_S)

    def register(self, local_rank: int, worker_id: str, payload: bytes) -> None:
        from horovod.runner.common.util import codec
        from horovod.runner.elastic.worker import WorkerNotificationClient

        addresses, secret_key = codec.loads_base64(payload)
        client = WorkerNotificationClient(addresses, secret_key, verbose=0)
        with self._cond:
            w = self._workers[local_rank]
            if w.round is None:
                return  # stopped meanwhile
            w.client, w.notified = client, (w.round, 0.0)
            self._cond.notify_all()
        self._wake()
        if not self._elastic:
            try:  # from now on, newcomers still starting are kept through a round change
                self.keys.mark_elastic()
                self._elastic = True
            except RendezvousConnectionError as exc:
                log.info("could not mark the job elastic yet: %s", exc)

    def plan(self, local_rank: int) -> Optional[bytes]:
        with self._cond:
            return self._plans.get(self._workers[local_rank].round)

    def first_world(self, local_rank: int) -> Optional[bytes]:
        with self._cond:
            w = self._workers[local_rank]
            generation = w.generation
            w.waiting = True
            self._wake()
            while w.start is None:
                if w.generation != generation or self._closed or self._leaving:
                    return None
                self._cond.wait(WAIT_S)
            return w.start

    # -- internals ------------------------------------------------------------------------
    def _set_round(self, a: WorldAssignment) -> None:
        if not a.member_nprocs:
            raise ValueError("a Horovod round needs the workers of every member (member_nprocs)")
        if a.env:
            self._plans[a.round] = json.dumps(dict(a.env)).encode()
            for old in sorted(self._plans)[:-PLANS_KEPT]:
                del self._plans[old]
        if self._round is None or self._round.number <= a.round:
            self._round = _Round(a.round, member=True,
                                 slots=node_slots(a.member_nprocs, a.group_rank))

    def _round_of(self, local_rank: int) -> int:
        with self._cond:
            number = self._workers[local_rank].round
        if number is None:
            raise BackendUnavailable(f"local rank {local_rank} has no worker in a round")
        return number

    def _etcd(self, call):
        deadline = time.monotonic() + ETCD_PATIENCE_S
        while True:
            try:
                return call()
            except RendezvousConnectionError as exc:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(str(exc)) from exc
                time.sleep(RECHECK_S)

    def _kv_changed(self) -> None:
        with self._kv_cond:
            self._kv_version += 1
            self._kv_cond.notify_all()

    def _job_is_elastic(self) -> bool:
        if not self._elastic:
            try:
                self._elastic = self.keys.is_elastic()
            except RendezvousConnectionError:
                return False
        return self._elastic

    def _behind(self, w: _Worker) -> bool:
        return w.client is not None and w.round is not None and (
            self._leaving or (self._round is not None and self._round.number > w.round))

    def _notify_loop(self) -> None:
        with self._cond:
            while not self._closed:
                target = self._round.number if self._round else 0
                now = time.monotonic()
                for w in self._workers:
                    if not self._behind(w) or w.notified[0] == target and \
                            now - w.notified[1] < NOTIFY_INTERVAL_S:
                        continue
                    # Under the lock: a worker that asks rank_and_size meanwhile is answered
                    # after the notice is queued, so its reset discards it (no second reset).
                    from horovod.runner.elastic.worker import HostUpdateResult

                    self._stamp = max(self._stamp + 1, target * STAMP_PER_ROUND)
                    w.notified = (target, now)
                    try:  # "mixed": never skip the state sync that follows the reset
                        w.client.notify_hosts_updated(self._stamp, HostUpdateResult.mixed)
                    except Exception as exc:  # it died; the agent sees the exit
                        log.info("could not notify a Horovod worker: %s", exc)
                self._cond.wait(NOTIFY_INTERVAL_S)
