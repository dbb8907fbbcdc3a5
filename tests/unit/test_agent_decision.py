"""The agent's decisions, stepped with hand-made views (no processes, no etcd, no clock)."""
import signal

from elastic.contract import CollectiveFailed, Hello, Running
from elastic.policy import make_policy
from launcher import decision as d
from launcher.backend import BackendTraits, WorkerStatus
from launcher.events import (NodeExcluded, NodeLeft, Rendezvous, Rescale, Waiting, WorkerFailed,
                             WorkerHung)
from launcher.workers import WorkerFailure
from rendezvous.api import (BlacklistEntry, JobOutcome, JobSpec, Member, NodeInfo,
                            RendezvousSettings, Round)
from rendezvous.decision import FailureReport, Publish
from rendezvous.store import Snapshot

ME, PEER = "node-a", "node-b"
TORCH = BackendTraits(in_place=True, standby_after_world=True, holds_for_hello=True,
                      prewarm="if-job-in-place", reports_progress=True)
HOROVOD = BackendTraits(in_place=True, prewarm="always")
RESTART = BackendTraits()
T0 = 1000.0


def settings(traits=TORCH, **kw):
    return d.AgentSettings(node_id=ME, rendezvous=RendezvousSettings(
        run_id="job", min_nodes=1, max_nodes=3, max_restarts=2), traits=traits,
        endpoint="127.0.0.1:2379", **kw)


def rnd(number, *ids, cause="node_joined", cause_time=T0 - 1, restart_count=0, active=True):
    return Round(number=number, members=tuple(Member(i, "127.0.0.1", 2) for i in ids),
                 active=active, cause=cause, cause_time=cause_time, restart_count=restart_count)


def snap(round_=None, nodes=(ME, PEER), masters=None, failures=None, in_place=False,
         outcome=None):
    infos = {n: NodeInfo(node_id=n, host="127.0.0.1", nproc=2, health_addr="", lease_id=1,
                         joined_at=0.0) for n in nodes}
    return Snapshot(nodes=infos, leader=ME, round=round_, round_revision=1,
                    masters=masters or {}, failures=failures or {}, outcome=outcome,
                    spec=JobSpec(min_nodes=1, max_nodes=3, created_at=0.0), in_place=in_place)


def running(capable=True, started_at=T0 - 60, pids=(11, 12), **kw):
    return WorkerStatus(state="running", pids=pids, started_at=started_at, capable=capable, **kw)


def view(snapshot, workers=WorkerStatus(), now=T0, messages=(), **kw):
    return d.AgentView(now=now, snapshot=snapshot, workers=workers, messages=messages, **kw)


def kinds(step):
    return [type(a).__name__ for a in step.actions]


def events(step):
    return [a.event for a in step.actions if isinstance(a, d.Emit)]


# -- before the loop -------------------------------------------------------------------------
def test_prewarm_follows_the_backend_and_whether_the_job_runs_in_place():
    assert d.should_prewarm(TORCH, job_in_place=True)
    assert not d.should_prewarm(TORCH, job_in_place=False)
    assert d.should_prewarm(HOROVOD, job_in_place=False)
    assert not d.should_prewarm(RESTART, job_in_place=True)


# -- waiting ---------------------------------------------------------------------------------
def test_waiting_is_said_at_once_then_every_few_seconds_and_forgotten_when_running():
    lonely = snap(nodes=(ME,))
    fixed = d.AgentSettings(node_id=ME, rendezvous=RendezvousSettings(run_id="job", min_nodes=2,
                                                                     max_nodes=2), traits=TORCH)
    lonely = Snapshot(**{**lonely.__dict__, "spec": JobSpec(min_nodes=2, max_nodes=2,
                                                             created_at=0.0)})
    first = d.decide(view(lonely), d.AgentState(), fixed)
    assert [a.text for a in first.actions] == [
        "waiting for nodes: 1 of the 2 needed (job 'job')"]
    again = d.decide(view(lonely, now=T0 + 1), first.state, fixed)
    assert again.actions == ()
    later = d.decide(view(lonely, now=T0 + d.WAITING_REPORT_S), first.state, fixed)
    assert kinds(later) == ["Say"]
    members = snap(rnd(1, ME, PEER), masters={1: "h:1"})
    done = d.decide(view(members, running()), later.state, fixed)
    assert done.state.waiting_said == (None, 0.0)


