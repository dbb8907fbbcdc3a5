"""The audit of a training history and the figures of a run, on made-up records (fast, no I/O)."""
import pytest

from .analysis import percentile, recomputed, recovery_s, unlogged
from .history import Prescription, audit, round_worlds
from .job import Injected

pytestmark = pytest.mark.chaos

DATASET, G, STEPS = 40, 10, 4   # 4 steps per epoch
PRESCRIPTION = Prescription(DATASET, G, 4, seed=3)


def history(epochs, world_of_step):
    """Records of a run that trained as prescribed; world_of_step(step) -> (round, world)."""
    final = {}
    for step in range(1, epochs * STEPS + 1):
        rnd, world = world_of_step(step)
        epoch, k = divmod(step - 1, STEPS)
        final[step] = [{"round": rnd, "step": step, "epoch": epoch, "rank": r,
                        "indices": PRESCRIPTION.share(epoch, k, world, r)} for r in range(world)]
    return final


def changing_world(step):
    return (1, 1) if step <= 3 else (2, 3) if step <= 6 else (3, 2)


WORLDS = {1: 1, 2: 3, 3: 2}


def test_a_history_as_the_sampler_prescribes_passes_with_worlds_that_change():
    result = audit(history(2, changing_world), WORLDS, 2, STEPS, PRESCRIPTION)
    assert (result.problems, result.lost, result.duplicated, result.unrecorded) == ([], 0, 0, 0)


def test_the_shares_of_one_step_are_its_global_batch_split_over_the_ranks():
    whole = [i for r in range(3) for i in PRESCRIPTION.share(1, 2, 3, r)]
    assert [len(PRESCRIPTION.share(1, 2, 3, r)) for r in range(3)] == [4, 3, 3]
    assert whole == PRESCRIPTION.share(1, 2, 1, 0) and len(set(whole)) == G


def test_a_rank_that_took_other_samples_is_named():
    final = history(2, changing_world)
    final[5][1]["indices"] = final[5][1]["indices"][:-1] + [final[5][0]["indices"][0]]
    result = audit(final, WORLDS, 2, STEPS, PRESCRIPTION)
    assert len(result.problems) == 1 and result.problems[0].startswith("step 5 rank 1 of round 2")


def test_a_missing_step_loses_its_samples():
    final = history(2, changing_world)
    del final[7]
    result = audit(final, WORLDS, 2, STEPS, PRESCRIPTION)
    assert result.problems == ["step 7 is in no surviving record"] and result.lost == G


def test_a_rank_killed_before_its_record_is_unrecorded_not_lost():
    final = history(2, changing_world)
    final[6] = [r for r in final[6] if r["rank"] != 2]
    result = audit(final, WORLDS, 2, STEPS, PRESCRIPTION)
    assert (result.problems, result.lost, result.unrecorded) == ([], 0, 3)


def test_a_round_absent_from_the_event_log_is_a_problem():
    result = audit(history(1, changing_world), {1: 1}, 1, STEPS, PRESCRIPTION)
    assert result.problems == ["round 2 (step 4) is not in the event log"]


def test_round_worlds_come_from_rendezvous_and_rescale_events():
    events = [{"event": "rendezvous", "round": 1, "world_size": 2},
              {"event": "waiting", "round": 2, "world_size": 1},
              {"event": "rescale", "round": 3, "world_size": 3}]
    assert round_worlds(events) == {1: 2, 3: 3}


def test_recomputed_steps_count_the_rounds_that_trained_them():
    attempts = {1: [{"round": 1}, {"round": 1}], 2: [{"round": 1}, {"round": 2}, {"round": 3}]}
    assert recomputed(attempts) == (2, 1)


def test_recovery_is_the_first_step_in_the_world_after_the_fault():
    fault = Injected(0, "sigkill", "n1", "node-b", time=10.0, world=2, exit_code=None)
    steps = [(9.0, 5, 3), (10.2, 6, 3), (11.5, 5, 2), (12.0, 6, 2)]
    assert recovery_s(fault, steps) == 1.5
    assert recovery_s(fault, steps[:2]) is None


def test_percentiles_are_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def event(name, t, node="a", **fields):
    return {"event": name, "time": t, "node": node, "round": 1, "world_size": 1,
            "members": ["a"], "cause": None, **fields}


@pytest.mark.parametrize("fault, shown_by", [
    (Injected(0, "join", "n3", "c", 5.0, 3, None), event("joined", 7.0, node="c")),
    (Injected(0, "sigkill", "n1", "b", 5.0, 1, None),
     event("node_left", 5.2, cause="removed", nodes=["b"])),
    (Injected(0, "sigkill", "n1", "b", 5.0, 1, None), event("rescale", 5.2, members=["a"])),
    (Injected(0, "sigterm", "n1", "b", 5.0, 1, 143),
     event("node_left", 5.1, node="b", cause="sigterm")),
    (Injected(0, "hang", None, "b", 5.0, 2, None), event("worker_hung", 9.1, node="b")),
])
def test_each_fault_is_found_by_its_event_and_missed_without_it(fault, shown_by):
    assert unlogged([fault], [shown_by]) == []
    earlier = dict(shown_by, time=fault.time - 5)
    assert len(unlogged([fault], [earlier])) == 1


def test_a_preemption_needs_the_notice_and_the_node_leaving():
    fault = Injected(0, "preempt", "n1", "b", 5.0, 1, 0)
    notice = event("preemption_notice", 5.1, node="b", cause="file")
    left = event("node_left", 5.6, node="b", cause="file")
    assert unlogged([fault], [notice, left]) == []
    assert len(unlogged([fault], [notice])) == 1 and len(unlogged([fault], [left])) == 1


def test_an_etcd_restart_needs_both_the_outage_and_the_reconnection():
    fault = Injected(0, "etcd_restart", None, None, 5.0, 2, None)
    down, back = event("etcd_unreachable", 5.3), event("etcd_reconnected", 8.0)
    assert unlogged([fault], [down, back]) == []
    assert len(unlogged([fault], [down])) == 1 and len(unlogged([fault], [back])) == 1
