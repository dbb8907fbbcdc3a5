"""The cluster scheduler's rules, one hand-made state at a time (integrations/ray/scheduler)."""
import pytest

from integrations.ray.scheduler import (Admit, Config, ConfigError, Gpu, Node, Preempt, Release,
                                        ReleaseNodes, Requeue, RequestNodes, Reserve, Resize,
                                        Shape, State, SubmissionError, Workload, add_node, apply,
                                        finish, mark_ready, parse, rebind, remove_node, set_replicas,
                                        step, submit)
from integrations.ray.scheduler.config import load
from integrations.ray.scheduler.model import Binding
from integrations.ray.scheduler.decisions import Step
from integrations.ray.scheduler.workload import Member

GIB = 1024


def gpu_node(name, gpus=8, cpu=64, mem=512, model="A100", gpu_mem=80, **labels):
    return Node(name, cpu * 1000, mem * GIB, tuple(Gpu(model, gpu_mem * GIB) for _ in range(gpus)),
                {k.replace("_", "-"): v for k, v in labels.items()})


def run(state, now, ready=True):
    """One step applied; admitted workloads report their members started."""
    result = step(state, now)
    state = apply(state, result)
    if ready:
        for d in result.decisions:
            if isinstance(d, Admit):
                state = mark_ready(state, d.workload)
    return state, result


def sizes(state):
    return {name: a.size for name, a in state.admitted.items()}


def used_gpus(state):
    return sum(g.used_milli for n in state.nodes.values() for g in n.gpus) / 1000


# ---- placement of gangs -------------------------------------------------------------------------

def test_a_gang_is_placed_whole_or_not_at_all():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b")])
    state = submit(state, Workload.gang("three", 3, Shape(gpus=8, cpu_milli=1000)), 0)
    state, result = run(state, 1)
    assert result.of(Admit) == () and used_gpus(state) == 0
    assert "no room for 3 members of 8 GPUs" in result.reasons["three"]
    state = submit(state, Workload.gang("two", 2, Shape(gpus=8, cpu_milli=1000)), 2)
    state, result = run(state, 3)
    [admit] = result.of(Admit)
    assert admit.workload == "two" and len(admit.members) == 2 and used_gpus(state) == 16


def test_same_node_and_same_zone_constraints():
    nodes = [gpu_node(f"{z}{i}", zone=z) for z in "ab" for i in range(4)]
    state = State.of(Config.default(), nodes)
    state = submit(state, Workload.gang("filler", 1, Shape(gpus=6)), 0)
    state, _ = run(state, 1)
    state = submit(state, Workload.gang("pair", 2, Shape(gpus=4), constraint="same-node"), 2)
    state = submit(state, Workload.gang("zonal", 3, Shape(gpus=5), constraint="same-zone"), 2)
    state, result = run(state, 3)
    members = {d.workload: d.members for d in result.of(Admit)}
    assert len({m.node for m in members["pair"]}) == 1
    # 5 GPUs each: three nodes of one zone (some zone has three nodes free).
    zones = {state.nodes[m.node].zone for m in members["zonal"]}
    assert len(zones) == 1 and len({m.node for m in members["zonal"]}) == 3
    with pytest.raises(SubmissionError, match="on one node"):
        submit(state, Workload.gang("huge", 3, Shape(gpus=4), constraint="same-node"), 4)


# ---- quotas -------------------------------------------------------------------------------------

COHORT = """
resourceFlavors: [{name: a100, nodeLabels: {gpu-model: A100}}]
cohorts: [{name: research}]
clusterQueues:
  - name: team-a
    cohort: research
    flavors: [{name: a100, resources: {gpu: {nominalQuota: 8, borrowingLimit: 4}}}]
  - name: team-b
    cohort: research
    flavors: [{name: a100, resources: {gpu: {nominalQuota: 8, lendingLimit: 6}}}]
"""


def quota_state():
    import yaml
    return State.of(parse(yaml.safe_load(COHORT)), [gpu_node(f"n{i}") for i in range(4)])


