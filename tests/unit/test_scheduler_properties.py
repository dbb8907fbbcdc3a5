"""Random clusters, workloads and events through step/apply: the scheduler's invariants hold after
every decision. Derandomized and bounded so CI runs the same examples every time; set
SCHEDULER_EXAMPLES to search more (e.g. 2000) when changing the policy."""
import dataclasses
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_statistic
from hypothesis import strategies as st

from integrations.ray.scheduler import (Admit, Gpu, Node, Release, Reserve, Resize, Shape, State,
                                        SubmissionError, Workload, add_node, apply, finish,
                                        mark_ready, parse, remove_node, set_replicas, step,
                                        submit)
from integrations.ray.scheduler.config import RESOURCES

EXAMPLES = int(os.environ.get("SCHEDULER_EXAMPLES", "300"))
GIB = 1024

node_st = st.builds(
    lambda i, gpus, mem, cpu, spot, zone: Node(
        f"n{i}", cpu * 1000, 64 * GIB, tuple(Gpu("A100", mem * GIB) for _ in range(gpus)),
        {"capacity-type": "spot" if spot else "on-demand", "zone": zone}),
    st.integers(0, 10 ** 6), st.sampled_from([0, 1, 2, 4, 8]), st.sampled_from([16, 40, 80]),
    st.sampled_from([8, 32, 64]), st.booleans(), st.sampled_from(["a", "b"]))

shape_st = st.one_of(
    st.builds(lambda g, c: Shape(cpu_milli=c * 1000, gpus=g), st.integers(1, 4), st.integers(0, 8)),
    st.builds(lambda m, mem, c: Shape(cpu_milli=c * 500, gpu_milli=m, gpu_memory_mib=mem * GIB),
              st.sampled_from([100, 250, 500, 700]), st.integers(0, 30), st.integers(0, 4)),
    st.builds(lambda c, mem: Shape(cpu_milli=c * 1000, memory_mib=mem * GIB), st.integers(1, 16),
              st.integers(0, 16)))


@st.composite
def workload_st(draw, i):
    kind = draw(st.sampled_from(["gang", "elastic", "inference"]))
    shape = draw(shape_st)
    queue = draw(st.sampled_from(["team-a", "team-b", "solo"]))
    cls = draw(st.sampled_from([None, "batch", "training", "inference"]))
    if kind == "gang":
        return Workload.gang(f"w{i}", draw(st.integers(1, 4)), shape, queue=queue, priority_class=cls,
                             constraint=draw(st.sampled_from([None, None, "same-node", "same-zone"])))
    if kind == "elastic":
        low = draw(st.integers(1, 3))
        return Workload.elastic(f"w{i}", low, low + draw(st.integers(0, 5)), shape, queue=queue,
                                priority_class=cls)
    return Workload.inference(f"w{i}", draw(st.integers(1, 5)), shape, queue=queue,
                              priority_class=cls)


CONFIG = parse({
    "cohorts": [{"name": "c"}],
    "clusterQueues": [
        {"name": "team-a", "cohort": "c", "flavors": [{"name": "default", "resources": {
            "gpu": {"nominalQuota": 6, "borrowingLimit": 4}, "cpu": {"nominalQuota": 64}}}]},
        {"name": "team-b", "cohort": "c", "flavors": [{"name": "default", "resources": {
            "gpu": {"nominalQuota": 6, "lendingLimit": 3}}}]},
        {"name": "solo", "queueingStrategy": "StrictFIFO", "flavors": [{"name": "default", "resources": {
            "gpu": {"nominalQuota": 4}}}]}],
    "timeouts": {"waitForReadySeconds": 5, "requeueBaseSeconds": 2, "requeueLimit": 2},
})


def check_nodes(state):
    expect = {n: [0, 0, [0] * len(x.gpus), [0] * len(x.gpus)] for n, x in state.nodes.items()}
    for a in state.admitted.values():
        s = a.workload.shape
        for m in a.members:
            row = expect[m.node]
            row[0] += s.cpu_milli
            row[1] += s.memory_mib
            for j in m.binding.gpu_indices:
                row[2][j] += 1000 if s.gpus else s.gpu_milli
                row[3][j] += s.gpu_memory_mib
    for name, node in state.nodes.items():
        cpu, mem, milli, gmem = expect[name]
        assert (node.used_cpu_milli, node.used_memory_mib) == (cpu, mem), name
        assert [g.used_milli for g in node.gpus] == milli and [g.used_memory_mib for g in node.gpus] == gmem
        assert node.used_cpu_milli <= node.cpu_milli and node.used_memory_mib <= node.memory_mib
        assert all(g.used_milli <= 1000 and g.used_memory_mib <= g.memory_mib for g in node.gpus), name


