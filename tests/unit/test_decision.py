"""The leader's decision logic, stepped with hand-made views and a controlled clock."""
import pytest

from rendezvous.api import JobOutcome, Member, NodeInfo, RendezvousSettings, Round
from rendezvous.decision import FailureReport, Fail, Publish, View, Wait, decide


def node(nid, t=0.0, nproc=2):
    return NodeInfo(node_id=nid, host="127.0.0.1", nproc=nproc, health_addr="127.0.0.1:1",
                    lease_id=1, joined_at=t)


def view(now, nodes, rnd=None, failures=(), outcome=None, created_at=0.0):
    infos = {n.node_id: n for n in nodes}
    return View(now=now, nodes=infos, first_seen={n.node_id: n.joined_at for n in nodes},
                created_at=created_at, round=rnd, failures=failures, outcome=outcome)


def running(number, *ids, restart_count=0, active=True):
    return Round(number=number, members=tuple(Member(i, "127.0.0.1", 2) for i in ids),
                 active=active, restart_count=restart_count, cause="x", cause_time=0.0)


SETTINGS = RendezvousSettings(run_id="r", min_nodes=2, max_nodes=3, join_timeout=60,
                              last_call_timeout=5, join_settle=1, max_restarts=2)


def test_waits_below_min_until_join_timeout_then_fails():
    v = view(10, [node("a", 1)])
    d = decide(v, SETTINGS)
    assert d == Wait(wake_at=60)
    d = decide(view(60, [node("a", 1)]), SETTINGS)
    assert isinstance(d, Fail)
    assert "only 1 of the 2 nodes" in d.outcome.reason
    assert d.outcome.exit_code == 1