def queue_gpus(state, queue):
    return sum(a.size * a.workload.shape.gpus for a in state.admitted.values()
               if a.workload.queue == queue)


def test_quota_and_borrowing_limits_are_never_exceeded():
    state = quota_state()
    for i in range(8):
        state = submit(state, Workload.gang(f"a{i}", 1, Shape(gpus=2), queue="team-a"), i)
    state, result = run(state, 10)
    # 8 nominal + 4 borrowing limit = 12 GPUs, 6 members; the rest wait with the reason.
    assert queue_gpus(state, "team-a") == 12
    waiting = [n for n in result.reasons if n.startswith("a")]
    assert waiting and all("borrowing limit" in result.reasons[n] or "considered" in result.reasons[n]
                           for n in waiting)
    # team-b lends at most 6 of its 8: with team-a's limit raised, team-a still stops at 8 + 6.
    raised = parse(__import__("yaml").safe_load(COHORT.replace("borrowingLimit: 4", "borrowingLimit: 16")))
    state = State.of(raised, [gpu_node(f"n{i}") for i in range(4)])
    for i in range(10):
        state = submit(state, Workload.gang(f"a{i}", 1, Shape(gpus=2), queue="team-a"), i)
    state, result = run(state, 10)
    assert queue_gpus(state, "team-a") == 14
    assert "cohort research has 0 GPUs spare" in " ".join(result.reasons.values())


def test_reclaim_returns_borrowed_quota():
    state = quota_state()
    for i in range(6):  # 12 GPUs: 4 of them borrowed from team-b
        state = submit(state, Workload.gang(f"a{i}", 1, Shape(gpus=2), queue="team-a"), i)
    state, _ = run(state, 10)
    assert queue_gpus(state, "team-a") == 12
    # team-b asks for its nominal 8 GPUs: the cohort has 8+6 lendable... team-a gives back 2 of
    # what it borrowed (the newest), no more.
    state = submit(state, Workload.gang("b", 4, Shape(gpus=2), queue="team-b"), 20)
    state, result = run(state, 21)
    preempted = [d.workload for d in result.of(Preempt)]
    assert [d.workload for d in result.of(Admit)] == ["b"]
    assert len(preempted) == 2 and set(preempted) <= {f"a{i}" for i in range(6)}
    assert queue_gpus(state, "team-b") == 8 and queue_gpus(state, "team-a") == 8
    # The preempted workloads are back in team-a's queue, keeping their place.
    assert set(preempted) <= set(state.pending)


def test_a_queue_without_a_cohort_stops_at_its_nominal_quota():
    config = parse({"clusterQueues": [{"name": "q", "flavors": [
        {"name": "default", "resources": {"gpu": {"nominalQuota": 4}, "cpu": "8"}}]}]})
    state = State.of(config, [gpu_node("n")])
    for i in range(3):
        state = submit(state, Workload.gang(f"w{i}", 1, Shape(gpus=2, cpu_milli=1000), queue="q"), i)
    state, result = run(state, 5)
    assert sorted(sizes(state)) == ["w0", "w1"]
    assert result.reasons["w2"] == ("queue q over nominal gpu quota in flavor default "
                                    "(4 GPUs of 4 GPUs used, 2 GPUs more asked)")


# ---- preemption ---------------------------------------------------------------------------------

def test_elastic_jobs_shrink_before_any_gang_is_evicted():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b")])
    state = submit(state, Workload.gang("batch", 1, Shape(gpus=4)), 0)
    state = submit(state, Workload.elastic("train", 2, 6, Shape(gpus=2), priority_class="batch"), 0)
    state, _ = run(state, 1)
    state, _ = run(state, 2)
    assert sizes(state) == {"batch": 1, "train": 6}  # 4 + 12 = 16 GPUs: full
    # An endpoint needs 4 GPUs: two members of the elastic job leave; the gang stays.
    state = submit(state, Workload.inference("serve", 2, Shape(gpus=2)), 3)
    state, result = run(state, 4)
    [release] = result.of(Release)
    assert release.workload == "train" and len(release.members) == 2 and release.size == 4
    assert result.of(Preempt) == () and sizes(state) == {"batch": 1, "train": 4, "serve": 2}
    # More replicas: the elastic job goes down to its min, and only then is the gang evicted.
    state = set_replicas(state, "serve", 6, 5)
    state, result = run(state, 6)
    assert sizes(state)["train"] == 2 and "batch" not in state.admitted
    assert [d.workload for d in result.of(Preempt)] == ["batch"]
    assert sizes(state)["serve"] == 6 and used_gpus(state) == 16


