"""The handshake with the shared pool (`integrations.ray`): an endpoint deployed with
`--rdzv-endpoint` is a workload of the pool's controller, in the top priority class.

    policy (in Serve's controller) --wants n--> /elastic-ray/replicas/<name> --> controller
    controller --scheduler admits k (shrinking training at a step boundary if the pool is full)-->
        /elastic-ray/records/<name> (k members) --> policy: Serve runs min(n, k)

So Serve never starts a replica on capacity the scheduler has not given the endpoint, and when the
policy wants fewer, the controller hands the capacity back to training.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from integrations.ray.client import PoolClient
from integrations.ray.spec import ENDPOINT, Submission
from integrations.ray.store import ENDED, RUNNING, PoolStore, Record

from .spec import EndpointSpec, SpecError

log = logging.getLogger(__name__)
READ_EVERY_S = 0.2  # Serve calls the policy every 0.1 s; the grant is read at most this often
RETRY_AFTER_S = 5.0  # etcd out of reach: the next try (Serve's loop must not block on it)
ETCD_TIMEOUT_S = 1.0


def granted(rec: Optional[Record]) -> int:
    """Replicas the pool grants: the members its controller admitted (none while pending)."""
    return len(rec.members) if rec is not None and rec.state == RUNNING else 0


class Grant:
    """Inside Serve's controller: tells the pool how many replicas the policy wants and reads
    back how many it grants. etcd out of reach: the last grant holds (and a warning is logged)."""

    def __init__(self, etcd: str, name: str, every_s: float = READ_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.etcd, self.name, self.every_s, self.clock = etcd, name, every_s, clock
        self._store: Optional[PoolStore] = None
        self._asked: Optional[int] = None
        self._granted, self._read, self._warned = 0, float("-inf"), float("-inf")
        self._failed = float("-inf")

    def __call__(self, wanted: int) -> int:
        now = self.clock()
        due = wanted != self._asked or now - self._read >= self.every_s
        if due and now - self._failed >= RETRY_AFTER_S:
            try:
                if self._store is None:
                    self._store = PoolStore(self.etcd, timeout=ETCD_TIMEOUT_S)
                if wanted != self._asked:
                    self._store.ask_replicas(self.name, wanted)
                    self._asked = wanted
                self._granted = granted(self._store.record(self.name))
                self._read = now
            except Exception as exc:  # noqa: BLE001 - any etcd failure: keep the last grant
                self._failed = now
                if now - self._warned > 30:
                    log.warning("endpoint %s: the pool at %s is out of reach (%s); keeping the "
                                "last grant of %d", self.name, self.etcd, exc, self._granted)
                    self._warned = now
        return min(wanted, self._granted)


def submission(spec: EndpointSpec) -> Submission:
    return Submission(spec.name, ENDPOINT, (), queue=spec.queue, priority=spec.priority,
                      min_members=spec.min_replicas, max_members=spec.max_replicas,
                      cpus=spec.cpus, memory_mib=spec.memory_mib, gpus=int(spec.gpus))


def register(spec: EndpointSpec) -> bool:
    """Submit the endpoint to the pool (checked against its queues and nodes first); True if
    this call submitted it. One of that name already there is kept (a redeploy, `update`,
    `scale`: the policy keeps the new bounds) if its queue, priority and per-replica resources
    are the same; an ended one is replaced."""
    new = submission(spec)
    with PoolClient(spec.pool) as pool:
        existing = pool.store.workloads().get(spec.name)
        if existing is not None:
            if existing.kind != ENDPOINT:
                raise SpecError(f"the pool at {spec.pool} has a {existing.kind} workload named "
                                f"{spec.name!r}; pick another --name")
            rec = pool.store.record(spec.name)
            if rec is None or rec.state not in ENDED:
                changed = [f for f in ("queue", "priority", "cpus", "memory_mib", "gpus")
                           if getattr(existing, f) != getattr(new, f)]
                if changed:
                    raise SpecError(f"endpoint {spec.name!r} is in the pool with other "
                                    f"{', '.join(changed)}; `python -m serving delete` it "
                                    "first to change them")
                return False
            pool.forget(spec.name)
        pool.submit(new)
        return True


def unregister(etcd: str, name: str, wait_s: float = 10.0) -> None:
    """Take the endpoint out of the pool: stopped by its controller, then its records deleted."""
    with PoolClient(etcd) as pool:
        rec = pool.store.record(name)
        if rec is None:
            return
        if rec.state not in ENDED:
            pool.stop(name, "endpoint deleted")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                rec = pool.store.record(name)
                if rec is None or rec.state in ENDED:
                    break
                time.sleep(0.1)
            else:
                log.warning("the pool's controller has not stopped endpoint %s yet; with a "
                            "controller running, `python -m integrations.ray forget %s` "
                            "deletes its records", name, name)
                return
        pool.forget(name)


def describe(etcd: str, name: str) -> dict:
    """The pool's side of an endpoint, for `serving status`."""
    with PoolClient(etcd) as pool:
        rec = pool.store.record(name)
        asked = pool.store.replicas().get(name)
    if rec is None:
        return {"etcd": etcd, "state": None, "granted": 0, "asked": asked}
    return {"etcd": etcd, "state": rec.state, "reason": rec.reason, "granted": granted(rec),
            "asked": asked, "nodes": [m["node"] for m in rec.members]}