# -- what the workers said ---------------------------------------------------------------------
def test_a_hello_from_capable_workers_marks_the_job_in_place_once():
    state = d.AgentState(applied=rnd(1, ME))
    hellos = ((0, Hello(0, 11)), (1, Hello(1, 12)))
    s = snap(rnd(1, ME))
    assert kinds(d.decide(view(s, running(), messages=hellos), state, settings())) == ["MarkInPlace"]
    marked = snap(rnd(1, ME), in_place=True)
    assert d.decide(view(marked, running(), messages=hellos), state, settings()).actions == ()
    assert d.decide(view(s, running(capable=False), messages=hellos), state, settings()).actions == ()


def test_a_failed_collective_is_reported_once_unless_a_peer_is_gone():
    state = d.AgentState(applied=rnd(3, ME, PEER))
    failed = tuple((k, CollectiveFailed(round=3, error="RuntimeError: gloo", traceback="tb"))
                   for k in range(2))
    s = snap(rnd(3, ME, PEER))
    assert d.probe_for(view(s, running(), messages=failed), state) == (ME, PEER)
    step = d.decide(view(s, running(), messages=failed, peer_gone=False), state, settings())
    assert kinds(step) == ["Emit", "ReportFailure"]
    assert events(step) == [WorkerFailed(round=3, world_size=4, members=(ME, PEER),
                                         cause="collective", error="RuntimeError: gloo")]
    report = step.actions[1]
    assert report.round == 3 and report.report == FailureReport(
        node_id=ME, time=T0, description="RuntimeError: gloo", exit_code=1, traceback="tb")
    # A dead peer: a membership change, nothing reported.
    assert d.decide(view(s, running(), messages=failed, peer_gone=True), state,
                    settings()).actions == ()
    # Already reported for this round (this node's report is in etcd): nothing again.
    reported = snap(rnd(3, ME, PEER), failures={3: (report.report,)})
    assert d.decide(view(reported, running(), messages=failed, peer_gone=False), state,
                    settings()).actions == ()
    # A stale message about an older round is ignored.
    old = ((0, CollectiveFailed(round=2)),)
    assert d.probe_for(view(s, running(), messages=old), state) is None
    assert d.decide(view(s, running(), messages=old), state, settings()).actions == ()


def test_a_round_pushed_in_place_is_recorded_once_every_worker_runs_in_it():
    r2 = rnd(2, ME, PEER, cause_time=T0 - 0.3)
    state = d.AgentState(applied=r2, awaiting=r2, rounds_started=1)
    s = snap(r2, masters={2: "h:1"})
    still = d.decide(view(s, running(running_round=1)), state, settings())
    assert still.actions == () and still.state.awaiting == r2
    done = d.decide(view(s, running(running_round=2), messages=((0, Running(2)),)), state,
                    settings())
    [emit] = done.actions
    assert emit.event == Rescale(round=2, world_size=4, members=(ME, PEER), cause="node_joined",
                                 in_place=True, restart_count=0)
    assert emit.timed_from == T0 - 0.3 and done.state.awaiting is None
    first = d.decide(view(s, running(running_round=2)), d.AgentState(applied=r2, awaiting=r2),
                     settings())
    assert events(first) == [Rendezvous(round=2, world_size=4, members=(ME, PEER),
                                        cause="node_joined", in_place=True)]


# -- a new round -----------------------------------------------------------------------------
def test_rank_zero_publishes_the_store_address_first_and_the_others_wait_for_it():
    r = rnd(1, ME, PEER)
    step = d.decide(view(snap(r)), d.AgentState(), settings())
    assert step.actions == (d.PublishMaster(1),) and step.again
    assert step.state.pending == r
    second = d.Round(number=1, members=(Member(PEER, "h", 2), Member(ME, "h", 2)))
    waits = d.decide(view(snap(second)), d.AgentState(), settings())
    assert waits.actions == () and not waits.again and waits.state.pending == second
    # Once the address is there, the pending round starts the workers.
    go = d.decide(view(snap(second, masters={1: "10.0.0.2:2345"})), waits.state, settings())
    start = next(a for a in go.actions if isinstance(a, d.StartWorkers)).assignment
    assert (start.rank_offset, start.world_size, start.master_addr, start.master_port) == (
        2, 4, "10.0.0.2", 2345)
    assert go.state.pending is None