def test_victims_are_the_cheapest_and_no_more_than_needed():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b")])
    for name, gpus in (("small", 2), ("medium", 6), ("large", 8)):
        state = submit(state, Workload.gang(name, 1, Shape(gpus=gpus)), 0)
    state, _ = run(state, 1)
    assert sizes(state) == {"small": 1, "medium": 1, "large": 1}
    # 2 GPUs of training priority: evicting "small" suffices; nothing else is touched.
    state = submit(state, Workload.gang("urgent", 1, Shape(gpus=2), priority_class="training"), 2)
    state, result = run(state, 3)
    assert [d.workload for d in result.of(Preempt)] == ["small"]
    assert "urgent" in state.admitted and "large" in state.admitted and "medium" in state.admitted


def test_equal_priority_never_evicts_and_higher_priority_is_never_a_victim():
    state = State.of(Config.default(), [gpu_node("a")])
    state = submit(state, Workload.inference("serve", 4, Shape(gpus=2)), 0)
    state, _ = run(state, 1)
    state = submit(state, Workload.gang("batch", 1, Shape(gpus=2)), 2)
    state = submit(state, Workload.gang("also-serve", 1, Shape(gpus=2), priority_class="inference"), 2)
    state, result = run(state, 3)
    assert result.of(Preempt) == () and result.of(Release) == ()
    assert set(result.reasons) == {"batch", "also-serve"}


def test_release_follows_the_victim_rule():
    nodes = [gpu_node("od", gpus=4), gpu_node("spot1", gpus=4, capacity_type="spot"),
             gpu_node("spot2", gpus=4, capacity_type="spot")]
    state = State.of(Config.default(), nodes)
    train = Workload.elastic("train", 1, 12, Shape(gpus=1))
    # Rank 0 on spot capacity, the rest joined one by one over the three nodes.
    layout = [("spot1", (0,))] + [(n, (g,)) for g in range(4) for n in ("od", "spot2", "spot1")
                                  if (n, (g,)) != ("spot1", (0,))]
    state = placed(state, train, *layout)
    members = state.admitted["train"].members
    for replicas in (1, 2, 3):
        state = submit(state, Workload.inference(f"serve{replicas}", 1, Shape(gpus=1)), replicas)
        state, result = run(state, replicas)
        [release] = result.of(Release)
        [gone] = [m for m in members if m.id in release.members]
        # Never rank 0 (even on spot), spot before on-demand, the newest first.
        spot_left = sorted((m for m in members[1:] if m.spot and m.id in
                            {x.id for x in state.admitted["train"].members} | {gone.id}),
                           key=lambda m: -m.joined_at)
        assert gone.id != "train/0" and gone.spot and gone == spot_left[0]


# ---- reservation and backfill -------------------------------------------------------------------

