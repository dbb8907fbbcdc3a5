"""The scheduler's state, and the pure functions that change it.

`State` is immutable. What happens outside (a workload submitted or finished, its members
started, a node added or lost, an endpoint asking for replicas) and what `step` decided (via
`apply`) each return a new State. The Ray binding and the simulator call the same functions.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from . import quota
from .config import NODE_TYPE_LABEL, Config
from .decisions import (Admit, Preempt, Release, ReleaseNodes, Requeue, RequestNodes, Reserve,
                        Resize, Step, Unreserve)
from .model import Node, Shape, allocate, can_hold, totals
from .pool import PoolIndex
from .workload import (INFERENCE, SAME_NODE, Admitted, Member, NodeRequest, Pending, Reservation,
                       SubmissionError, Workload, check)


@dataclass(frozen=True)
class State:
    config: Config
    nodes: Mapping[str, Node] = field(default_factory=dict)  # with what is allocated on them
    pending: Mapping[str, Pending] = field(default_factory=dict)
    admitted: Mapping[str, Admitted] = field(default_factory=dict)
    reservation: Optional[Reservation] = None
    idle_since: Mapping[str, float] = field(default_factory=dict)  # nodes with nothing on them
    requests: Tuple[NodeRequest, ...] = ()  # node requests not yet met
    deactivated: Mapping[str, str] = field(default_factory=dict)  # workload -> why
    mix: Optional[object] = None  # fragmentation.WorkloadMix for fgd/ours (None: from the workloads)
    draining: frozenset = frozenset()  # nodes about to go (a spot notice): nothing new goes there

    @classmethod
    def of(cls, config: Config, nodes: Iterable[Node] = (), now: float = 0.0, **kw) -> "State":
        nodes = {n.name: n for n in nodes}
        return cls(config, nodes, idle_since={n: now for n, x in nodes.items() if _empty(x)}, **kw)

    @cached_property
    def usage(self) -> quota.Usage:
        return quota.from_admitted(self.config, self.admitted)

    @cached_property
    def capacity(self) -> quota.Vector:
        t = totals(self.nodes)
        return (t["cpu_milli"], t["memory_mib"], t["gpu_milli"])

    @cached_property
    def queue_order(self) -> Dict[str, Tuple[str, ...]]:
        """Every queue's pending workloads (names) in the order they are considered: higher
        priority first, then first submitted. Handed on from state to state with only the
        changes applied (a queue may hold thousands)."""
        out: Dict[str, List[str]] = {q: [] for q in self.config.queues}
        for name, p in self.pending.items():
            out[p.workload.queue].append(name)
        key = self._order_key
        return {q: tuple(sorted(names, key=key)) for q, names in out.items()}

    def _order_key(self, name: str):
        p = self.pending[name]
        return (-self.config.priorities[p.workload.klass], p.submitted_at, name)

    def priority(self, w: Workload) -> int:
        return self.config.priorities[w.klass]


class Derived:
    """What is computed from a state's nodes, handed from one state to the next while it holds:
    the pool index (a copy with the changed rows reloaded when allocations change), each
    flavor's node mask and the kinds of node (both change only when nodes come or go), and
    `memo`, where `step` keeps placement policies whose score caches stay valid for one pool
    layout. Nodes added or removed, or another config, start afresh. None of it is state:
    a State built from the same fields computes the same values."""

    __slots__ = ("index", "masks", "kinds", "memo")

    def __init__(self, index: PoolIndex, masks=None, kinds=None, memo=None):
        self.index, self.masks, self.kinds = index, masks, kinds
        self.memo = {} if memo is None else memo


def derived(state: State) -> Derived:
    d = state.__dict__.get("_derived")
    if d is None:
        d = state.__dict__["_derived"] = Derived(PoolIndex(state.nodes, seed=0))
    return d


def _next(state: State, changed: Optional[Dict[str, Node]] = None, **changes) -> State:
    """`replace(state, **changes)`, handing on what was derived from its nodes (`changed`: nodes
    whose allocation changed, already in changes["nodes"])."""
    new = replace(state, **changes)
    if "usage" in state.__dict__ and new.config is state.config:
        new.__dict__["usage"] = _reuse(state, new) if "admitted" in changes else state.usage
    if "queue_order" in state.__dict__ and new.config is state.config:
        new.__dict__["queue_order"] = _reorder(state, new) if "pending" in changes \
            else state.queue_order
    d = state.__dict__.get("_derived")
    if d is not None and new.config is state.config:
        if changed:
            index = d.index.copy()
            for node in changed.values():
                index.replace(node)
            d = Derived(index, d.masks, d.kinds, d.memo)
        new.__dict__["_derived"] = d
    return new


def _reuse(old: State, new: State) -> quota.Usage:
    """`new.usage` from `old.usage` and the admitted workloads that changed in between."""
    usage = old.usage.copy()
    was, now = old.admitted, new.admitted
    for name, a in was.items():
        if now.get(name) is not a:
            usage.change(a.workload.queue, a.flavor, quota.demand(a.workload.shape, a.size), -1)
    for name, a in now.items():
        if was.get(name) is not a:
            usage.change(a.workload.queue, a.flavor, quota.demand(a.workload.shape, a.size))
    return usage


def _reorder(old: State, new: State) -> Dict[str, Tuple[str, ...]]:
    """`new.queue_order` from `old.queue_order` and what changed in between."""
    was, now = old.pending, new.pending
    gone = set(was.keys() - now.keys())
    came = set(now.keys() - was.keys())
    for name, p in now.items():
        q = was.get(name)
        if q is not None and q is not p and (
                q.submitted_at != p.submitted_at or q.workload.klass != p.workload.klass
                or q.workload.queue != p.workload.queue):
            gone.add(name)
            came.add(name)
    order = dict(old.queue_order)
    if not gone and not came:
        return order
    touched: Dict[str, List[str]] = {}
    for name in gone:
        queue = was[name].workload.queue
        if queue not in touched:
            touched[queue] = [n for n in order[queue] if n not in gone]
    key = new._order_key
    for name in sorted(came):
        queue = now[name].workload.queue
        if queue not in touched:
            touched[queue] = [n for n in order[queue] if n not in gone]
        bisect.insort(touched[queue], name, key=key)
    for queue, names in touched.items():
        order[queue] = tuple(names)
    return order


def _empty(node: Node) -> bool:
    return node.used_cpu_milli == 0 and node.used_memory_mib == 0 and \
        all(g.used_milli == 0 and g.used_memory_mib == 0 for g in node.gpus)


# ---- what happens outside ----------------------------------------------------------------------

def submit(state: State, w: Workload, now: float) -> State:
    """Queue a workload. Raises SubmissionError (nothing changes) for a spec the scheduler could
    never admit: bad sizes, an unknown queue or priority class, a member no node (or node type)
    can ever hold."""
    check(w)
    where = f"workload {w.name!r}"
    if w.name in state.pending or w.name in state.admitted:
        raise SubmissionError(f"{where} already exists; pick another name or finish it first")
    queue = state.config.queues.get(w.queue)
    if queue is None:
        raise SubmissionError(f"{where}: unknown queue {w.queue!r}; known queues: "
                              f"{', '.join(state.config.queues)}")
    if w.klass not in state.config.priorities:
        raise SubmissionError(f"{where}: unknown priority class {w.klass!r}; known: "
                              f"{', '.join(state.config.priorities)}")
    if not holdable(state, w):
        raise SubmissionError(f"{where}: no node or node type of queue {w.queue}'s flavors can "
                              f"hold {_members(w.min_size if w.constraint != SAME_NODE else w.max_size)}"
                              f" of {describe(w.shape)}"
                              + (" on one node" if w.constraint == SAME_NODE else ""))
    pending = dict(state.pending)
    pending[w.name] = Pending(w, now)
    deactivated = {k: v for k, v in state.deactivated.items() if k != w.name}
    return _next(state, pending=pending, deactivated=deactivated)


def _members(n: int) -> str:
    return f"{n} member" + ("" if n == 1 else "s")


def describe(shape: Shape) -> str:
    parts = []
    if shape.gpus:
        parts.append(f"{shape.gpus} GPU" + ("" if shape.gpus == 1 else "s"))
    if shape.gpu_milli:
        parts.append(f"{shape.gpu_milli / 1000:g} of a GPU")
    if shape.gpu_demand_milli and shape.gpu_memory_mib:
        parts.append(f"{shape.gpu_memory_mib / 1024:g} GiB GPU memory")
    if shape.gpu_model:
        parts.append(f"model {shape.gpu_model}")
    if shape.cpu_milli:
        parts.append(f"{shape.cpu_milli / 1000:g} CPU")
    if shape.memory_mib:
        parts.append(f"{shape.memory_mib / 1024:g} GiB memory")
    return ", ".join(parts) or "nothing"


def prototypes(state: State) -> List[Node]:
    """One empty node of every kind the pool has or may get."""
    d = derived(state)
    if d.kinds is None:
        d.kinds = _prototypes(state)
    return d.kinds


def _prototypes(state: State) -> List[Node]:
    seen, out = set(), []
    for node in list(state.nodes.values()) + [t.node(t.name) for t in state.config.node_types.values()]:
        key = (node.cpu_milli, node.memory_mib, tuple((g.model, g.memory_mib) for g in node.gpus),
               tuple(sorted(node.labels.items())))
        if key not in seen:
            seen.add(key)
            out.append(Node(node.name, node.cpu_milli, node.memory_mib,
                            tuple(replace(g, used_milli=0, used_memory_mib=0) for g in node.gpus),
                            node.labels))
    return out


def holdable(state: State, w: Workload) -> bool:
    """Whether some node kind in one of the queue's flavors can ever hold a member (a same-node
    gang: all of them at once)."""
    queue = state.config.queues[w.queue]
    flavors = [state.config.flavors[qf.flavor] for qf in queue.flavors]
    for node in prototypes(state):
        if not any(f.matches(node) for f in flavors):
            continue
        if w.constraint == SAME_NODE:
            if _fits_many(node, w.shape, w.max_size):
                return True
        elif can_hold(node, w.shape):
            return True
    return False


def _fits_many(node: Node, shape: Shape, count: int) -> bool:
    from .model import gpu_choice
    for _ in range(count):
        gpus = gpu_choice(node, shape)
        if gpus is None:
            return False
        node = allocate(node, shape, gpus)
    return True


def restore(state: State, w: Workload, flavor: str, members: Tuple[Member, ...], now: float,
            submitted_at: float, next_member: int, ready: bool) -> State:
    """A workload admitted before this state existed (a restarted controller reads it back):
    admitted with these members, its member numbering and readiness as they were."""
    state = submit(state, w, submitted_at)
    state = apply(state, Step((Admit(w.name, flavor, members, "restored"),), {}, now))
    a = state.admitted[w.name]
    a = replace(a, next_member=max(next_member, a.next_member), ready=ready)
    return _next(state, admitted={**state.admitted, w.name: a})


def finish(state: State, name: str, now: float) -> State:
    """A workload ended (or was cancelled): its capacity is free."""
    if name in state.admitted:
        state = _evict(state, name, now)
    pending = {k: v for k, v in state.pending.items() if k != name}
    reservation = state.reservation if state.reservation is None or \
        state.reservation.workload != name else None
    return _next(state, pending=pending, reservation=reservation)


def mark_ready(state: State, name: str) -> State:
    """Every member of an admitted workload started (Kueue's PodsReady)."""
    a = state.admitted.get(name)
    if a is None or a.ready:
        return state
    return _next(state, admitted={**state.admitted, name: replace(a, ready=True)})


def set_replicas(state: State, name: str, replicas: int, now: float,
                 keep: Iterable[str] = ()) -> State:
    """An endpoint asks for a new replica count (above its size it grows at the next step,
    below it members leave now: first those on nodes not in `keep`, where the serving layer
    still runs replicas (one entry per replica), then the newest)."""
    if replicas < 1:
        raise SubmissionError(f"workload {name!r}: replicas must be at least 1, got {replicas}")
    if name in state.pending:
        p = state.pending[name]
        w = replace(p.workload, max_size=replicas, min_size=min(p.workload.min_size, replicas))
        return _next(state, pending={**state.pending, name: replace(p, workload=w)})
    a = state.admitted.get(name)
    if a is None:
        raise SubmissionError(f"workload {name!r} is neither pending nor running")
    w = replace(a.workload, max_size=replicas, min_size=min(a.workload.min_size, replicas))
    state = _next(state, admitted={**state.admitted, name: replace(a, workload=w)})
    if a.size > replicas:
        from collections import Counter
        running = Counter(keep)
        kept, spare = [], []
        for m in a.members:
            if running[m.node] > 0:
                running[m.node] -= 1
                kept.append(m)
            else:
                spare.append(m)
        stay = {m.id for m in (kept + spare)[:replicas]}
        state = _remove_members(state, name, tuple(m.id for m in a.members if m.id not in stay),
                                now)
    return state


def rebind(state: State, name: str, nodes: Iterable[str], now: float) -> State:
    """Where an endpoint's replicas really run (`nodes`, one entry per running replica): Ray
    Serve places replicas itself, so a member the core put on one node may run on another, and
    Serve chooses which replica goes when it scales down. A member on a node that runs none of
    the replicas moves to a node that runs one no member accounts for, if it fits there. The
    member count does not change here (`set_replicas` does that)."""
    from collections import Counter
    from .model import Binding, gpu_choice
    a = state.admitted.get(name)
    if a is None or a.workload.kind != INFERENCE:
        return state
    unclaimed = Counter(n for n in nodes if n in state.nodes)
    astray = []
    for m in a.members:
        if unclaimed[m.node] > 0:
            unclaimed[m.node] -= 1
        else:
            astray.append(m)
    targets = [n for n, count in sorted(unclaimed.items()) for _ in range(count)]
    if not astray or not targets:
        return state
    shape = a.workload.shape
    changed: Dict[str, Node] = {}
    moved: Dict[str, Member] = {}
    for m, target in zip(astray, targets):
        node = changed.get(target) or state.nodes[target]
        gpus = gpu_choice(node, shape)
        if gpus is None:  # the core gave that room to someone else: the member stays put
            continue
        changed[target] = allocate(node, shape, gpus)
        if m.node in state.nodes:
            old = changed.get(m.node) or state.nodes[m.node]
            changed[m.node] = allocate(old, shape, m.binding.gpu_indices, sign=-1)
        moved[m.id] = replace(m, binding=Binding(target, gpus))
    if not moved:
        return state
    a = replace(a, members=tuple(moved.get(m.id, m) for m in a.members))
    return _with_nodes(state, changed, now, admitted={**state.admitted, name: a})


def add_node(state: State, node: Node, now: float) -> State:
    nodes = {**state.nodes, node.name: node}
    requests = list(state.requests)
    kind = node.labels.get(NODE_TYPE_LABEL)
    for i, r in enumerate(requests):
        if r.node_type == kind:
            requests[i] = replace(r, count=r.count - 1)
            break
    idle = {**state.idle_since, node.name: now} if _empty(node) else dict(state.idle_since)
    return replace(state, nodes=nodes, idle_since=idle,
                   requests=tuple(r for r in requests if r.count > 0))


def drain_node(state: State, name: str) -> State:
    """A node is going away soon (a spot node's preemption notice): what runs there stays until
    it goes; nothing new is placed there."""
    if name not in state.nodes or name in state.draining:
        return state
    return replace(state, draining=state.draining | {name})


def remove_node(state: State, name: str, now: float) -> State:
    """A node is gone (released, preempted by the cloud, failed): a gang with a member there is
    back in its queue; an elastic job or endpoint loses those members (the next step brings it
    back to its size if it can)."""
    for wname, a in list(state.admitted.items()):
        lost = tuple(m.id for m in a.members if m.node == name)
        if not lost:
            continue
        if a.workload.resizable and len(lost) < a.size:
            state = _remove_members(state, wname, lost, now)
        else:
            state = _evict(state, wname, now, reason=f"lost node {name}")
    nodes = {k: v for k, v in state.nodes.items() if k != name}
    idle = {k: v for k, v in state.idle_since.items() if k != name}
    reservation = state.reservation
    if reservation is not None and name in reservation.nodes:
        reservation = None  # chosen again at the next step
    return replace(state, nodes=nodes, idle_since=idle, reservation=reservation,
                   draining=state.draining - {name})


# ---- carrying out a step -----------------------------------------------------------------------

def apply(state: State, step: Step) -> State:
    """The state after the step's decisions were carried out (node requests are recorded; nodes
    appear with `add_node` when the cloud delivers them)."""
    now = step.now
    for d in step.decisions:
        if isinstance(d, Requeue):
            state = _evict(state, d.workload, now, requeue=d)
        elif isinstance(d, Release):
            state = _remove_members(state, d.workload, d.members, now)
        elif isinstance(d, Preempt):
            state = _evict(state, d.workload, now, reason=d.reason)
        elif isinstance(d, Admit):
            p = state.pending[d.workload]
            a = Admitted(p.workload, d.flavor, (), now, submitted_at=p.submitted_at,
                         requeues=p.requeues)
            state = _next(state, pending={k: v for k, v in state.pending.items() if k != d.workload},
                          admitted={**state.admitted, d.workload: a})
            state = _add_members(state, d.workload, d.members, now)
            if state.reservation is not None and state.reservation.workload == d.workload:
                state = _next(state, reservation=None)
        elif isinstance(d, Resize):
            state = _add_members(state, d.workload, d.added, now)
        elif isinstance(d, Reserve):
            state = _next(state, reservation=Reservation(d.workload, d.nodes, now))
        elif isinstance(d, Unreserve):
            state = _next(state, reservation=None)
        elif isinstance(d, RequestNodes):
            state = _next(state, requests=state.requests + (NodeRequest(d.node_type, d.count, now),))
        elif isinstance(d, ReleaseNodes):
            for name in d.nodes:
                state = remove_node(state, name, now)
    if step.reasons:
        pending = dict(state.pending)
        for name, reason in step.reasons.items():
            if name in pending and pending[name].last_reason != reason:
                pending[name] = replace(pending[name], last_reason=reason)
        state = _next(state, pending=pending)
    return state


def expire_requests(state: State, now: float) -> State:
    keep = tuple(r for r in state.requests if now - r.at < state.config.timeouts.node_request_s)
    return state if keep == state.requests else _next(state, requests=keep)


def _with_nodes(state: State, changed: Dict[str, Node], now: float, **changes) -> State:
    nodes = {**state.nodes, **changed}
    idle = dict(state.idle_since)
    for name, node in changed.items():
        if _empty(node):
            idle.setdefault(name, now)
        else:
            idle.pop(name, None)
    return _next(state, changed, nodes=nodes, idle_since=idle, **changes)


def _add_members(state: State, name: str, members: Tuple[Member, ...], now: float) -> State:
    a = state.admitted[name]
    shape = a.workload.shape
    changed: Dict[str, Node] = {}
    for m in members:
        node = changed.get(m.node) or state.nodes[m.node]
        changed[m.node] = allocate(node, shape, m.binding.gpu_indices)
    n = a.next_member + len(members)
    a = replace(a, members=a.members + tuple(members), next_member=n)
    return _with_nodes(state, changed, now, admitted={**state.admitted, name: a})


def _remove_members(state: State, name: str, ids: Tuple[str, ...], now: float) -> State:
    a = state.admitted[name]
    shape = a.workload.shape
    changed: Dict[str, Node] = {}
    gone = set(ids)
    for m in a.members:
        if m.id in gone and m.node in state.nodes:
            node = changed.get(m.node) or state.nodes[m.node]
            changed[m.node] = allocate(node, shape, m.binding.gpu_indices, sign=-1)
    a = replace(a, members=tuple(m for m in a.members if m.id not in gone))
    return _with_nodes(state, changed, now, admitted={**state.admitted, name: a})


def _evict(state: State, name: str, now: float, reason: str = "",
           requeue: Optional[Requeue] = None) -> State:
    a = state.admitted[name]
    state = _remove_members(state, name, tuple(m.id for m in a.members), now)
    admitted = {k: v for k, v in state.admitted.items() if k != name}
    pending = dict(state.pending)
    deactivated = dict(state.deactivated)
    if requeue is not None and requeue.deactivate:
        deactivated[name] = requeue.reason
    else:
        requeues = a.requeues + (1 if requeue is not None else 0)
        pending[name] = Pending(a.workload, a.submitted_at if requeue is None else now, requeues,
                                requeue.retry_at if requeue is not None else 0.0, reason)
    return _next(state, admitted=admitted, pending=pending, deactivated=deactivated)
