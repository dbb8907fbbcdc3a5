"""The fault schedule generator: seeded, within the node limits, every kind met (fast, no I/O)."""
from collections import Counter

import pytest

from .job import INJECT_OFFSET, SLOT_STEPS, STEPS_PER_EPOCH, epochs_for, inject_step
from .schedule import (ALL_KINDS, ETCD_RESTART, HANG, JOIN, PREEMPT, REMOVALS, SIGKILL, Fault,
                       Limits, apply, make_schedule)

pytestmark = pytest.mark.chaos

WITHOUT_PREEMPT = [k for k in ALL_KINDS if k != PREEMPT]


def replay(schedule, limits=Limits()):
    """Check every fault against the agents running before it; the running set after each."""
    running, started = schedule.initial, set(schedule.initial)
    for fault in schedule.faults:
        if fault.kind == JOIN:
            assert fault.target not in started and len(running) < limits.max_nodes
            started.add(fault.target)
        elif fault.kind in REMOVALS:
            assert fault.target in running and len(running) - 1 >= max(limits.min_nodes, 1)
        elif fault.kind == HANG:
            assert fault.target is None and len(running) >= 2
        else:
            assert fault.kind == ETCD_RESTART and fault.target is None
        running = apply(running, fault)
        yield running


@pytest.mark.parametrize("seed", range(200))
def test_every_fault_respects_the_node_limits(seed):
    limits = Limits(min_nodes=1, max_nodes=3, initial=2)
    plan = make_schedule(seed, 60, ALL_KINDS, limits)
    assert len(plan.faults) == 60 and plan.initial == ("n0", "n1")
    for running in replay(plan, limits):
        assert 1 <= len(running) <= 3


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    assert make_schedule(5, 40) == make_schedule(5, 40)
    assert make_schedule(5, 40) != make_schedule(6, 40)
    assert make_schedule(5, 10).faults == make_schedule(5, 40).faults[:10]


@pytest.mark.parametrize("kinds", [ALL_KINDS, WITHOUT_PREEMPT])
def test_the_ci_run_meets_every_kind_and_the_soak_meets_them_evenly(kinds):
    ci = make_schedule(1, 6, kinds)
    assert ci.initial == ("n0", "n1", "n2") and {f.kind for f in ci.faults} == set(kinds)
    soak = Counter(f.kind for f in make_schedule(1, 100, kinds).faults)
    assert sum(soak.values()) == 100 and min(soak.values()) >= 10, soak


@pytest.mark.parametrize("seed", range(20))
def test_a_long_run_keeps_visiting_every_size(seed):
    sizes = Counter(len(running) for running in replay(make_schedule(seed, 100)))
    assert set(sizes) == {1, 2, 3} and sizes[2] >= 20 and sizes[3] >= 20, sizes


def test_the_first_agent_is_a_target_too():
    hit = {f.target for seed in range(20) for f in make_schedule(seed, 30).faults
           if f.kind == SIGKILL}
    assert "n0" in hit


def test_a_higher_minimum_is_never_undercut():
    limits = Limits(min_nodes=2, max_nodes=3, initial=2)
    for seed in range(50):
        for running in replay(make_schedule(seed, 30, ALL_KINDS, limits), limits):
            assert len(running) >= 2


@pytest.mark.parametrize("kinds, error", [
    ([], "non-empty subset"), (["flood"], "non-empty subset"), ([JOIN], "no fault of kinds")])
def test_kinds_that_cannot_make_a_schedule_are_refused(kinds, error):
    with pytest.raises(ValueError, match=error):
        make_schedule(1, 5, kinds)


def test_one_kind_alone_works_when_it_always_applies():
    assert make_schedule(1, 4, [HANG]).faults == (Fault(HANG, None),) * 4


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Limits(min_nodes=2, max_nodes=3, initial=1)


def test_pacing_keeps_each_hang_in_its_own_slot_and_training_outlasts_the_faults():
    for index in range(100):
        # Allowed while fault `index` is prepared: up to (index + 2) * SLOT_STEPS; before it only
        # (index + 1) * SLOT_STEPS, so its step is first reached in its own slot.
        assert (index + 1) * SLOT_STEPS < inject_step(index) <= (index + 2) * SLOT_STEPS
    assert INJECT_OFFSET >= 2  # the wait for step inject_step - 1 is also above the last slot
    for faults in (0, 6, 100):
        assert epochs_for(faults) * STEPS_PER_EPOCH >= (faults + 3) * SLOT_STEPS
