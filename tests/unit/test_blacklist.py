"""Blacklisting in the leader's decision: strikes, cooldowns, min nodes, and the restart budget."""
import json

import pytest

from rendezvous import blacklist
from rendezvous.api import BlacklistEntry, Member, NodeInfo, RendezvousSettings, Round
from rendezvous.decision import FailureReport, Fail, Publish, View, Wait, decide

SETTINGS = RendezvousSettings(run_id="r", min_nodes=2, max_nodes=3, join_timeout=600,
                              last_call_timeout=5, join_settle=1, max_restarts=10,
                              blacklist_after=2, blacklist_cooldown=60, blacklist_max_cooldown=200)


def node(nid, t=0.0):
    return NodeInfo(node_id=nid, host="127.0.0.1", nproc=2, health_addr="127.0.0.1:1",
                    lease_id=1, joined_at=t)


def view(now, ids, rnd, failures=()):
    nodes = {nid: node(nid) for nid in ids}
    return View(now=now, nodes=nodes, first_seen={nid: 0.0 for nid in ids}, created_at=0.0,
                round=rnd, failures=tuple(failures))


def running(number, *ids, restart_count=0, records=(), active=True):
    return Round(number=number, members=tuple(Member(i, "127.0.0.1", 2) for i in ids),
                 active=active, restart_count=restart_count, cause="x", cause_time=0.0,
                 blacklist=tuple(records))


def fails(nid, t, code=1):
    return FailureReport(nid, t, f"rank on {nid} exited with code {code}", code)


def entry(rnd, nid):
    return next((e for e in rnd.blacklist if e.node_id == nid), None)


def test_strike_goes_to_the_earliest_reporter_once_per_round():
    rnd = running(3, "a", "b", "c")
    reports = [fails("a", 5.5), fails("b", 5.0), fails("c", 5.2), fails("b", 5.9)]
    d = decide(view(6, "abc", rnd, reports), SETTINGS)
    assert isinstance(d, Publish) and d.round.cause == "worker_failed"
    assert d.round.blacklist == (BlacklistEntry("b", strikes=1),)
    assert d.round.node_ids == ("a", "b", "c") and d.excluded == () and d.kept == ()


def test_equal_report_times_break_ties_by_node_id():
    d = decide(view(6, "abc", running(3, "c", "b", "a"), [fails("c", 5), fails("b", 5)]), SETTINGS)
    assert d.round.blacklist == (BlacklistEntry("b", strikes=1),)


def test_excluded_after_n_strikes_then_admitted_like_a_newcomer_when_the_cooldown_ends():
    rnd = running(3, "a", "b", "c")
    d = decide(view(10, "abc", rnd, [fails("b", 9)]), SETTINGS)
    assert d.excluded == () and entry(d.round, "b").strikes == 1
    d = decide(view(20, "abc", d.round, [fails("b", 19)]), SETTINGS)
    assert d.excluded == ("b",)
    assert d.round.node_ids == ("a", "c") and d.round.active
    assert entry(d.round, "b") == BlacklistEntry("b", strikes=0, excluded_until=80, exclusions=1)
    cooled = d.round
    # b stays registered but is left out, and the leader asks to be woken when its cooldown ends.
    assert decide(view(50, "abc", cooled), SETTINGS) == Wait(wake_at=80)
    # At the end of the cooldown b is a newcomer that arrived then: joins are coalesced as usual.
    assert decide(view(80, "abc", cooled), SETTINGS) == Wait(wake_at=81)
    d = decide(view(81, "abc", cooled), SETTINGS)
    assert isinstance(d, Publish) and d.round.cause == "node_joined"
    assert d.round.node_ids == ("a", "c", "b") and d.joined == ("b",)
    assert d.round.cause_time == 80
    assert d.round.blacklist == cooled.blacklist  # carried over to the next round


def test_a_cooled_down_node_frees_its_place_for_a_waiting_node():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "max_nodes": 2})
    rnd = running(3, "a", "b", records=[BlacklistEntry("b", strikes=1)])
    d = decide(view(10, "abcd", rnd, [fails("b", 9)]), s)
    assert d.excluded == ("b",)
    assert d.round.node_ids == ("a", "c") and d.joined == ("c",)


def test_cooldowns_double_up_to_the_cap():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "blacklist_after": 1})
    rnd, now, lengths = running(1, "a", "b", "c"), 0.0, []
    for _ in range(4):
        d = decide(view(now, "abc", rnd, [fails("b", now)]), s)
        assert d.excluded == ("b",)
        lengths.append(entry(d.round, "b").excluded_until - now)
        now = entry(d.round, "b").excluded_until
        d = decide(view(now + s.join_settle, "abc", d.round), s)  # b comes back
        assert d.joined == ("b",)
        rnd = d.round
    assert lengths == [60, 120, 200, 200]
    assert entry(rnd, "b").exclusions == 4


def test_cooldown_length_stays_finite_for_many_exclusions():
    assert blacklist.cooldown(10_000, SETTINGS) == SETTINGS.blacklist_max_cooldown


def test_no_exclusion_that_would_drop_below_min_nodes():
    rnd = running(3, "a", "b", records=[BlacklistEntry("b", strikes=1)])
    d = decide(view(10, "ab", rnd, [fails("b", 9)]), SETTINGS)
    assert isinstance(d, Publish)
    assert d.round.node_ids == ("a", "b") and d.round.active
    assert d.excluded == () and d.kept == ("b",)
    assert entry(d.round, "b") == BlacklistEntry("b", strikes=2)
    # Once another node is here, b's next failure cools it down.
    d = decide(view(20, "abc", d.round, [fails("b", 19)]), SETTINGS)
    assert d.excluded == ("b",) and d.round.node_ids == ("a", "c")


