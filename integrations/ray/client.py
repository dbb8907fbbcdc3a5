"""The shared pool's client: submit, list, status, logs, stop and queues, through etcd only (a
controller carries them out). Used by `python -m integrations.ray` and by programs.

    with PoolClient("127.0.0.1:2379") as pool:
        pool.submit(Submission("train1", TRAIN, ("train.py",), min_members=1, max_members=4))
        pool.status("train1")["state"]          # pending | running | finished | failed | stopped

A submission is checked as the controller will check it (the queues it published, the nodes it
last saw), so a bad spec is refused with the core's own message before anything is written.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional

from rendezvous.client import JobClient, JobEndedError, UnknownJobError

from .controller import load_config
from .scheduler import State, SubmissionError, submit
from .scheduler.quota import demand
from .spec import TRAIN, Submission, job_id
from .store import ENDED, RUNNING, PoolStore, Record

STATUS_SCHEMA = "elastic-run.pool-workload/1"
CONTROLLER_STALE_S = 10.0


class PoolError(SubmissionError):
    """A request the pool cannot take (unknown workload, no controller); nothing was written."""


class PoolClient:
    def __init__(self, endpoint: str, timeout: float = 5.0, security=None, clock=time.time):
        self.endpoint, self._clock = endpoint, clock
        self._timeout, self._security = timeout, security
        self.store = PoolStore(endpoint, timeout=timeout, security=security)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "PoolClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _config(self):
        text = self.store.config_text()
        if text is None:
            raise PoolError(f"no pool controller has used etcd {self.endpoint} yet; start one: "
                            "python -m integrations.ray controller --address RAY_ADDRESS "
                            f"--rdzv-endpoint {self.endpoint}")
        return load_config(text)

    # -- changing --------------------------------------------------------------------------
    def submit(self, sub: Submission) -> Submission:
        """Queue a workload; SubmissionError (nothing written) for a spec the pool refuses."""
        sub.check()
        state = State.of(self._config(), self.store.inventory())
        submit(state, sub.workload(), 0.0)  # the core's own checks: queue, class, fits a node
        sub = replace(sub, submitted_at=self._clock())
        if not self.store.add_workload(sub):
            raise SubmissionError(f"workload {sub.name!r} exists already; pick another name (or "
                                  "`forget` the ended one)")
        return sub

    def stop(self, name: str, reason: str = "") -> None:
        """End a workload: a pending one leaves its queue; a training job commits, checkpoints
        and ends as stopped; a gang's members are ended."""
        rec = self._record(name)
        if rec.state in ENDED:
            raise PoolError(f"workload {name!r} has ended ({rec.state}) already")
        self.store.request_stop(name, reason or "stopped by request")

    def forget(self, name: str) -> None:
        """Delete an ended workload's records (its name may then be used again)."""
        rec = self._record(name)
        if rec.state not in ENDED:
            raise PoolError(f"workload {name!r} is {rec.state}; stop it first")
        self.store.delete_workload(name)

    # -- reading ---------------------------------------------------------------------------
    def _record(self, name: str) -> Record:
        records = self.store.records()
        if name not in records:
            known = ", ".join(sorted(records)) or "none"
            raise PoolError(f"no workload {name!r} at etcd {self.endpoint} (workloads: {known})")
        return records[name]

    def list(self) -> List[dict]:
        subs, records = self.store.workloads(), self.store.records()
        rows = [self._json(subs[n], records.get(n, Record()), history=False) for n in subs]
        return sorted(rows, key=lambda r: r["submitted_at"])

    def status(self, name: str) -> dict:
        """The workload as the controller last wrote it (documented JSON: README, "Sharing a
        Ray cluster"); a training job's rendezvous status under "job" while it runs."""
        rec = self._record(name)
        sub = self.store.workloads()[name]
        out = self._json(sub, rec, history=True)
        if sub.kind == TRAIN and rec.state == RUNNING:
            try:
                with JobClient(self.endpoint, timeout=self._timeout,
                               security=self._security) as jobs:
                    out["job"] = jobs.status(out["rendezvous_job"], probe=False,
                                             recent=0).to_json()
            except (UnknownJobError, JobEndedError):
                out["job"] = None
        return out

    def _json(self, sub: Submission, rec: Record, history: bool) -> dict:
        out = {"schema": STATUS_SCHEMA, "name": sub.name, "kind": sub.kind,
               "queue": sub.queue, "priority": sub.priority, "state": rec.state,
               "reason": rec.reason, "members": list(rec.members),
               "size": {"min": sub.min_members, "max": sub.max_members,
                        "now": len(rec.members)},
               "restarts": rec.restarts, "exit_code": rec.exit_code,
               "submitted_at": sub.submitted_at, "admitted_at": rec.admitted_at or None,
               "ended_at": rec.ended_at, "spec": asdict(sub)}
        if sub.kind == TRAIN:
            out["rendezvous_job"] = job_id(sub, rec.attempt)
        if history:
            out["history"] = list(rec.history)
        return out

    def logs(self, name: str, member: Optional[str] = None,
             ray_address: Optional[str] = None) -> Dict[str, str]:
        """Each member's output (its end): live from its actor when `ray_address` is given and
        it runs, else as kept when it ended."""
        rec = self._record(name)
        out = dict(rec.logs)
        if ray_address and rec.state == RUNNING:
            out.update(_live_logs(ray_address, rec))
        if member is not None:
            picked = {k: v for k, v in out.items() if k == member or k.endswith(f"/{member}")}
            if not picked:
                raise PoolError(f"workload {name!r} has no log of member {member!r} (members "
                                f"with logs: {', '.join(sorted(out)) or 'none'})")
            out = picked
        return out

    def queues(self) -> List[dict]:
        """Each cluster queue: its quota, what its running workloads use, how many wait."""
        config = self._config()
        subs, records = self.store.workloads(), self.store.records()
        rows = []
        for qname, queue in config.queues.items():
            used = [0, 0, 0]
            pending = running = 0
            for n, sub in subs.items():
                rec = records.get(n, Record())
                if sub.queue != qname:
                    continue
                if rec.state == RUNNING:
                    running += 1
                    d = demand(sub.workload().shape, len(rec.members))
                    used = [u + x for u, x in zip(used, d)]
                elif rec.state not in ENDED:
                    pending += 1
            rows.append({"queue": qname, "cohort": queue.cohort,
                         "strategy": queue.strategy, "pending": pending, "running": running,
                         "used": {"cpu": used[0] / 1000, "memory_mib": used[1],
                                  "gpu": used[2] / 1000},
                         "quota": {qf.flavor: {r: _unit(r, q.nominal) for r, q in qf.quotas.items()}
                                   for qf in queue.flavors}})
        return rows


def _unit(resource: str, value: int) -> float:
    """cpu and gpu in whole units, memory in MiB (the core counts milli-CPUs and milli-GPUs)."""
    return value if resource == "memory" else value / 1000


def _live_logs(address: str, rec: Record) -> Dict[str, str]:
    import ray

    from .controller import NAMESPACE
    from .spec import member_name
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=False)
    out = {}
    for m in rec.members:
        try:
            actor = ray.get_actor(f"{member_name(m['id'])}.{rec.attempt}", namespace=NAMESPACE)
            out[m["id"]] = ray.get(actor.tail.remote(), timeout=10)
        except Exception:
            continue
    return out