def check_quota(state):
    usage = state.usage
    for q in CONFIG.queues.values():
        for qf in q.flavors:
            row = usage.get(q.name, qf.flavor)
            for r, resource in enumerate(RESOURCES):
                quota = qf.quotas.get(resource)
                if quota is None:
                    continue
                limit = quota.nominal if q.cohort is None else \
                    quota.nominal + (quota.borrowing_limit if quota.borrowing_limit is not None else 10 ** 9)
                assert row[r] <= limit, (q.name, resource, row[r], limit)
    for r, resource in enumerate(RESOURCES):
        capacity, used = usage.pool("c", "default", r)
        assert used <= capacity, (resource, used, capacity)


def check_workloads(state, before, result):
    for name, a in state.admitted.items():
        w = a.workload
        assert a.size <= w.max_size
        if w.kind == "gang":
            assert a.size == w.max_size, name
            if w.constraint == "same-node":
                assert len({m.node for m in a.members}) == 1
            if w.constraint == "same-zone":
                assert len({state.nodes[m.node].zone for m in a.members}) == 1
    assert set(result.reasons) >= set(state.pending), "a pending workload without a reason"
    assert all(result.reasons[n] for n in state.pending)
    for d in result.decisions:
        if isinstance(d, Release):
            w = before.admitted[d.workload].workload
            assert d.size >= min(w.min_size, before.admitted[d.workload].size)
            assert before.admitted[d.workload].members[0].id not in d.members, "rank 0 released"
    reservation = before.reservation
    # While a reservation holds (its workload not admitted and no new one made in this step),
    # nothing else starts on its nodes; once its workload is admitted it is over.
    if reservation is not None and not any(
            isinstance(d, Reserve) or (isinstance(d, Admit) and d.workload == reservation.workload)
            for d in result.decisions):
        held = set(reservation.nodes)
        for d in result.decisions:
            if isinstance(d, Admit) and d.workload != reservation.workload:
                assert not {m.node for m in d.members} & held, "backfill on a reserved node"
            if isinstance(d, Resize):
                assert not {m.node for m in d.added} & held, "growth on a reserved node"


event_st = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 40)),
    st.tuples(st.just("submit"), st.integers(0, 40)),
    st.tuples(st.just("submit"), st.integers(0, 40)),
    st.tuples(st.just("step"), st.booleans()),
    st.tuples(st.just("step"), st.booleans()),
    st.tuples(st.just("finish"), st.integers(0, 40)),
    st.tuples(st.just("lose"), st.integers(0, 10)),
    st.tuples(st.just("add"), st.integers(0, 10)),
    st.tuples(st.just("replicas"), st.integers(0, 40), st.integers(1, 6)))


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(nodes=st.lists(node_st, min_size=1, max_size=6, unique_by=lambda n: n.name),
       events=st.lists(event_st, min_size=10, max_size=60), data=st.data())
def test_invariants_hold_after_every_decision(nodes, events, data):
    state = State.of(CONFIG, nodes)
    now, submitted = 0.0, 0
    spare = [n for n in nodes]
    for event in events:
        now += 1
        kind = event[0]
        if kind == "submit":
            w = data.draw(workload_st(submitted))
            submitted += 1
            try:
                state = submit(state, w, now)
            except SubmissionError:
                continue
        elif kind == "step":
            before = state
            result = step(state, now)
            # What a state hands on to the next (pool index, masks, policy caches) changes
            # nothing: the same state built afresh decides the same.
            assert step(dataclasses.replace(state), now) == result
            state = apply(state, result)
            check_workloads(state, before, result)
            if event[1]:
                for d in result.decisions:
                    if isinstance(d, Admit):
                        state = mark_ready(state, d.workload)
        elif kind == "finish":
            names = sorted(state.admitted) + sorted(state.pending)
            if names:
                state = finish(state, names[event[1] % len(names)], now)
        elif kind == "lose":
            if len(state.nodes) > 1:
                name = sorted(state.nodes)[event[1] % len(state.nodes)]
                state = remove_node(state, name, now)
        elif kind == "add":
            missing = [n for n in spare if n.name not in state.nodes]
            if missing:
                state = add_node(state, missing[event[1] % len(missing)], now)
        elif kind == "replicas":
            names = [n for n, a in state.admitted.items() if a.workload.kind == "inference"]
            if names:
                state = set_replicas(state, names[event[1] % len(names)], event[2], now)
        check_nodes(state)
        check_quota(state)
        # the queue order handed on from state to state is the one computed afresh
        fresh = dataclasses.replace(state)
        assert state.queue_order == fresh.queue_order
        assert {k: v for k, v in state.usage.table.items() if any(v)} == \
            {k: v for k, v in fresh.usage.table.items() if any(v)}
    note_statistic(f"admitted at the end: {min(len(state.admitted), 5)}+")