def starvation_run(stream: bool, reservation_check=None):
    """Four 8-GPU nodes busy with 4-GPU jobs; a 4-node gang arrives at t=5; while `stream`, a
    new 4-GPU job arrives every time unit. Returns (time the gang was admitted, backfilled jobs)."""
    state = State.of(Config.default(), [gpu_node(f"n{i}") for i in range(4)])
    ends = {}
    for i in range(8):
        state = submit(state, Workload.gang(f"s{i}", 1, Shape(gpus=4)), 0)
        ends[f"s{i}"] = 10 + 5 * i
    big_at, backfilled, seq = None, [], 8
    for t in range(1, 200):
        for name, end in list(ends.items()):
            if end == t and name in state.admitted:
                state = finish(state, name, t)
                del ends[name]
        if t == 5:
            state = submit(state, Workload.gang("big", 4, Shape(gpus=8)), t)
        if stream and t >= 5:
            state = submit(state, Workload.gang(f"s{seq}", 1, Shape(gpus=4)), t)
            ends[f"s{seq}"] = t + 30
            seq += 1
        state, result = run(state, t)
        if reservation_check is not None:
            reservation_check(state, result)
        for d in result.of(Admit):
            if d.workload == "big":
                big_at = t
            elif t > 5:
                backfilled.append(d.workload)
        if big_at is not None:
            return big_at, backfilled
    return big_at, backfilled


def test_a_reservation_stops_starvation_and_backfill_never_delays_it():
    def check(state, result):
        if state.reservation is not None:
            reserved = set(state.reservation.nodes)
            for d in result.of(Admit):
                assert d.workload == "big" or not {m.node for m in d.members} & reserved

    alone, _ = starvation_run(stream=False)
    with_stream, backfilled = starvation_run(stream=True, reservation_check=check)
    # Without reservations the stream of small jobs would take each freed half-node forever.
    assert alone is not None and with_stream == alone
    assert backfilled == []  # every node is reserved here: nothing could go around it


def test_backfill_goes_around_the_reservation():
    state = State.of(Config.default(), [gpu_node(f"n{i}") for i in range(3)])
    state = submit(state, Workload.gang("long", 1, Shape(gpus=4)), 0)
    state = submit(state, Workload.gang("other", 1, Shape(gpus=4)), 0)
    state, _ = run(state, 1)
    occupied = {m.node for a in state.admitted.values() for m in a.members}
    state = submit(state, Workload.gang("big", 3, Shape(gpus=8)), 2)
    state, result = run(state, 3)
    [reserve] = result.of(Reserve)
    assert set(reserve.nodes) == {"n0", "n1", "n2"} and "reserved for it" in result.reasons["big"]
    # Two nodes are partly busy. Small work arrives: it may not use reserved nodes.
    state = submit(state, Workload.gang("small", 1, Shape(gpus=1)), 4)
    state, result = run(state, 5)
    assert "small" not in state.admitted and "reserved for big" in result.reasons["small"]
    assert occupied


def placed(state, workload, *nodes_and_gpus, now=0):
    """A hand-made admission: `workload`'s members on these (node, gpu indices)."""
    state = submit(state, workload, now)
    members = tuple(Member(f"{workload.name}/{i}", Binding(node, tuple(gpus)), now + i * 0.001,
                           state.nodes[node].spot) for i, (node, gpus) in enumerate(nodes_and_gpus))
    state = apply(state, Step((Admit(workload.name, "default", members, "by hand"),), {}, now))
    return mark_ready(state, workload.name)


def test_reservation_releases_elastic_growth_on_its_nodes():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b"), gpu_node("c")])
    state = placed(state, Workload.gang("busy", 1, Shape(gpus=4)), ("a", range(4)))
    # An elastic job of a higher priority: rank 0 on c, grown into the rest.
    train = Workload.elastic("train", 1, 12, Shape(gpus=2), priority_class="inference")
    state = placed(state, train, ("c", (0, 1)), ("a", (4, 5)), ("a", (6, 7)), ("b", (0, 1)),
                   ("b", (2, 3)), ("b", (4, 5)), ("b", (6, 7)), ("c", (2, 3)), ("c", (4, 5)),
                   ("c", (6, 7)))
    assert used_gpus(state) == 24
    state = submit(state, Workload.gang("big", 2, Shape(gpus=8)), 1)
    state, result = run(state, 2)
    # Shrinking train cannot make room now (busy holds half of a); a and b are reserved, and
    # train gives back what it grew into there - even at a higher priority. Its rank 0 stays.
    [reserve] = result.of(Reserve)
    assert sorted(reserve.nodes) == ["a", "b"] and result.of(Preempt) == ()
    [release] = result.of(Release)
    on_reserved = {m.id for m in state.admitted["train"].members if m.node in ("a", "b")}
    assert on_reserved == set() and len(release.members) == 6 and "train/0" not in release.members
    assert "big" not in state.admitted
    state = finish(state, "busy", 3)
    state, result = run(state, 4)
    [admit] = result.of(Admit)
    assert admit.workload == "big" and {m.node for m in admit.members} == {"a", "b"}
    assert state.reservation is None