def test_workers_that_cannot_follow_in_place_are_restarted_and_the_round_recorded():
    policy = make_policy("fixed", global_batch=8, reference_world=2)
    r1 = rnd(1, ME, cause="start", cause_time=T0 - 2)
    step = d.decide(view(snap(r1, masters={1: "h:9"})), d.AgentState(),
                    settings(batch_policy=policy, traits=RESTART))
    assert kinds(step) == ["StartWorkers", "Emit"]  # no workers yet: nothing to stop
    assignment = step.actions[0].assignment
    assert assignment.env == policy.plan(2).to_env() and assignment.group_rank == 0
    assert events(step) == [Rendezvous(round=1, world_size=2, members=(ME,), cause="start",
                                       in_place=False)]
    # A later round: a rescale, timed from its cause.
    r2 = rnd(2, ME, PEER, cause_time=T0 - 1)
    later = d.decide(view(snap(r2, masters={2: "h:9"}), running(capable=False)), step.state,
                     settings(batch_policy=policy, traits=RESTART))
    assert later.actions[0] == d.StopWorkers(d.RESTART_GRACE_S)
    assert kinds(later) == ["StopWorkers", "StartWorkers", "Emit"]
    emit = later.actions[-1]
    assert emit.event.name == "rescale" and emit.timed_from == T0 - 1
    assert later.state.rounds_started == 2


def test_capable_workers_get_the_round_pushed_in_place():
    r1, r2 = rnd(1, ME), rnd(2, ME, PEER)
    state = d.AgentState(applied=r1, rounds_started=1)
    step = d.decide(view(snap(r2, masters={2: "h:1"}), running()), state, settings())
    assert kinds(step) == ["PushRound"] and step.state.awaiting == r2
    assert step.actions[0].assignment.round == 2


def test_a_node_left_out_waits_in_standby_when_its_workers_can_else_they_stop():
    r1, r2 = rnd(1, ME, PEER), rnd(2, PEER)
    state = d.AgentState(applied=r1, rounds_started=1)
    s = snap(r2)
    torch = d.decide(view(s, running()), state, settings())
    assert torch.actions == (d.PushStandby(2), d.Emit(Waiting(round=2, world_size=2,
                                                                members=(PEER,),
                                                                cause="node_joined")))
    # Horovod workers that entered a world cannot go back to standby...
    horovod = d.decide(view(s, running()), state, settings(traits=HOROVOD))
    assert kinds(horovod) == ["StopWorkers", "Emit"]
    # ... unless they never left it (pre-warmed, still waiting for their first world).
    ready = d.decide(view(s, running(all_ready=True)), state, settings(traits=HOROVOD))
    assert kinds(ready) == ["PushStandby", "Emit"]
    assert torch.state.pending is None and torch.state.applied == r2


def test_a_world_the_batch_policy_cannot_serve_fails_the_job():
    policy = make_policy("fixed", global_batch=2, reference_world=1)
    r = rnd(1, ME, PEER)  # 4 workers for a global batch of 2
    step = d.decide(view(snap(r, masters={1: "h:1"})), d.AgentState(),
                    settings(batch_policy=policy))
    [finish] = step.actions
    assert finish.outcome.status == "failed" and finish.outcome.reason.startswith("world of 4: ")
    assert step.state.pending is None