def test_last_call_window_after_min_reached():
    nodes = [node("a", 1), node("b", 3)]
    assert decide(view(4, nodes), SETTINGS) == Wait(wake_at=8)
    d = decide(view(8, nodes), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("a", "b")
    assert d.round.number == 1 and d.round.active and d.round.world_size == 4
    assert d.round.cause == "start"


def test_max_nodes_present_publishes_at_once_and_caps():
    nodes = [node("a", 1), node("b", 2), node("c", 3), node("d", 3.5)]
    d = decide(view(4, nodes), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("a", "b", "c")


def test_newcomers_coalesced_and_appended_after_survivors():
    rnd = running(4, "b", "a")
    nodes = [node("a", 0), node("b", 0), node("c", 10)]
    assert decide(view(10.5, nodes, rnd), SETTINGS) == Wait(wake_at=11)
    d = decide(view(11, nodes, rnd), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("b", "a", "c")
    assert d.round.number == 5 and d.round.cause == "node_joined"
    assert d.joined == ("c",)
    assert d.round.cause_time == 10  # timed from the join, not from the publication


def test_no_room_for_newcomers_at_max():
    rnd = running(2, "a", "b", "c")
    nodes = [node("a"), node("b"), node("c"), node("d", 1)]
    assert decide(view(100, nodes, rnd), SETTINGS) == Wait()


def test_departure_keeps_survivor_order_and_rank0_on_a_survivor():
    rnd = running(3, "a", "b", "c")
    d = decide(view(50, [node("b"), node("c"), node("d", 49.9)], rnd), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("b", "c", "d")  # d fills the free place at once
    assert d.departed == ("a",)
    assert d.round.cause == "node_left" and d.round.cause_time == 50
    assert d.round.restart_count == 0


def test_departure_below_min_waits_inactive_then_times_out():
    rnd = running(3, "a", "b")
    d = decide(view(50, [node("b")], rnd), SETTINGS)
    assert isinstance(d, Publish) and not d.round.active
    assert d.round.world_size == 0
    waiting = d.round
    assert decide(view(60, [node("b")], waiting), SETTINGS) == Wait(wake_at=110)
    assert isinstance(decide(view(110, [node("b")], waiting), SETTINGS), Fail)


def test_recovery_from_waiting_uses_join_settle_not_last_call():
    waiting = Round(number=4, members=(Member("b", "127.0.0.1", 2),), active=False,
                    cause="node_left", cause_time=50)
    nodes = [node("b", 0), node("e", 70)]
    assert decide(view(70.2, nodes, waiting), SETTINGS) == Wait(wake_at=71)
    d = decide(view(71, nodes, waiting), SETTINGS)
    assert d.round.node_ids == ("b", "e") and d.round.active and d.round.number == 5


def test_worker_failure_restarts_same_members_and_counts():
    rnd = running(3, "a", "b", restart_count=1)
    f = FailureReport("b", 5.0, "rank 3 exited with code 1", 1)
    d = decide(view(6, [node("a"), node("b")], rnd, failures=[f]), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("a", "b")
    assert d.round.restart_count == 2 and d.round.cause == "worker_failed"
    assert d.round.cause_time == 5.0


def test_worker_failure_past_max_restarts_fails_with_first_report():
    rnd = running(3, "a", "b", restart_count=2)
    reports = [FailureReport("a", 5.5, "rank 0 exited with code 1", 1),
               FailureReport("b", 5.0, "rank 3 exited with code 7", 7, "Traceback ...")]
    d = decide(view(6, [node("a"), node("b")], rnd, failures=reports), SETTINGS)
    assert isinstance(d, Fail)
    assert d.outcome.node_id == "b" and d.outcome.exit_code == 7
    assert "rank 3 exited with code 7" in d.outcome.reason
    assert "max_restarts=2" in d.outcome.reason
    assert d.outcome.details["traceback"] == "Traceback ..."


def test_departure_is_not_a_failure_even_with_reports():
    rnd = running(3, "a", "b", restart_count=2)
    f = FailureReport("a", 5.0, "rank 0 exited with code 1", 1)
    d = decide(view(6, [node("a"), node("c", 1)], rnd, failures=[f]), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.restart_count == 2
    assert d.round.node_ids == ("a", "c")


def test_finished_job_publishes_nothing():
    done = JobOutcome(status="succeeded")
    assert decide(view(6, [node("a")], running(1, "a", "b"), outcome=done), SETTINGS) == Wait()


def test_single_node_job_starts_immediately():
    s = RendezvousSettings(run_id="r", min_nodes=1, max_nodes=1)
    d = decide(view(0, [node("a", 0)]), s)
    assert isinstance(d, Publish) and d.round.node_ids == ("a",)


def test_rank_offsets_follow_member_order():
    rnd = Round(number=1, members=(Member("a", "h", 2), Member("b", "h", 3), Member("c", "h", 1)))
    assert [rnd.rank_offset(x) for x in "abc"] == [0, 2, 5]
    assert rnd.world_size == 6 and rnd.group_rank("c") == 2 and rnd.group_rank("z") is None
    assert Round.from_json(rnd.to_json()) == rnd


@pytest.mark.parametrize("kwargs, words", [
    (dict(min_nodes=3, max_nodes=1), "MIN <= MAX"),
    (dict(min_nodes=0), "at least 1"),
    (dict(run_id="a/b"), "run id"),
    (dict(max_restarts=-1), "max restarts"),
])
def test_settings_reject_bad_values(kwargs, words):
    args = dict(run_id="r")
    args.update(kwargs)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        RendezvousSettings(**args)


def ranked(nid, t, hint):
    return NodeInfo(node_id=nid, host="127.0.0.1", nproc=2, health_addr="127.0.0.1:1",
                    lease_id=1, joined_at=t, rank_hint=hint)


def test_node_rank_orders_the_first_round_whatever_the_join_order():
    fixed = RendezvousSettings(run_id="r", min_nodes=3, max_nodes=3)
    nodes = [ranked("late-rank0", 3, 0), ranked("first-rank2", 1, 2), ranked("rank1", 2, 1)]
    d = decide(view(4, nodes), fixed)
    assert d.round.node_ids == ("late-rank0", "rank1", "first-rank2")


def test_nodes_without_node_rank_follow_ranked_ones_in_join_order_and_survivors_keep_theirs():
    d = decide(view(20, [node("b", 1), ranked("r1", 3, 1), node("a", 2)]), SETTINGS)
    assert d.round.node_ids == ("r1", "b", "a")
    # A newcomer with node rank 0 after the first round is appended: survivors keep their ranks.
    later = decide(view(30, [node("b", 1), ranked("r1", 3, 1), ranked("r0", 25, 0)],
                        rnd=running(1, "r1", "b")), SETTINGS)
    assert later.round.node_ids == ("r1", "b", "r0")


def labelled(nid, t, spot=False):
    return NodeInfo(node_id=nid, host="127.0.0.1", nproc=2, health_addr="127.0.0.1:1",
                    lease_id=1, joined_at=t, labels={"capacity-type": "spot" if spot else
                                                     "on-demand"})


def with_(v, **changes):
    from dataclasses import replace
    return replace(v, **changes)


def test_a_desired_size_below_the_round_leaves_out_spot_then_newest_never_rank_0():
    nodes = [labelled("first", 1), labelled("od-old", 2), labelled("spot-old", 3, spot=True),
             labelled("od-new", 4)]
    wide = RendezvousSettings(run_id="r", min_nodes=1, max_nodes=4)
    r = running(3, "first", "od-old", "spot-old", "od-new")
    d = decide(with_(view(10, nodes, rnd=r), desired=2), wide)
    assert isinstance(d, Publish) and d.round.cause == "resized"
    assert d.round.node_ids == ("first", "od-old") and d.resized == ("spot-old", "od-new")
    assert d.round.restart_count == 0  # a membership change, not a failure
    # The rank-0 node stays even when it is the newest spot node.
    nodes = [labelled("rank0", 9, spot=True), labelled("x", 1)]
    d = decide(with_(view(10, nodes, rnd=running(3, "rank0", "x")), desired=1), wide)
    assert d.round.node_ids == ("rank0",) and d.resized == ("x",)


def test_spares_wait_below_the_desired_size_and_come_in_when_it_rises():
    wide = RendezvousSettings(run_id="r", min_nodes=1, max_nodes=4, join_settle=1)
    nodes = [node("a", 1), node("b", 2), node("spare", 3)]
    r = running(4, "a", "b")
    assert decide(with_(view(20, nodes, rnd=r), desired=2), wide) == Wait(wake_at=None)
    d = decide(with_(view(20, nodes, rnd=r), desired=3), wide)
    assert d.round.node_ids == ("a", "b", "spare") and d.joined == ("spare",)
    # Waiting since long ago: published at once, timed from when the room appeared (at most
    # the coalescing window ago), not from the spare's join.
    assert d.round.cause_time == 19


def test_released_members_depart_and_released_nodes_are_never_admitted():
    wide = RendezvousSettings(run_id="r", min_nodes=1, max_nodes=4, join_settle=1)
    nodes = [node("a", 1), node("b", 2), node("c", 3)]
    d = decide(with_(view(20, nodes, rnd=running(2, "a", "b")), released=frozenset({"b"}),
                     desired=1), wide)
    assert d.round.node_ids == ("a",) and d.round.cause == "released"
    assert d.departed == ("b",) and d.released == ("b",) and d.joined == ()
    # The released node's agent may deregister before the leader looks: still a release.
    d = decide(with_(view(20, [node("a", 1), node("c", 3)], rnd=running(2, "a", "b")),
                     released=frozenset({"b"}), desired=1), wide)
    assert d.round.cause == "released" and d.released == ("b",)
    # A released node waiting outside the round never gets in, even with room.
    d = decide(with_(view(20, nodes, rnd=running(3, "a")), released=frozenset({"b"}),
                     desired=3), wide)
    assert d.round.node_ids == ("a", "c")


def test_a_stopping_job_gets_no_new_round():
    nodes = [node("a", 1), node("b", 2)]
    assert decide(with_(view(20, nodes, rnd=running(2, "a")), stopping=True), SETTINGS) == Wait()


def test_the_first_round_waits_for_and_takes_only_the_desired_size():
    wide = RendezvousSettings(run_id="r", min_nodes=1, max_nodes=4, last_call_timeout=5)
    nodes = [node("a", 1), node("b", 2)]
    d = decide(with_(view(3, nodes), desired=2), wide)  # at the desired size: no last call
    assert d.round.node_ids == ("a", "b")
    d = decide(with_(view(3, nodes + [node("c", 2.5)]), desired=2), wide)
    assert d.round.node_ids == ("a", "b")