# ---- fair sharing -------------------------------------------------------------------------------

def test_fair_share_converges_on_the_dominant_share_split():
    # The DRF paper's example: 9 CPUs and 18 GiB; A's members need <1 CPU, 4 GiB>, B's <3 CPU,
    # 1 GiB>. Dominant Resource Fairness gives A three members and B two (both at 2/3).
    config = parse({"clusterQueues": [{"name": "a", "flavors": [{"name": "default"}]},
                                      {"name": "b", "flavors": [{"name": "default"}]}]})
    state = State.of(config, [Node("n", 9000, 18 * GIB)])
    state = submit(state, Workload.elastic("ja", 1, 20, Shape(cpu_milli=1000, memory_mib=4 * GIB),
                                           queue="a"), 0)
    state = submit(state, Workload.elastic("jb", 1, 20, Shape(cpu_milli=3000, memory_mib=1 * GIB),
                                           queue="b"), 0)
    for t in range(1, 4):
        state, _ = run(state, t)
    assert sizes(state) == {"ja": 3, "jb": 2}


# ---- fractional GPUs ----------------------------------------------------------------------------

def test_fractional_gpus_never_overcommit_a_devices_memory():
    state = State.of(Config.default(), [gpu_node("n", gpus=2, gpu_mem=40)])
    # A quarter of a GPU's compute each, but 15 GiB of its 40: two fit per GPU, not four.
    state = submit(state, Workload.inference("serve", 8, Shape(gpu_milli=250, gpu_memory_mib=15 * GIB)), 0)
    state, result = run(state, 1)
    assert sizes(state) == {"serve": 4}
    for gpu in state.nodes["n"].gpus:
        assert gpu.used_memory_mib <= gpu.memory_mib and gpu.used_milli <= 1000
    # Compute is the limit when memory is small: four per GPU.
    state = State.of(Config.default(), [gpu_node("n", gpus=2, gpu_mem=40)])
    state = submit(state, Workload.inference("serve", 10, Shape(gpu_milli=250, gpu_memory_mib=GIB)), 0)
    state, _ = run(state, 1)
    assert sizes(state) == {"serve": 8}


# ---- reasons, requeue, submission ---------------------------------------------------------------

def test_every_pending_workload_has_a_reason():
    config = parse({"clusterQueues": [
        {"name": "strict", "queueingStrategy": "StrictFIFO", "flavors": [{"name": "default"}]},
        {"name": "loose", "flavors": [{"name": "default"}]}]})
    state = State.of(config, [gpu_node("n", gpus=4)])
    for q in ("strict", "loose"):
        state = submit(state, Workload.gang(f"{q}-big", 1, Shape(gpus=4), queue=q), 0)
        for i in range(12):
            state = submit(state, Workload.gang(f"{q}-{i}", 1, Shape(gpus=1), queue=q), 1 + i)
    state, result = run(state, 20)
    assert set(result.reasons) == set(state.pending)
    assert all(result.reasons.values())
    assert result.reasons["strict-3"] == "waiting behind strict-big in StrictFIFO queue strict" \
        or "strict-big" in state.admitted
    assert all(state.pending[n].last_reason == r for n, r in result.reasons.items())