def test_a_scale_up_waits_for_starting_workers_to_say_hello_but_not_forever():
    r1, r2 = rnd(1, ME), rnd(2, ME, PEER)
    state = d.AgentState(applied=r1, rounds_started=1)
    starting = running(capable=False, started_at=T0 - 3)
    held = d.decide(view(snap(r2, masters={2: "h:1"}), starting), state, settings())
    assert held.actions == () and held.state.applied == r1
    assert held.wake_at == T0 - 3 + d.HELLO_WAIT_S
    # They said hello: in place.
    hello = d.decide(view(snap(r2, masters={2: "h:1"}), running(started_at=T0 - 3)), state,
                     settings())
    assert kinds(hello) == ["PushRound"]
    # No hello within the bound: restart, and never hold again.
    late = running(capable=False, started_at=T0 - d.HELLO_WAIT_S)
    gave_up = d.decide(view(snap(r2, masters={2: "h:1"}), late), state, settings())
    assert kinds(gave_up) == ["Say", "StopWorkers", "StartWorkers", "Emit"]
    assert gave_up.state.api_unused
    r3 = rnd(3, ME, PEER, "node-c")
    again = d.decide(view(snap(r3, masters={3: "h:1"}), running(capable=False, started_at=T0)),
                     gave_up.state, settings())
    assert "StartWorkers" in kinds(again)


def test_no_hold_when_a_peer_left_in_forced_mode_or_for_other_backends():
    r1, shrunk = rnd(1, ME, PEER), rnd(2, ME)
    state = d.AgentState(applied=r1, rounds_started=1)
    starting = running(capable=False, started_at=T0 - 1)
    assert "StartWorkers" in kinds(d.decide(view(snap(shrunk, masters={2: "h:1"}), starting),
                                            state, settings()))
    grown = rnd(2, ME, PEER, "node-c")
    forced = d.decide(view(snap(grown, masters={2: "h:1"}), starting), state,
                      settings(rescale_mode="in-place"))
    assert "StartWorkers" in kinds(forced)
    restart = d.decide(view(snap(grown, masters={2: "h:1"}), starting), state,
                       settings(traits=RESTART))
    assert "StartWorkers" in kinds(restart)


# -- hangs -------------------------------------------------------------------------------------
def test_a_hung_worker_has_its_stacks_dumped_then_is_killed_and_reported_as_hung():
    r = rnd(1, ME)
    s = snap(r, masters={1: "h:1"})
    cfg = settings(hang_timeout=3.0)
    state = d.AgentState(applied=r, rounds_started=1)
    stuck = running(last_progress=((0, T0 - 1.0), (1, T0 - 4.0)))
    step = d.decide(view(s, stuck), state, cfg)
    assert kinds(step) == ["Emit", "Say", "SignalWorker"]
    assert events(step) == [WorkerHung(round=1, world_size=2, members=(ME,), cause="hang",
                                       local_rank=1, pid=12, idle_s=4.0)]
    assert step.actions[2] == d.SignalWorker(12, signal.SIGUSR1)
    assert step.wake_at == T0 + d.STACK_DUMP_WAIT_S
    # Not reported twice; SIGKILL once its stacks had time to be written.
    soon = d.decide(view(s, stuck, now=T0 + 0.5), step.state, cfg)
    assert soon.actions == ()
    kill = d.decide(view(s, stuck, now=T0 + 1.0), step.state, cfg)
    assert kill.actions == (d.SignalWorker(12, signal.SIGKILL),)
    # Until it is seen dead, a new round waits: its death belongs to round 1.
    newer = snap(rnd(2, ME, PEER), masters={1: "h:1", 2: "h:1"})
    held = d.decide(view(newer, stuck, now=T0 + 1.1), kill.state, cfg)
    assert held.state.applied == r and held.actions == ()
    failure = WorkerFailure(rank=1, local_rank=1, pid=12, exitcode=-9, time=T0 + 1.2,
                            traceback="")
    dead = WorkerStatus(state="failed", failure=failure, pids=(11, 12))
    assert d.probe_for(view(newer, dead), kill.state) is None  # a hang is ours, no probe
    report = d.decide(view(newer, dead, now=T0 + 1.2), kill.state, cfg)
    assert kinds(report) == ["Emit", "StopWorkers", "ReportFailure"]
    assert report.actions[2].report.description.startswith(
        "rank 1 hung: no progress for 4.0 s (--hang-timeout 3)")
    assert report.actions[2].report.exit_code == 1
    assert report.state.applied == r  # the new round comes on the next pass