def test_a_departure_readmits_a_cooling_node_early_to_hold_min_nodes():
    cooled = running(5, "a", "c", records=[BlacklistEntry("b", excluded_until=500, exclusions=1)])
    d = decide(view(100, "bc", cooled), SETTINGS)  # a left
    assert isinstance(d, Publish) and d.round.active and d.round.cause == "node_left"
    assert d.round.node_ids == ("c", "b") and d.departed == ("a",)
    assert d.joined == ("b",) and d.kept == ("b",)
    assert entry(d.round, "b") == BlacklistEntry("b", excluded_until=100, exclusions=1)
    assert d.round.restart_count == 0


def test_cooling_nodes_stay_out_when_they_cannot_bring_the_job_to_min():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "min_nodes": 3})
    cooled = running(5, "a", "c", "d", records=[BlacklistEntry("b", excluded_until=500)])
    d = decide(view(100, "bc", cooled), s)  # a and d left: c and b are still one short
    assert isinstance(d, Publish) and not d.round.active
    assert d.round.node_ids == ("c",) and d.kept == ()
    # Waiting below min: wake when b's cooldown ends (before the join timeout at 700).
    assert decide(view(101, "bc", d.round), s) == Wait(wake_at=500)


def test_a_waiting_job_readmits_a_cooling_node_when_that_reaches_min():
    waiting = Round(number=6, members=(Member("c", "127.0.0.1", 2),), active=False,
                    cause="node_left", cause_time=100,
                    blacklist=(BlacklistEntry("b", excluded_until=500, exclusions=1),))
    # b is counted from its first sighting, so the settle window does not move with the clock.
    assert decide(view(100.5, "bc", waiting), SETTINGS) == Wait(wake_at=101)
    d = decide(view(101, "bc", waiting), SETTINGS)
    assert isinstance(d, Publish) and d.round.active
    assert d.round.node_ids == ("c", "b") and d.kept == ("b",)
    assert entry(d.round, "b").excluded_until == 101


def test_departures_and_joins_add_no_strikes():
    rnd = running(3, "a", "b", "c", records=[BlacklistEntry("a", strikes=1)])
    # a's workers failed because b died: a membership change, not a failure.
    d = decide(view(10, "ac", rnd, [fails("a", 9)]), SETTINGS)
    assert d.round.cause == "node_left" and d.round.blacklist == rnd.blacklist
    assert d.round.restart_count == 0
    d = decide(view(20, "acd", d.round), SETTINGS)  # d joins
    assert d.round.cause == "node_joined" and d.round.blacklist == rnd.blacklist


def test_blacklisting_off():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "blacklist_after": 0})
    rnd = running(3, "a", "b", "c")
    for t in range(1, 5):
        d = decide(view(t, "abc", rnd, [fails("b", t)]), s)
        assert d.round.node_ids == ("a", "b", "c") and d.round.blacklist == ()
        rnd = d.round


def test_restart_count_counts_failures_not_exclusions_or_readmissions():
    rnd = running(3, "a", "b", "c", restart_count=4, records=[BlacklistEntry("b", strikes=1)])
    d = decide(view(10, "abc", rnd, [fails("b", 9), fails("a", 9.5)]), SETTINGS)
    assert d.excluded == ("b",) and d.round.restart_count == 5
    d = decide(view(80, "abc", d.round), SETTINGS)  # cooldown over, settle window passed
    assert d.joined == ("b",) and d.round.restart_count == 5


def test_max_restarts_still_ends_the_job_whatever_the_blacklist():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "max_restarts": 1})
    rnd = running(3, "a", "b", "c", records=[BlacklistEntry("b", strikes=1)])
    d = decide(view(10, "abc", rnd, [fails("b", 9)]), s)
    assert d.excluded == ("b",) and d.round.restart_count == 1
    d = decide(view(20, "abc", d.round, [fails("a", 19, code=3)]), s)
    assert isinstance(d, Fail)
    assert d.outcome.node_id == "a" and "max_restarts=1 exhausted" in d.outcome.reason


def test_blacklist_round_trips_through_json_and_a_new_leader_continues_from_it():
    d = decide(view(20, "abc", running(3, "a", "b", "c", records=[BlacklistEntry("b", strikes=1)]),
                    [fails("b", 19)]), SETTINGS)
    stored = Round.from_json(d.round.to_json())
    assert stored == d.round and isinstance(stored.blacklist[0], BlacklistEntry)
    assert decide(view(30, "abc", stored), SETTINGS) == Wait(wake_at=80)


def test_round_json_without_a_blacklist_reads_as_empty():
    old = json.dumps({"number": 2, "members": [{"node_id": "a", "host": "h", "nproc": 1}],
                      "active": True, "restart_count": 1, "cause": "worker_failed",
                      "cause_time": 3.0})
    rnd = Round.from_json(old)
    assert rnd.blacklist == () and rnd.restart_count == 1
    d = decide(view(10, "ab", rnd, [fails("a", 9)]), SETTINGS)
    assert d.round.blacklist == (BlacklistEntry("a", strikes=1),)


def test_no_wake_for_a_cooldown_when_the_job_is_full():
    s = RendezvousSettings(**{**SETTINGS.__dict__, "max_nodes": 2})
    rnd = running(4, "a", "c", records=[BlacklistEntry("b", excluded_until=80)])
    assert decide(view(50, "abc", rnd), s) == Wait()


@pytest.mark.parametrize("kwargs, words", [
    (dict(blacklist_after=-1), "blacklist_after"),
    (dict(blacklist_cooldown=-1), "blacklist_cooldown must not be negative"),
    (dict(blacklist_cooldown=10, blacklist_max_cooldown=5), "below blacklist_cooldown"),
])
def test_settings_reject_bad_blacklist_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RendezvousSettings(run_id="r", **kwargs)