def test_strict_fifo_blocks_and_best_effort_fifo_goes_past_the_head():
    config = parse({"clusterQueues": [
        {"name": "strict", "queueingStrategy": "StrictFIFO", "flavors": [{"name": "default"}]},
        {"name": "loose", "flavors": [{"name": "default"}]}]})
    state = State.of(config, [gpu_node("n", gpus=4)])
    state = submit(state, Workload.gang("hog", 1, Shape(gpus=3), queue="loose"), 0)
    state, _ = run(state, 1)
    state = submit(state, Workload.gang("s-big", 1, Shape(gpus=2), queue="strict"), 2)
    state = submit(state, Workload.gang("s-small", 1, Shape(gpus=1), queue="strict"), 3)
    state = submit(state, Workload.gang("l-big", 1, Shape(gpus=2), queue="loose"), 2)
    state = submit(state, Workload.gang("l-small", 1, Shape(gpus=1), queue="loose"), 3)
    state, result = run(state, 4)
    admitted = {d.workload for d in result.of(Admit)}
    assert "s-small" not in admitted
    assert result.reasons["s-small"] == "waiting behind s-big in StrictFIFO queue strict"


def test_a_gang_that_never_starts_is_requeued_with_back_off_then_deactivated():
    config = Config.default()
    state = State.of(config, [gpu_node("n")])
    state = submit(state, Workload.gang("stuck", 2, Shape(gpus=2)), 0)
    t = config.timeouts
    now, retries = 0.0, []
    for _ in range(t.requeue_limit + 2):
        state, result = run(state, now, ready=False)  # members never report started
        if result.of(Admit):
            now += t.wait_for_ready_s
            state, result = run(state, now, ready=False)
            [requeue] = result.of(Requeue)
            if requeue.deactivate:
                break
            retries.append(requeue.retry_at - now)
            assert "stuck" in state.pending and "backing off" in step(state, now).reasons["stuck"]
            now = requeue.retry_at
        else:
            now += 1
    assert retries == [min(t.requeue_max_s, t.requeue_base_s * 2 ** k) for k in range(t.requeue_limit)]
    assert "stuck" in state.deactivated and "stuck" not in state.pending and used_gpus(state) == 0


def test_bad_specs_are_refused_at_submission_with_what_to_change():
    state = State.of(Config.default(), [gpu_node("n", gpus=4)])
    cases = [
        (Workload.elastic("e", 3, 2, Shape(gpus=1)), "min size 3 is above max size 2"),
        (Workload.gang("g", 0, Shape(gpus=1)), "sizes must be at least 1"),
        (Workload.gang("g", 1, Shape(gpus=1), queue="nope"), "unknown queue 'nope'"),
        (Workload.gang("g", 1, Shape(gpus=5)), "no node or node type"),
        (Workload.gang("g", 1, Shape(gpus=1, gpu_model="H100")), "no node or node type"),
        (Workload.gang("g", 1, Shape(gpus=1), priority_class="vip"), "unknown priority class"),
        (Workload.gang("g", 1, Shape()), "must ask for some CPU, memory or GPU"),
    ]
    for workload, message in cases:
        with pytest.raises(SubmissionError, match=message):
            submit(state, workload, 0)
    with pytest.raises(Exception, match="must not be negative"):
        Workload.gang("g", 1, Shape(gpus=-1))
    assert state.pending == {}