def test_hangs_are_not_watched_without_a_timeout_or_progress_reports():
    r = rnd(1, ME)
    stuck = running(last_progress=((0, T0 - 100.0),))
    state = d.AgentState(applied=r, rounds_started=1)
    s = snap(r, masters={1: "h:1"})
    assert d.decide(view(s, stuck), state, settings()).actions == ()
    assert d.decide(view(s, stuck), state, settings(traits=HOROVOD, hang_timeout=3)).actions == ()


# -- the workers' end --------------------------------------------------------------------------
def test_workers_that_all_succeeded_finish_the_job():
    r = rnd(1, ME)
    step = d.decide(view(snap(r, masters={1: "h:1"}), WorkerStatus(state="succeeded")),
                    d.AgentState(applied=r, rounds_started=1), settings())
    assert step.actions == (d.Finish(JobOutcome(status="succeeded", node_id=ME)),)


def test_a_worker_failure_is_a_departure_when_a_peer_is_gone_else_reported():
    r = rnd(2, ME, PEER)
    state = d.AgentState(applied=r, rounds_started=2)
    failure = WorkerFailure(rank=1, local_rank=1, pid=12, exitcode=3, time=T0 - 0.1,
                            traceback="Traceback...\nValueError: boom", message="ValueError: boom")
    failed = WorkerStatus(state="failed", failure=failure, pids=(11, 12))
    s = snap(r, masters={2: "h:1"})
    assert d.probe_for(view(s, failed), state) == (ME, PEER)
    gone = d.decide(view(s, failed, peer_gone=True), state, settings())
    assert kinds(gone) == ["Emit", "StopWorkers"]
    assert events(gone) == [WorkerFailed(round=2, world_size=4, members=(ME, PEER), cause="exit",
                                         rank=1, exit_code=3, pid=12)]
    ours = d.decide(view(s, failed, peer_gone=False, failure_hint="run it with --backend horovod"),
                    state, settings())
    report = ours.actions[-1]
    assert report == d.ReportFailure(2, FailureReport(
        node_id=ME, time=T0 - 0.1, exit_code=3, traceback=failure.traceback,
        description="rank 1 (local rank 1, pid 12) exited with code 3: ValueError: boom "
                    "(run it with --backend horovod)"))


def test_nothing_is_checked_before_the_first_round():
    assert d.probe_for(view(snap()), d.AgentState()) is None
    assert d.decide(view(snap(), WorkerStatus(state="failed")), d.AgentState(),
                    settings()).actions == ()


# -- around the loop -------------------------------------------------------------------------
def test_the_leader_records_departures_and_exclusions():
    r = Round(number=4, members=(Member(ME, "h", 2),), cause="node_left", cause_time=T0,
              blacklist=(BlacklistEntry(PEER, strikes=2, excluded_until=T0 + 60, exclusions=1),))
    actions = d.leader_actions(Publish(r, departed=("node-c",), excluded=(PEER,)))
    assert [a.event for a in actions if isinstance(a, d.Emit)] == [
        NodeLeft(round=4, world_size=2, members=(ME,), cause="removed", nodes=("node-c",)),
        NodeExcluded(round=4, world_size=2, members=(ME,), cause="repeated_failures",
                     nodes=(PEER,), until=T0 + 60, exclusions=1)]
    [say] = [a for a in actions if isinstance(a, d.Say)]
    assert say.text == f"node {PEER} failed 2 times; it sits out for 60 s"


def test_a_leaving_node_checkpoints_only_when_no_other_node_remains():
    plan = d.leave_plan(T0 + 30, T0, snap(nodes=(ME, PEER)), ME, running(), TORCH)
    assert plan == d.LeavePlan(grace_s=30.0, checkpoint=False, in_place=True)
    alone = d.leave_plan(None, T0, snap(nodes=(ME,)), ME, running(capable=False), TORCH)
    assert alone == d.LeavePlan(grace_s=0.0, checkpoint=True, in_place=False)
    assert not d.leave_plan(T0 + 5, T0, None, ME, running(), RESTART).in_place
