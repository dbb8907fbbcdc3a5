"""Quota accounting in the manner of Kueue's cluster queues and cohorts. Pure.

Usage is kept per (queue, flavor) as a vector over config.RESOURCES. A queue may use up to its
nominal quota of a resource in a flavor. In a cohort it may borrow beyond that, up to its
borrowing limit, from what the other queues of the cohort lend: each queue lends its unused
nominal quota up to its lending limit and keeps the rest (nominal - lending limit) for itself.
So a cohort's lendable pool of a resource is the sum of what its queues may lend, and a queue's
usage above what it keeps for itself draws on that pool.

A queue below its nominal quota is owed it: if others borrowed its share, it reclaims it by
preempting their borrowing workloads (`reclaimable`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from .config import RESOURCES, ClusterQueue, Config, Quota
from .model import GPU_MILLI, Shape

Vector = Tuple[int, int, int]  # cpu milli, memory MiB, gpu milli
INF = float("inf")


def demand(shape: Shape, members: int = 1) -> Vector:
    return (shape.cpu_milli * members, shape.memory_mib * members, shape.gpu_demand_milli * members)


def add(a: Iterable[int], b: Iterable[int], sign: int = 1) -> Vector:
    return tuple(x + sign * y for x, y in zip(a, b))  # type: ignore[return-value]


def amount(resource: str, value: float) -> str:
    """A resource amount as a person reads it."""
    if resource == "gpu":
        gpus = value / GPU_MILLI
        return f"{gpus:g} GPU" + ("" if gpus == 1 else "s")
    if resource == "cpu":
        cpus = value / 1000
        return f"{cpus:g} CPU" + ("" if cpus == 1 else "s")
    return f"{value / 1024:g} GiB" if value >= 1024 else f"{value:g} MiB"


class Usage:
    """Usage per (queue, flavor); a mutable working copy for one step (`copy` it to try things)."""

    def __init__(self, config: Config, table: Optional[Dict[Tuple[str, str], List[int]]] = None):
        self.config = config
        self.table: Dict[Tuple[str, str], List[int]] = {k: list(v) for k, v in (table or {}).items()}
        self.version = 0  # bumped by every change: what is computed from the usage may be kept
        self._memo: Dict[tuple, Tuple[float, float]] = {}
        self._memo_version = 0

    def copy(self) -> "Usage":
        return Usage(self.config, self.table)

    def get(self, queue: str, flavor: str) -> List[int]:
        return self.table.get((queue, flavor), [0, 0, 0])

    def change(self, queue: str, flavor: str, vector: Iterable[int], sign: int = 1) -> None:
        row = self.table.setdefault((queue, flavor), [0, 0, 0])
        self.version += 1
        for k, v in enumerate(vector):
            row[k] += sign * v

    def queue_total(self, queue: str) -> Vector:
        total = [0, 0, 0]
        for (q, _), row in self.table.items():
            if q == queue:
                for k in range(3):
                    total[k] += row[k]
        return tuple(total)  # type: ignore[return-value]

    # -- the cohort pool -------------------------------------------------------------------------

    def _quota(self, queue: str, flavor: str, r: int) -> Optional[Quota]:
        qf = self.config.queues[queue].flavor(flavor)
        return qf.quotas.get(RESOURCES[r]) if qf is not None else None

    def pool(self, cohort: str, flavor: str, r: int, leave_out: str = "") -> Tuple[float, float]:
        """(lendable capacity, used by borrowers) of resource r of this flavor in the cohort;
        `leave_out` is the queue asking (its own usage is judged separately)."""
        memo_key = (cohort, flavor, r, leave_out)
        if self._memo_version != self.version:
            self._memo, self._memo_version = {}, self.version
        got = self._memo.get(memo_key)
        if got is None:
            got = self._memo[memo_key] = self._pool(cohort, flavor, r, leave_out)
        return got

    def _pool(self, cohort: str, flavor: str, r: int, leave_out: str) -> Tuple[float, float]:
        capacity = used = 0
        for q in self.config.cohort_members(cohort):
            quota = self._quota(q, flavor, r)
            if quota is None:
                continue
            capacity += quota.lendable
            if q != leave_out:
                used += max(0, self.get(q, flavor)[r] - (quota.nominal - quota.lendable))
        return capacity, used

    def borrowing(self, queue: str) -> bool:
        """Whether the queue uses more than its nominal quota of anything anywhere."""
        q = self.config.queues[queue]
        for qf in q.flavors:
            row = self.get(queue, qf.flavor)
            for r, name in enumerate(RESOURCES):
                quota = qf.quotas.get(name)
                if quota is not None and row[r] > quota.nominal:
                    return True
        return False


def fits(usage: Usage, queue: ClusterQueue, flavor: str, want: Vector) -> Optional[str]:
    """None when the queue may take `want` more of this flavor, else why not (one line)."""
    qf = queue.flavor(flavor)
    if qf is None:
        return f"queue {queue.name} has no quota in flavor {flavor}"
    row = usage.get(queue.name, flavor)
    for r, name in enumerate(RESOURCES):
        quota = qf.quotas.get(name)
        if quota is None or not want[r]:
            continue
        after = row[r] + want[r]
        if after <= quota.nominal and queue.cohort is None:
            continue
        if queue.cohort is None:
            return (f"queue {queue.name} over nominal {name} quota in flavor {flavor} "
                    f"({amount(name, row[r])} of {amount(name, quota.nominal)} used, "
                    f"{amount(name, want[r])} more asked)")
        limit = INF if quota.borrowing_limit is None else quota.nominal + quota.borrowing_limit
        if after > limit:
            return (f"queue {queue.name} would pass its {name} borrowing limit in flavor {flavor} "
                    f"({amount(name, row[r])} used, {amount(name, want[r])} more asked, "
                    f"limit {amount(name, limit)})")
        keeps = quota.nominal - quota.lendable
        capacity, used = usage.pool(queue.cohort, flavor, r, leave_out=queue.name)
        draws = max(0, after - keeps)
        if used + draws > capacity:
            spare = max(0, capacity - used - max(0, row[r] - keeps))
            over = "over" if after > quota.nominal else "within"
            return (f"queue {queue.name} {over} nominal {name} quota in flavor {flavor} "
                    f"({amount(name, row[r])} of {amount(name, quota.nominal)} used, "
                    f"{amount(name, want[r])} more asked), cohort {queue.cohort} has "
                    f"{amount(name, spare)} spare")
    return None


def within_nominal(usage: Usage, queue: ClusterQueue, flavor: str, want: Vector) -> bool:
    """Whether the queue would stay within its nominal quota: then it may reclaim what others
    borrowed."""
    qf = queue.flavor(flavor)
    if qf is None:
        return False
    row = usage.get(queue.name, flavor)
    return all(row[r] + want[r] <= qf.quotas[name].nominal
               for r, name in enumerate(RESOURCES) if name in qf.quotas)


def dominant_share(usage: Usage, queue: str, capacity: Vector) -> float:
    """The queue's largest share of any resource of the pool (Dominant Resource Fairness)."""
    total = usage.queue_total(queue)
    return max((total[r] / capacity[r] for r in range(3) if capacity[r]), default=0.0)


def from_admitted(config: Config, admitted: Mapping[str, "object"]) -> Usage:
    """Usage from the admitted workloads (workload.Admitted)."""
    usage = Usage(config)
    for a in admitted.values():
        usage.change(a.workload.queue, a.flavor, demand(a.workload.shape, a.size))
    return usage