def test_config_errors_name_the_bad_field(tmp_path):
    bad = [
        ({"clusterQueues": [{"name": "q", "flavors": [{"name": "default", "resources": {
            "gpu": {"nominalQuota": "eight"}}}]}]},
         "clusterQueues[0].flavors[0].resources.gpu.nominalQuota: must be a GPU count"),
        ({"clusterQueues": [{"name": "q", "flavours": []}]}, "clusterQueues[0].flavours: unknown field"),
        ({"clusterQueues": [{"name": "q", "flavors": [{"name": "h100"}]}]},
         "clusterQueues[0].flavors[0].name: unknown resource flavor 'h100'"),
        ({"clusterQueues": [{"name": "q", "flavors": [{"name": "default", "resources": {
            "gpu": {"nominalQuota": 2, "borrowingLimit": 1}}}]}]},
         "clusterQueues[0].flavors[0].resources.gpu.borrowingLimit: a queue outside a cohort"),
        ({"clusterQueues": [{"name": "q", "queueingStrategy": "LIFO", "flavors": [{"name": "default"}]}]},
         "clusterQueues[0].queueingStrategy: must be StrictFIFO or BestEffortFIFO"),
        ({"resourceFlavors": [{"name": "x"}, {"name": "x"}]}, "resourceFlavors[1].name: 'x' is already defined"),
        ({"priorityClasses": [{"name": "p", "value": "high"}]}, "priorityClasses[0].value: must be a whole number"),
        ({"placement": "worst_fit"}, "placement: must be one of"),
    ]
    for raw, message in bad:
        with pytest.raises(ConfigError) as info:
            parse(raw)
        assert str(info.value).startswith(message), str(info.value)
    path = tmp_path / "scheduler.yaml"
    path.write_text(COHORT + "timeouts: {waitForReadySeconds: 30}\n")
    config = load(str(path))
    assert config.queues["team-a"].flavors[0].quotas["gpu"].borrowing_limit == 4000
    assert config.timeouts.wait_for_ready_s == 30
    path.write_text("clusterQueues: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(str(path))


# ---- inference takes capacity from training and gives it back ----------------------------------

def test_an_endpoint_takes_capacity_from_training_and_gives_it_back():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b")])
    state = submit(state, Workload.elastic("train", 2, 8, Shape(gpus=2)), 0)
    state, _ = run(state, 1)
    state, _ = run(state, 2)
    assert sizes(state) == {"train": 8}
    state = submit(state, Workload.inference("serve", 3, Shape(gpus=2)), 3)
    state, result = run(state, 4)
    assert sizes(state) == {"train": 5, "serve": 3}
    state = set_replicas(state, "serve", 1, 5)  # load fell
    state, result = run(state, 6)
    assert sizes(state) == {"train": 7, "serve": 1}
    assert [d.workload for d in result.of(Resize)] == ["train"]


def cpu_node(name):
    return Node(name, 1000, 4 * GIB)


def test_endpoint_members_follow_where_serve_runs_the_replicas():
    """Serve places replicas and picks which one goes on a scale-down; the core's accounting
    follows, so the node Serve freed is the one training grows back onto."""
    state = State.of(Config.default(), [cpu_node(n) for n in "abc"])
    state = submit(state, Workload.inference("serve", 2, Shape(cpu_milli=1000)), 0)
    state, _ = run(state, 1)
    placed = sorted(m.node for m in state.admitted["serve"].members)
    [free] = sorted(set("abc") - set(placed))
    # Serve ran one replica on the node the core left free, not on the second one it chose.
    observed = [placed[0], free]
    state = rebind(state, "serve", observed, 2)
    assert sorted(m.node for m in state.admitted["serve"].members) == sorted(observed)
    assert state.nodes[placed[1]].used_cpu_milli == 0 and state.nodes[free].used_cpu_milli == 1000
    # A training job now grows onto the node Serve really left free.
    state = submit(state, Workload.elastic("train", 1, 3, Shape(cpu_milli=1000)), 3)
    state, _ = run(state, 4)
    assert [m.node for m in state.admitted["train"].members] == [placed[1]]
    # Serve scaled down by stopping the replica the core counted as the older one: the member
    # that leaves is the one whose replica is gone, not the newest.
    state = set_replicas(state, "serve", 1, 5, keep=[free])
    assert [m.node for m in state.admitted["serve"].members] == [free]
    assert state.nodes[placed[0]].used_cpu_milli == 0
    # A node the core gave to someone else is never double-booked: the member stays put.
    before = state
    state = rebind(state, "serve", [placed[1]], 7)
    assert state is before


# ---- nodes --------------------------------------------------------------------------------------

NODE_TYPES = {"nodeTypes": [
    {"name": "a100x8", "cpu": 64, "memory": "512Gi", "gpus": 8, "gpuModel": "A100",
     "gpuMemory": "80Gi", "labels": {"capacity-type": "spot"}, "min": 0, "max": 3}],
    "timeouts": {"nodeIdleSeconds": 100}}


def test_nodes_are_requested_for_waiting_work_and_released_when_idle():
    config = parse(NODE_TYPES)
    state = State.of(config, [])
    state = submit(state, Workload.gang("g", 2, Shape(gpus=8)), 0)
    state, result = run(state, 1)
    [request] = result.of(RequestNodes)
    assert (request.node_type, request.count) == ("a100x8", 2)
    state, result = run(state, 2)
    assert result.of(RequestNodes) == ()  # already asked for
    for i in range(2):
        state = add_node(state, config.node_types["a100x8"].node(f"new{i}"), 3)
    state, result = run(state, 4)
    assert [d.workload for d in result.of(Admit)] == ["g"]
    state = finish(state, "g", 10)
    state, result = run(state, 50)
    assert result.of(ReleaseNodes) == ()
    state, result = run(state, 111)
    [release] = result.of(ReleaseNodes)
    assert sorted(release.nodes) == ["new0", "new1"] and state.nodes == {}


def test_a_lost_node_sends_a_gang_back_and_shrinks_an_elastic_job():
    state = State.of(Config.default(), [gpu_node("a"), gpu_node("b")])
    state = submit(state, Workload.gang("g", 2, Shape(gpus=4), constraint=None), 0)
    state = submit(state, Workload.elastic("e", 2, 4, Shape(gpus=2)), 0)
    state, _ = run(state, 1)
    state, _ = run(state, 2)
    gang_nodes = {m.node for m in state.admitted["g"].members}
    lost = sorted(gang_nodes)[0]
    state = remove_node(state, lost, 3)
    assert "g" in state.pending
    assert all(m.node != lost for m in state.admitted["e"].members)


def test_the_readme_scheduler_configuration_loads_and_admits(tmp_path):
    """The README's queue file is valid, and its example admits an elastic job and grows it."""
    from pathlib import Path

    from integrations.ray.scheduler import load
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("## A shared pool"):]
    block = block[:block.index("and the scheduler decides")]
    path = tmp_path / "queues.yaml"
    path.write_text("\n".join(line[4:] for line in block.splitlines() if line.startswith("    ")))
    config = load(str(path))
    assert config.queues["team-a"].cohort == "research"
    nodes = [Node(f"n{i}", 64000, 512 * 1024, tuple(Gpu("A100", 81920) for _ in range(8)),
                  {"capacity-type": "spot" if i % 2 else "on-demand"}) for i in range(4)]
    state = submit(State.of(config, nodes), Workload.elastic(
        "bert", 2, 16, Shape(gpus=1, cpu_milli=8000), queue="team-a"), now=0)
    state = apply(state, step(state, now=1))
    assert state.admitted["bert"].flavor == "a100" and state.admitted["bert"].size == 16


def test_a_draining_node_keeps_what_runs_there_and_takes_nothing_new():
    from integrations.ray.scheduler import drain_node
    state = State.of(Config.default(), [gpu_node("spot1", gpus=2, capacity_type="spot"),
                                        gpu_node("od1", gpus=2)], now=0)
    state = submit(state, Workload.gang("a", 1, Shape(gpus=1)), now=0)
    state, _ = run(state, 1)
    [where] = [m.node for m in state.admitted["a"].members]
    state = drain_node(state, where)  # its spot notice arrived
    state = submit(state, Workload.gang("b", 2, Shape(gpus=1)), now=2)
    state, result = run(state, 3)
    assert sizes(state) == {"a": 1, "b": 2}  # a stays where it is
    other = "od1" if where == "spot1" else "spot1"
    assert {m.node for m in state.admitted["b"].members} == {other}
    state = submit(state, Workload.gang("c", 1, Shape(gpus=1)), now=4)
    state, result = run(state, 5)
    assert "c" in result.reasons and "c" not in state.admitted  # the free GPU there is not used
    state = remove_node(state, where, now=6)
    assert state.draining == frozenset()
