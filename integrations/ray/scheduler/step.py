"""`step(state, now) -> Step`: one scheduling pass. Pure: it reads the state and returns decisions.

What one step considers, in this order:

1. **Unready workloads.** An admitted workload whose members have not all started within
   `timeouts.wait_for_ready_s` is requeued with back-off (`requeue_base_s * 2**(n-1)`, capped at
   `requeue_max_s`), and deactivated after `requeue_limit` requeues (Kueue's waitForPodsReady).
2. **Heads of the queues.** Only heads are considered, as in Kueue. A queue's head is its first
   workload in order (higher priority class first, then first submitted) that is not backing
   off; an admitted elastic job below its min size (it lost nodes) or an endpoint below the
   replicas it asks for comes before the queue's pending work. Of all the queues' heads, the
   one with the highest priority class goes first, then the one whose queue has the smallest
   dominant resource share (Dominant Resource Fairness), then the first submitted; after each
   attempt the heads are ordered again. A head that cannot be admitted blocks a StrictFIFO
   queue for the rest of the step; in a BestEffortFIFO queue the next workload becomes the head,
   up to LOOKAHEAD workloads per queue per step, but only to be admitted where it fits: once a
   queue's head failed in this step, the ones after it do not preempt (one failed preemption
   search per queue per step, as Kueue tries one head per queue per cycle).
   A head is admitted in the first of its queue's flavors where its quota fits and its members
   can be placed (an elastic job at its min size, an endpoint at up to the replicas it asks
   for, a gang whole). If none, preemption is tried flavor by flavor:
     - over quota: lower-priority work of the same queue, and work of queues of the cohort that
       borrow (when the head stays within its own nominal quota: it reclaims what was lent);
     - out of room: lower-priority work of any queue (the priority classes order all queues),
       and borrowing work of the cohort as above.
   The cheapest victims go first: members of elastic jobs above their min size (they leave at
   a step boundary and lose nothing; an elastic job of the head's own priority gives up what
   it grew into), then whole workloads of the lowest priority, newest first. Victims that turn
   out not to be needed are given back. When nothing can be preempted, the first head (in the
   order above) that is short of room rather than quota gets a **reservation**: nodes where it
   fits once the work that ends there has ended (gangs, and elastic members above min; never
   endpoints or elastic jobs at their min size). Nothing else starts on reserved nodes, so
   backfill - work admitted around it - cannot delay it; elastic members above min on them
   are released at once.
3. **Growth.** Admitted elastic jobs below their max size grow into idle capacity outside the
   reservation, one member at a time, to the job whose queue has the smallest dominant share,
   then where one more member adds the most throughput; a member is added only when it brings
   at least GROWTH_MIN_EFFICIENCY of what one member alone does (on average over the next
   GROWTH_LOOKAHEAD members: a dip at a node boundary does not stop growth that pays off).
   No job grows while work of its priority or higher waits for room without a reservation.
4. **Nodes.** With node types configured, RequestNodes for heads short of room (what their
   members need on empty nodes of the first type that holds them, less what is already asked
   for, within the type's max), and ReleaseNodes for added nodes idle past `node_idle_s` (spot
   first, never below a type's min, never a reserved node).

Every pending workload gets a reason: the one its attempt met, or why it was not considered.
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rendezvous import victims as victim_rule

from . import placement, quota
from .config import NODE_TYPE_LABEL, STRICT_FIFO
from .decisions import (Admit, Preempt, Release, ReleaseNodes, Requeue, RequestNodes, Reserve,
                        Resize, Step, Unreserve)
from .fragmentation import WorkloadMix
from .model import Binding, Shape, allocate, gpu_choice
from .pool import PoolIndex
from .state import Derived, State, derived, describe
from .workload import ELASTIC, GANG, INFERENCE, SAME_NODE, SAME_ZONE, Admitted, Member, Workload

LOOKAHEAD = 8  # BestEffortFIFO: workloads tried per queue per step
GROWTH_MIN_EFFICIENCY = 0.5  # a member is added when it brings this much of one member's speed
GROWTH_LOOKAHEAD = 4  # ... on average over the next this many members (see _gain)
FILL_BACK_LIMIT = 32  # victims beyond this are not offered back (each offer is a placement)


def step(state: State, now: float) -> Step:
    return _Pass(state, now).run()


class _Request:
    """One thing a head asks for: a pending workload's admission, or members an admitted one
    is short of."""

    def __init__(self, w: Workload, count: int, floor: int, admitted: Optional[Admitted] = None):
        # count members wanted, at least floor of them at once (floor == count: all or nothing)
        self.w, self.count, self.floor, self.admitted = w, count, floor, admitted


class _Line:
    """A queue's line in one step: its top-ups, then its pending workloads in order, made into
    requests only as far as the step gets (a queue may hold thousands)."""

    def __init__(self, owner: "_Pass", topups: List[_Request], pendings):
        self.owner, self.items, self.pendings, self.next = owner, topups, pendings, 0

    def at(self, i: int) -> Optional[_Request]:
        while len(self.items) <= i and self.next < len(self.pendings):
            p = self.owner.s.pending[self.pendings[self.next]]
            self.next += 1
            if self.owner._backing_off(p):
                continue
            w = p.workload
            self.items.append(_Request(w, w.max_size if w.kind == INFERENCE else w.min_size,
                                       w.min_size))
        return self.items[i] if i < len(self.items) else None

    def rest(self, i: int):
        """Names of the pending workloads from position i on that the step did not reach."""
        for r in self.items[i:]:
            if r.admitted is None:
                yield r.w.name
        pending = self.owner.s.pending
        for name in self.pendings[self.next:]:
            if not self.owner._backing_off(pending[name]):
                yield name


class _FreestNow:
    """Chooses, among nodes that will hold a member once freeable work ends, the one with the most
    free now (so a reservation completes soonest)."""

    def __init__(self, current: PoolIndex):
        self.current = current

    def choose(self, pool: PoolIndex, shape: Shape, nodes: np.ndarray, fits):
        rows = np.flatnonzero(nodes)
        if rows.size == 0:
            return None
        score = self.current.gpu_free_total()[rows] * 1e6 + self.current.cpu_free[rows]
        i = int(rows[int(np.argmax(score))])
        return i, placement.slots_for(pool, i, shape, fits)


class _Pass:
    def __init__(self, state: State, now: float):
        self.s, self.now, self.cfg = state, now, state.config
        d = derived(state)
        self.pool = d.index.copy()
        self.usage = state.usage.copy()
        self.policy = _policy(state, d)
        if d.masks is None:
            d.masks = {name: np.array([f.matches(n) for n in self.pool.nodes], dtype=bool)
                       for name, f in self.cfg.flavors.items()}
        self.flavor_mask = d.masks
        self.members: Dict[str, List[Member]] = {k: list(a.members) for k, a in state.admitted.items()}
        self.evicted: set = set()
        self.added: Dict[str, List[Member]] = {}
        self.next_id: Dict[str, int] = {k: a.next_member for k, a in state.admitted.items()}
        self.decisions: list = []
        self.reasons: Dict[str, str] = {}
        self.reservation = state.reservation
        self.reserved = self._mask(state.reservation.nodes if state.reservation else ())
        self.draining = self._mask(sorted(state.draining))
        self.short_of_room: List[Tuple[_Request, List[str]]] = []  # (request, flavors)
        self.freed = 0
        self.failed: Dict[tuple, bool] = {}
        self._vindex = None
        self._shares: Dict[str, Tuple[int, float]] = {}
        self._vflavors: Dict[str, frozenset] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def _mask(self, names: Sequence[str]) -> np.ndarray:
        m = np.zeros(len(self.pool), dtype=bool)
        for n in names:
            if n in self.pool.pos:
                m[self.pool.pos[n]] = True
        return m

    def prio(self, w: Workload) -> int:
        return self.cfg.priorities[w.klass]

    def share(self, queue: str) -> float:
        kept = self._shares.get(queue)
        if kept is None or kept[0] != self.usage.version:
            kept = self._shares[queue] = (self.usage.version,
                                          quota.dominant_share(self.usage, queue, self.s.capacity))
        return kept[1]

    def workload(self, name: str) -> Workload:
        return self.s.admitted[name].workload if name in self.s.admitted else self.s.pending[name].workload

    def flavor_of(self, name: str) -> str:
        return self.s.admitted[name].flavor if name in self.s.admitted else self._new_flavor[name]

    _new_flavor: Dict[str, str]

    def holds_reservation(self, w: Workload) -> bool:
        return self.reservation is not None and self.reservation.workload == w.name

    def _spot(self, node: str) -> bool:
        return self.pool.node(node).spot

    # -- the pass --------------------------------------------------------------------------------

    def run(self) -> Step:
        self._new_flavor = {}
        self.requeue_unready()
        if self.reservation is not None and self.reservation.workload not in self.s.pending:
            self.decisions.append(Unreserve(self.reservation.workload, "it is no longer waiting"))
            self.reservation, self.reserved = None, self._mask(())
        self.admit_heads()
        self.grow()
        self.scale_nodes()
        return Step(tuple(self.decisions), self.reasons, self.now)

    def requeue_unready(self) -> None:
        t = self.cfg.timeouts
        for name, a in self.s.admitted.items():
            if a.ready or self.now - a.admitted_at < t.wait_for_ready_s:
                continue
            n = a.requeues + 1
            deactivate = t.requeue_limit > 0 and n > t.requeue_limit
            retry_at = self.now + min(t.requeue_max_s, t.requeue_base_s * 2 ** (n - 1))
            why = (f"its members did not all start within {t.wait_for_ready_s:g} s of admission")
            reason = (f"{why}; deactivated after {t.requeue_limit} requeues" if deactivate else
                      f"{why}; requeued (#{n}), back in the queue at t={retry_at:g}")
            self._take_all(name)
            self.decisions.append(Requeue(name, retry_at, deactivate, reason))
            if not deactivate:
                self.reasons[name] = reason

    # -- heads -----------------------------------------------------------------------------------

    def _queue_lists(self) -> Dict[str, "_Line"]:
        topups: Dict[str, List[_Request]] = {}
        for name, a in self.s.admitted.items():
            w = a.workload
            size = len(self.members[name])
            if w.kind == INFERENCE and size < w.max_size:
                topups.setdefault(w.queue, []).append(_Request(w, w.max_size - size, 1, a))
            elif w.kind == ELASTIC and size < w.min_size:
                topups.setdefault(w.queue, []).append(
                    _Request(w, w.min_size - size, w.min_size - size, a))
        out: Dict[str, _Line] = {}
        for qname, pendings in self.s.queue_order.items():
            reqs = sorted(topups.get(qname, ()),
                          key=lambda r: (-self.prio(r.w), r.admitted.admitted_at, r.w.name))
            out[qname] = _Line(self, reqs, pendings)
        return out

    def _backing_off(self, p) -> bool:
        if p.retry_at <= self.now:
            return False
        self.reasons[p.workload.name] = (
            f"backing off after {p.requeues} requeue(s) ({p.last_reason}); "
            f"back in the queue at t={p.retry_at:g}")
        return True

    def admit_heads(self) -> None:
        lines = self._queue_lists()
        cursor = {q: 0 for q in lines}
        tried = {q: 0 for q in lines}
        blocked: Dict[str, str] = {}  # queue -> the head that blocks it (StrictFIFO)
        while True:
            heads = []
            for q, line in lines.items():
                if q in blocked or tried[q] >= LOOKAHEAD:
                    continue
                # a top-up of a workload preempted earlier in this step is moot
                r = line.at(cursor[q])
                while r is not None and r.admitted is not None and r.w.name in self.evicted:
                    cursor[q] += 1
                    r = line.at(cursor[q])
                if r is None:
                    continue
                heads.append((-self.prio(r.w), r.admitted is None, self.share(q),
                              self.s.pending[r.w.name].submitted_at if r.admitted is None
                              else r.admitted.admitted_at, r.w.name, q))
            if not heads:
                break
            *_, q = min(heads)
            r = lines[q].at(cursor[q])
            cursor[q] += 1
            ok = self.try_request(r, preempt=tried[q] == 0)
            if not ok:
                tried[q] += 1
                if self.cfg.queues[q].strategy == STRICT_FIFO:
                    blocked[q] = r.w.name
        for q, line in lines.items():
            if q in blocked:
                why = f"waiting behind {blocked[q]} in StrictFIFO queue {q}"
            else:
                why = (f"not considered this step: {tried[q]} workload(s) ahead in queue {q} "
                       f"could not be admitted")
            for name in line.rest(cursor[q]):
                self.reasons[name] = why

    def try_request(self, r: _Request, preempt: bool = True) -> bool:
        w = r.w
        queue = self.cfg.queues[w.queue]
        flavors = [r.admitted.flavor] if r.admitted is not None else [qf.flavor for qf in queue.flavors]
        why: List[str] = []
        room_short: List[str] = []
        # First without preemption, in flavor order (Kueue's flavor fungibility), ...
        for flavor in flavors:
            if not self.flavor_mask[flavor].any():
                why.append(f"flavor {flavor} has no nodes")
                room_short.append(flavor)
                continue
            got = self._fit(r, flavor, why, room_short)
            if got:
                return True
        # ... then with preemption.
        for flavor in flavors:
            if not preempt:
                why.append(f"it may preempt only when first in queue {w.queue}'s line")
                break
            if self.flavor_mask[flavor].any() and self._preempt_for(r, flavor, why):
                return True
        if r.admitted is None and room_short:
            self.short_of_room.append((r, room_short))
            self._maybe_reserve(r, room_short, why)
        elif r.admitted is not None and room_short:
            self.short_of_room.append((r, room_short))
        reason = "; ".join(dict.fromkeys(why)) or "no flavor of its queue can take it"
        self.reasons[w.name] = reason
        return False

    def _want(self, r: _Request, count: int) -> quota.Vector:
        return quota.demand(r.w.shape, count)

    def _fit(self, r: _Request, flavor: str, why: List[str], room_short: List[str]) -> bool:
        """Admit (or top up) `r` in this flavor without preempting anything: `floor` members at
        once, then one at a time up to `count`."""
        queue = self.cfg.queues[r.w.queue]
        over = quota.fits(self.usage, queue, flavor, self._want(r, r.floor))
        if over is not None:
            why.append(over)
            return False
        bindings = self._place(r.w, r.floor, flavor)
        if bindings is None:
            why.append(self._room_reason(r, r.floor, flavor))
            room_short.append(flavor)
            return False
        while len(bindings) < r.count:
            if quota.fits(self.usage, queue, flavor, self._want(r, len(bindings) + 1)) is not None:
                break
            more = self._place(r.w, 1, flavor)
            if more is None:
                break
            bindings += more
        if len(bindings) < r.count:
            self.short_of_room.append((_Request(r.w, r.count - len(bindings), 1, r.admitted), [flavor]))
        self._commit(r, flavor, bindings, "fits" if len(bindings) == r.count else
                     f"{len(bindings)} of {r.count} fit")
        return True

    def _room_reason(self, r: _Request, count: int, flavor: str) -> str:
        what = f"{count} member" + ("" if count == 1 else "s") + f" of {describe(r.w.shape)}"
        where = {SAME_NODE: " on one node", SAME_ZONE: " in one zone"}.get(r.w.constraint or "", "")
        reserved = ""
        if self.reservation is not None and not self.holds_reservation(r.w):
            reserved = f" (nodes {', '.join(self.reservation.nodes)} are reserved for " \
                       f"{self.reservation.workload})"
        return f"no room for {what}{where} in flavor {flavor}{reserved}"

    # -- placement -------------------------------------------------------------------------------

    def _place(self, w: Workload, count: int, flavor: str,
               allow_reserved: Optional[bool] = None,
               only: Optional[np.ndarray] = None) -> Optional[List[Binding]]:
        """Place `count` members (all or none); they stay bound in the pool. `only`: for a
        same-node gang, the nodes to try (the others are known not to hold it)."""
        if allow_reserved is None:
            allow_reserved = self.holds_reservation(w)
        key = (w.shape, count, w.constraint, flavor, allow_reserved, self.freed)
        if key in self.failed:
            return None
        mask = self.flavor_mask[flavor] & ~self.draining
        if not allow_reserved:
            mask &= ~self.reserved
        mask &= self._could_hold(w, count)
        if only is not None and w.constraint == SAME_NODE:
            mask &= only
        out = None
        if not mask.any():
            if only is None:  # a failure on some nodes says nothing of the rest
                self.failed[key] = True
            return None
        if w.constraint == SAME_ZONE:
            zones = {}
            for i in np.flatnonzero(mask):
                z = self.pool.nodes[i].zone
                zones.setdefault(z, []).append(i)
            order = sorted(zones, key=lambda z: (-sum(int(self.pool.gpu_free_total()[i]) for i in zones[z]),
                                                 str(z)))
            for z in order:
                zmask = np.zeros_like(mask)
                zmask[zones[z]] = True
                out = self._place_all(w.shape, count, zmask)
                if out is not None:
                    break
        elif w.constraint == SAME_NODE:
            candidates = mask.copy()
            for _ in range(64):
                nodes, fits = self.pool.feasible(w.shape)
                choice = self.policy.choose(self.pool, w.shape, nodes & candidates, fits) \
                    if (nodes & candidates).any() else None
                if choice is None:
                    break
                one = np.zeros_like(mask)
                one[choice[0]] = True
                out = self._place_all(w.shape, count, one)
                if out is not None:
                    break
                candidates[choice[0]] = False
        else:
            out = self._place_all(w.shape, count, mask)
        if out is None:
            if only is None:  # a failure on some nodes says nothing of the rest
                self.failed[key] = True
        return out

    def _could_hold(self, w: Workload, count: int) -> np.ndarray:
        """Nodes worth trying: ones that take a member now, and only if all the room there
        (on one node for a same-node gang) could take `count` of them. A quick necessary
        condition that spares placement attempts (many, while preemption takes victims one by
        one) that cannot succeed; an empty mask when the pool as a whole cannot."""
        shape, pool = w.shape, self.pool
        nodes, fits = pool.feasible(shape)
        if fits is None:
            gpu = None
        elif shape.gpus:
            gpu, need = fits.sum(axis=1), shape.gpus
        else:
            gpu, need = np.where(fits, pool.gpu_free, 0).sum(axis=1), shape.gpu_milli
        if w.constraint == SAME_NODE:
            nodes = nodes & (pool.cpu_free >= count * shape.cpu_milli) \
                & (pool.mem_free >= count * shape.memory_mib)
            return nodes if gpu is None else nodes & (gpu >= count * need)
        if int(pool.cpu_free[nodes].sum()) < count * shape.cpu_milli \
                or int(pool.mem_free[nodes].sum()) < count * shape.memory_mib \
                or (gpu is not None and int(gpu[nodes].sum()) < count * need):
            return np.zeros_like(nodes)
        return nodes

    def _place_all(self, shape: Shape, count: int, mask: np.ndarray,
                   policy=None, pool: Optional[PoolIndex] = None) -> Optional[List[Binding]]:
        pool = pool or self.pool
        policy = policy or self.policy
        if shape.gpu_demand_milli:
            if int(pool.gpu_free[mask].sum()) < shape.gpu_demand_milli * count:
                return None
        if int(pool.cpu_free[mask].sum()) < shape.cpu_milli * count:
            return None
        done: List[Binding] = []
        for _ in range(count):
            nodes, fits = pool.feasible(shape)
            nodes = nodes & mask
            choice = policy.choose(pool, shape, nodes, fits) if nodes.any() else None
            if choice is None:
                for b in done:
                    pool.unbind(b, shape)
                return None
            b = Binding(pool.names[choice[0]], tuple(choice[1]))
            pool.bind(b, shape)
            done.append(b)
        return done

    def _unplace(self, shape: Shape, bindings: List[Binding]) -> None:
        for b in bindings:
            self.pool.unbind(b, shape)

    def _commit(self, r: _Request, flavor: str, bindings: List[Binding], how: str,
                victims_note: str = "") -> None:
        w = r.w
        start = self.next_id.get(w.name, 0) if r.admitted is not None else 0
        members = tuple(Member(f"{w.name}/{start + i}", b, self.now, self._spot(b.node))
                        for i, b in enumerate(bindings))
        self.next_id[w.name] = start + len(members)
        self.usage.change(w.queue, flavor, quota.demand(w.shape, len(members)))
        note = f" {victims_note}" if victims_note else ""
        if r.admitted is None:
            self._new_flavor[w.name] = flavor
            self.members[w.name] = list(members)
            if self.holds_reservation(w):
                self.reservation, self.reserved = None, self._mask(())
                self.freed += 1  # placements that failed around the reservation may fit now
            self.decisions.append(Admit(w.name, flavor, members,
                                        f"admitted in flavor {flavor} of queue {w.queue}: {how}{note}"))
            self.reasons.pop(w.name, None)
        else:
            self.members[w.name].extend(members)
            self.added.setdefault(w.name, []).extend(members)
            target = w.max_size if w.kind == INFERENCE else w.min_size
            self.decisions.append(Resize(w.name, members, len(self.members[w.name]),
                                         f"back toward {target} members: {how}{note}"))

    # -- taking capacity away --------------------------------------------------------------------

    def _take_member(self, name: str, member: Member) -> None:
        w = self.workload(name)
        self.pool.unbind(member.binding, w.shape)
        self.usage.change(w.queue, self.flavor_of(name), quota.demand(w.shape), -1)
        self.members[name].remove(member)
        self.freed += 1

    def _give_member(self, name: str, member: Member) -> None:
        w = self.workload(name)
        self.pool.bind(member.binding, w.shape)
        self.usage.change(w.queue, self.flavor_of(name), quota.demand(w.shape))
        self.members[name].append(member)
        self.members[name].sort(key=lambda m: _ordinal(m.id))

    def _take_all(self, name: str) -> List[Member]:
        taken = list(self.members[name])
        for m in taken:
            self._take_member(name, m)
        self.evicted.add(name)
        return taken

    def _candidates(self, r: _Request, flavor: str, over_quota: bool):
        """Victims in cost order: ("shrink", workload, member) then ("evict", workload, None)."""
        w = r.w
        queue = self.cfg.queues[w.queue]
        p = self.prio(w)
        reclaiming = queue.cohort is not None and quota.within_nominal(
            self.usage, queue, flavor, self._want(r, r.floor))
        cohort = set(self.cfg.cohort_members(queue.cohort)) if reclaiming else set()
        shrink, evict = [], []
        by_prio, prios, by_queue, grown = self._victim_index()
        borrowing = {q for q in cohort if q != w.queue and self.usage.borrowing(q)}
        lending = [rec for q in borrowing for rec in by_queue.get(q, ())]
        if over_quota:  # only its own queue's work, and what the cohort borrowed
            scan = list(by_queue.get(w.queue, ())) + lending
        else:  # lower priority, elastic growth, and what the cohort borrowed
            scan = by_prio[:bisect.bisect_left(prios, p)] + grown + lending
        seen = set()
        for vp, name, v in scan:
            members = self.members[name]
            if name in seen or name == w.name or name in self.evicted or not members:
                continue
            seen.add(name)
            reclaim = v.queue in borrowing
            # What an elastic job grew into above its min is idle capacity it borrowed: any
            # waiting work takes it back. An endpoint's replicas and whole workloads go only to
            # higher priority (or back to the queue whose quota they borrowed).
            can_shrink = v.resizable and len(members) > v.min_size and (
                vp < p or reclaim or v.kind == ELASTIC)
            if not (can_shrink or vp < p or reclaim):
                continue
            if over_quota:
                if v.queue != w.queue and not reclaim:
                    continue
            elif flavor not in self._flavors_of(name):
                continue
            if can_shrink:
                added_now = {m.id for m in self.added.get(name, ())}
                pool_members = [m for m in members if m.id not in added_now]
                extra = victim_rule.leavers(pool_members[1:], len(members) - v.min_size,
                                            spot=lambda m: m.spot, joined_at=lambda m: m.joined_at,
                                            key=lambda m: f"{_ordinal(m.id):012d}")
                for k, m in enumerate(extra):
                    shrink.append(((vp, not reclaim, k, name), ("shrink", name, m)))
            if vp < p or reclaim:
                admitted_at = self.s.admitted[name].admitted_at
                size = (v.shape.gpu_demand_milli * len(members), v.shape.cpu_milli * len(members))
                evict.append(((vp, not reclaim, -admitted_at, size, name), ("evict", name, None)))
        shrink.sort(key=lambda x: x[0])
        evict.sort(key=lambda x: x[0])
        return [c for _, c in shrink] + [c for _, c in evict]

    def _flavors_of(self, name: str) -> frozenset:
        """The flavors whose nodes hold a member of this workload (as admitted before the
        step), once per pass."""
        got = self._vflavors.get(name)
        if got is None:
            rows = [self.pool.pos[m.node] for m in self.s.admitted[name].members
                    if m.node in self.pool.pos]
            got = self._vflavors[name] = frozenset(
                f for f, mask in self.flavor_mask.items() if mask[rows].any())
        return got

    def _victim_index(self):
        """The workloads admitted before this step (only they can be victims), once per pass:
        by priority (ascending, with the priorities for bisecting), by queue, and the elastic
        jobs above their min; `_candidates` scans only the parts that can hold victims."""
        if self._vindex is None:
            recs = sorted((self.prio(a.workload), name, a.workload)  # names are unique: the
                          for name, a in self.s.admitted.items())  # workloads never compared
            by_queue: Dict[str, list] = {}
            for rec in recs:
                by_queue.setdefault(rec[2].queue, []).append(rec)
            self._vindex = (recs, [x[0] for x in recs], by_queue,
                            [rec for rec in recs if rec[2].kind == ELASTIC
                             and len(self.members[rec[1]]) > rec[2].min_size])
        return self._vindex

    def _take(self, victim) -> List[Member]:
        kind, name, member = victim
        if kind == "shrink":
            if member not in self.members[name]:
                return []
            self._take_member(name, member)
            return [member]
        return self._take_all(name)

    def _give(self, victim, taken: List[Member]) -> None:
        kind, name, _ = victim
        for m in taken:
            self._give_member(name, m)
        if kind == "evict":
            self.evicted.discard(name)

    def _preempt_for(self, r: _Request, flavor: str, why: List[str]) -> bool:
        return any(self._preempt_count(r, flavor, count)
                   for count in _descending(r.count) if count >= r.floor)

    def _preempt_count(self, r: _Request, flavor: str, count: int) -> bool:
        queue = self.cfg.queues[r.w.queue]
        over = quota.fits(self.usage, queue, flavor, self._want(r, count))
        candidates = self._candidates(r, flavor, over_quota=over is not None)
        if not candidates:
            return False
        taken: List[Tuple[tuple, List[Member]]] = []
        bindings = None
        tried = False  # a placement was attempted (and failed) since the pool last changed...
        touched = np.zeros(len(self.pool), dtype=bool)  # ...except on these nodes
        for victim in candidates:
            got = self._take(victim)
            if not got:
                continue
            taken.append((victim, got))
            for m in got:
                if m.node in self.pool.pos:
                    touched[self.pool.pos[m.node]] = True
            if quota.fits(self.usage, queue, flavor, self._want(r, count)) is not None:
                continue
            if tried:
                # Placement failed with only the touched nodes different: it can succeed now
                # only if one of them takes a member (a same-node gang: only there).
                if not (self.pool.feasible(r.w.shape)[0] & touched).any():
                    continue
                bindings = self._place(r.w, count, flavor, only=touched)
            else:
                bindings = self._place(r.w, count, flavor)
            if bindings is not None:
                break
            tried = True
            touched[:] = False
        if bindings is None:
            for victim, got in reversed(taken):
                self._give(victim, got)
            return False
        # Give back the victims that turn out not to be needed (the latest ones made it fit).
        self._unplace(r.w.shape, bindings)
        if len(taken) <= FILL_BACK_LIMIT:
            kept = [taken[-1]]
            for victim, got in reversed(taken[:-1]):
                self._give(victim, got)
                trial = None
                if quota.fits(self.usage, queue, flavor, self._want(r, count)) is None:
                    trial = self._place(r.w, count, flavor)
                if trial is not None:
                    self._unplace(r.w.shape, trial)
                else:
                    self._take(victim)
                    kept.append((victim, got))
            taken = kept
        bindings = self._place(r.w, count, flavor)
        assert bindings is not None, "a preemption plan that fitted no longer fits"
        released: Dict[str, List[str]] = {}
        evicted: List[str] = []
        for (kind, name, _), got in taken:
            if kind == "shrink":
                released.setdefault(name, []).extend(m.id for m in got)
            else:
                evicted.append(name)
        reason = f"to make room for {r.w.name} ({r.w.klass}, queue {r.w.queue})"
        for name, ids in released.items():
            if name in evicted:
                continue
            self.decisions.append(Release(name, tuple(sorted(ids, key=_ordinal)),
                                          len(self.members[name]), reason))
        for name in evicted:
            v = self.workload(name)
            self.decisions.append(Preempt(name, f"{reason}; {name} is {v.klass}"))
            self.reasons[name] = f"preempted {reason}; back in its queue"
        parts = []
        if released:
            parts.append("shrank " + ", ".join(f"{n}" for n in released if n not in evicted))
        if evicted:
            parts.append("preempted " + ", ".join(evicted))
        self._commit(r, flavor, bindings, "fits", "after it " + " and ".join(p for p in parts if p))
        return True

    # -- reservation -----------------------------------------------------------------------------

    def _maybe_reserve(self, r: _Request, flavors: List[str], why: List[str]) -> None:
        w = r.w
        current = self.reservation
        if current is not None and current.workload != w.name:
            holder = self.s.pending.get(current.workload)
            if holder is None or self.prio(holder.workload) >= self.prio(w):
                return
        for flavor in flavors:
            nodes = self._reservation_nodes(w, r.count, flavor)
            if nodes is None:
                continue
            if current is not None and current.workload == w.name and set(current.nodes) == set(nodes):
                why.append(f"nodes {', '.join(nodes)} are reserved for it since t={current.since:g}")
            else:
                self.decisions.append(Reserve(w.name, tuple(nodes),
                                              f"{w.name} is the first workload short of room; "
                                              "what runs on these nodes ends and it fits"))
                why.append(f"nodes {', '.join(nodes)} are now reserved for it")
            self.reservation = _Held(w.name, tuple(nodes))
            self.reserved = self._mask(nodes)
            self._release_on_reserved(w, nodes)
            return
        why.append("it would not fit even when the work that ends has ended")
        if current is not None and current.workload == w.name:
            self.decisions.append(Unreserve(w.name, "its reserved nodes no longer suffice"))
            self.reservation, self.reserved = None, self._mask(())
            self.freed += 1

    def _reservation_nodes(self, w: Workload, count: int, flavor: str) -> Optional[List[str]]:
        view = self.pool.copy()
        for name, members in self.members.items():
            if name in self.evicted:
                continue
            v = self.workload(name)
            if v.kind == GANG:
                ending = members
            elif v.kind == ELASTIC:
                ending = [m for m in members if m not in members[:v.min_size]]
            else:
                ending = []
            for m in ending:
                view.unbind(m.binding, v.shape)
        chooser = _FreestNow(self.pool)
        mask = self.flavor_mask[flavor] & ~self.draining
        if w.constraint == SAME_NODE:
            rows = [int(i) for i in np.flatnonzero(mask)]
            rows.sort(key=lambda i: -int(self.pool.gpu_free_total()[i]))
            for i in rows:
                one = np.zeros_like(mask)
                one[i] = True
                got = self._place_all(w.shape, count, one, chooser, view)
                if got is not None:
                    return [self.pool.names[i]]
            return None
        if w.constraint == SAME_ZONE:
            zones: Dict[object, List[int]] = {}
            for i in np.flatnonzero(mask):
                zones.setdefault(self.pool.nodes[i].zone, []).append(int(i))
            for z in sorted(zones, key=str):
                zmask = np.zeros_like(mask)
                zmask[zones[z]] = True
                got = self._place_all(w.shape, count, zmask, chooser, view)
                if got is not None:
                    return sorted({b.node for b in got})
            return None
        got = self._place_all(w.shape, count, mask, chooser, view)
        return None if got is None else sorted({b.node for b in got})

    def _release_on_reserved(self, w: Workload, nodes: Sequence[str]) -> None:
        on = set(nodes)
        for name, members in list(self.members.items()):
            v = self.workload(name)
            if name in self.evicted or v.kind != ELASTIC or name not in self.s.admitted:
                continue
            extra = [m for m in victim_rule.leavers(
                members[1:], len(members) - v.min_size, spot=lambda m: m.spot,
                joined_at=lambda m: m.joined_at, key=lambda m: f"{_ordinal(m.id):012d}") if m.node in on]
            if not extra:
                continue
            for m in extra:
                self._take_member(name, m)
            self.decisions.append(Release(name, tuple(m.id for m in extra), len(self.members[name]),
                                          f"nodes reserved for {w.name}"))

    # -- growth ----------------------------------------------------------------------------------

    def grow(self) -> None:
        waiting = [self.prio(r.w) for r, _ in self.short_of_room if not self.holds_reservation(r.w)]
        floor = max(waiting, default=-math.inf)
        cands = {}
        for name, members in self.members.items():
            w = self.workload(name)
            if name in self.evicted or w.kind != ELASTIC or self.prio(w) <= floor:
                continue
            if w.min_size <= len(self.members[name]) < w.max_size:
                cands[name] = w
        grown: Dict[str, List[Member]] = {}
        while cands:
            def order(name):
                w, n = cands[name], len(self.members[name])
                return (-self.prio(w), self.share(w.queue), -_gain(w, n), n, name)
            name = min(cands, key=order)
            w, n = cands[name], len(self.members[name])
            flavor = self.flavor_of(name)
            if _gain(w, n) < GROWTH_MIN_EFFICIENCY \
                    or quota.fits(self.usage, self.cfg.queues[w.queue], flavor, quota.demand(w.shape)) is not None:
                del cands[name]
                continue
            got = self._place(w, 1, flavor, allow_reserved=False)
            if got is None:
                del cands[name]
                continue
            m = Member(f"{name}/{self.next_id[name]}", got[0], self.now, self._spot(got[0].node))
            self.next_id[name] += 1
            self.members[name].append(m)
            self.usage.change(w.queue, flavor, quota.demand(w.shape))
            grown.setdefault(name, []).append(m)
            if len(self.members[name]) >= w.max_size:
                del cands[name]
        for name, members in grown.items():
            self.decisions.append(Resize(name, tuple(members), len(self.members[name]),
                                         "grown into idle capacity"))

    # -- nodes -----------------------------------------------------------------------------------

    def scale_nodes(self) -> None:
        types = self.cfg.node_types
        if not types:
            return
        have: Dict[str, int] = {}
        for node in self.pool.nodes:
            t = node.labels.get(NODE_TYPE_LABEL)
            if t is not None:
                have[t] = have.get(t, 0) + 1
        fresh = [q for q in self.s.requests if self.now - q.at < self.cfg.timeouts.node_request_s]
        asked = {t: sum(q.count for q in fresh if q.node_type == t) for t in types}
        need: Dict[str, int] = {}
        for_whom: Dict[str, List[str]] = {}
        for r, flavors in self.short_of_room:
            for t in types.values():
                proto = t.node(f"{t.name}-new")
                if not any(self.cfg.flavors[f].matches(proto) for f in flavors):
                    continue
                per = _per_node(proto, r.w.shape, r.count)
                if per == 0:
                    continue
                if r.w.constraint == SAME_NODE and per < r.count:
                    continue
                need[t.name] = need.get(t.name, 0) + math.ceil(r.count / per)
                for_whom.setdefault(t.name, []).append(r.w.name)
                break
        for t, n in need.items():
            room = types[t].max - have.get(t, 0) - asked.get(t, 0)
            count = min(n - asked.get(t, 0), room)
            if count > 0:
                self.decisions.append(RequestNodes(t, count, "for " + ", ".join(for_whom[t])))
        idle_s = self.cfg.timeouts.node_idle_s
        reserved = set(self.reservation.nodes) if self.reservation else set()
        idle = []
        for name, since in self.s.idle_since.items():
            if name in reserved or name not in self.pool.pos or self.now - since < idle_s:
                continue
            i = self.pool.pos[name]
            node = self.pool.nodes[i]
            t = node.labels.get(NODE_TYPE_LABEL)
            if t not in types or self.pool.cpu_free[i] != self.pool.cpu_cap[i] \
                    or self.pool.mem_free[i] != self.pool.mem_cap[i] \
                    or int(self.pool.gpu_free[i].sum()) != int(self.pool.gpu_count[i]) * 1000:
                continue
            idle.append((not node.spot, since, name, t))
        idle.sort()
        release = []
        for _, since, name, t in idle:
            if have[t] > types[t].min:
                have[t] -= 1
                release.append(name)
        if release:
            self.decisions.append(ReleaseNodes(tuple(release),
                                               f"idle for at least {idle_s:g} s"))


class _Held:
    def __init__(self, workload: str, nodes: Tuple[str, ...]):
        self.workload, self.nodes = workload, nodes


def _gain(w: Workload, n: int) -> float:
    """What one more member of an elastic job at n members brings, in members' worth of
    speed at one: the best average over the next GROWTH_LOOKAHEAD members, so a dip in the
    measured curve (the first member on a new node) does not stop growth that pays off."""
    base, one = w.speed(n), w.speed(1)
    return max((w.speed(n + k) - base) / k / one
               for k in range(1, min(GROWTH_LOOKAHEAD, w.max_size - n) + 1))


def _ordinal(member_id: str) -> int:
    return int(member_id.rsplit("/", 1)[1])


def _descending(count: int) -> List[int]:
    out, n = [], count
    while n >= 1:
        out.append(n)
        n //= 2
    return out


def _per_node(node, shape: Shape, limit: int) -> int:
    n = 0
    while n < limit:
        gpus = gpu_choice(node, shape)
        if gpus is None:
            break
        node = allocate(node, shape, gpus)
        n += 1
    return n


def _policy(state: State, d: Derived):
    """The placement policy. FGD and ours keep per-node score caches that hold for one pool
    layout, so one policy object serves every state handed the same Derived (their scores are
    a function of the node's state alone: the decisions stay those of a fresh policy). The
    others are cheap and random draws must not depend on earlier steps: a fresh one each step."""
    name = state.config.placement
    if name not in ("fgd", "ours"):
        return placement.make(name, seed=0)
    mix = state.mix or _mix(state)
    kept = d.memo.get(name)
    if kept is None or kept[0] is not mix:
        kept = d.memo[name] = (mix, placement.make(name, seed=0, mix=mix))
    return kept[1]


def _mix(state: State) -> WorkloadMix:
    shapes = [p.workload.shape for p in state.pending.values()] + \
             [a.workload.shape for a in state.admitted.values()]
    if not shapes:
        shapes = [Shape(cpu_milli=1000)]
    return WorkloadMix.from_shapes(shapes)
