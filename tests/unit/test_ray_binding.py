"""The Ray binding's pure parts, without Ray or etcd: submissions, the member commands and
environment, Ray's node records -> the core's nodes, the controller's records, a restored
admission, and the command line's errors."""
import pytest

from integrations.ray import cli
from integrations.ray.inventory import alive_nodes, node_from_ray, replica_nodes
from integrations.ray.scheduler import (Config, Node, Shape, State, SubmissionError, Workload,
                                        restore, step, submit)
from integrations.ray.scheduler.model import Binding
from integrations.ray.scheduler.state import apply
from integrations.ray.scheduler.workload import SAME_NODE, Member
from integrations.ray.spec import (ENDPOINT, GANG, MEMBER_LABEL, TRAIN, Submission, agent_command,
                                   gang_command, gang_env, job_id, worst_exit)
from integrations.ray.store import HISTORY_KEPT, Record


def test_a_training_submission_is_an_elastic_workload_of_its_members():
    sub = Submission("train1", TRAIN, ("train.py", "--epochs", 3), min_members=1,
                     max_members=4, cpus=2, memory_mib=512, queue="team-a", priority="high")
    w = sub.workload()
    assert (w.kind, w.min_size, w.max_size, w.queue, w.klass) == ("elastic", 1, 4, "team-a", "high")
    assert w.shape == Shape(cpu_milli=2000, memory_mib=512)
    assert sub.bundle() == {"CPU": 2, "memory": 512 * 2**20}
    assert Submission.from_json(sub.to_json()) == sub
    assert sub.command == ("train.py", "--epochs", "3")


def test_a_strict_pack_gang_must_share_a_node_and_others_leave_it_to_ray():
    packed = Submission("g", GANG, ("true",), min_members=3, max_members=3,
                        placement="strict-pack").workload()
    spread = Submission("g", GANG, ("true",), min_members=3, max_members=3,
                        placement="strict-spread").workload()
    assert (packed.kind, packed.max_size, packed.constraint) == ("gang", 3, SAME_NODE)
    assert spread.constraint is None


def test_an_endpoint_is_an_inference_workload_of_the_replicas_it_asks_for():
    sub = Submission("ep", ENDPOINT, (), min_members=0, max_members=8, cpus=0.5)
    sub.check()  # no command, and a min of 0: it scales to zero
    w = sub.workload()
    assert (w.kind, w.min_size, w.max_size, w.klass) == ("inference", 1, 1, "inference")
    assert sub.workload(5).max_size == 5 and sub.workload(5).min_size == 1
    assert Submission("ep", ENDPOINT, (), min_members=2, max_members=8).workload().min_size == 2


def test_serves_replicas_are_found_in_rays_actor_table_by_their_class():
    def actor(cls, node, state="ALIVE"):
        return {"ActorClassName": cls, "State": state, "Address": {"NodeID": node}}
    table = {"1": actor("ServeReplica:ep:ep", "b"), "2": actor("ServeReplica:ep:ep", "a"),
             "3": actor("ServeReplica:other:other", "a"), "4": actor("ServeController", "h"),
             "5": actor("ServeReplica:ep:ep", "", "PENDING_CREATION"),
             "6": actor("ServeReplica:ep:ep", "c", "DEAD")}
    assert replica_nodes(table, "ep") == ["a", "b"]
    assert replica_nodes(table, "ep", state="PENDING_CREATION") == [""]


@pytest.mark.parametrize("changes, message", [
    (dict(name="Team_A"), "lower-case letters"),
    (dict(kind="batch"), "kind must be one of train, gang, endpoint"),
    (dict(min_members=0), "members must be within 1..max"),
    (dict(kind=ENDPOINT, min_members=0, max_members=0), "max >= 1"),
    (dict(command=()), "give the command"),
    (dict(placement="tight"), "--placement must be one of pack, spread"),
    (dict(kind=GANG, min_members=1, max_members=2), "a gang has one size"),
    (dict(cpus=-1), "must not be negative"),
    (dict(cpus=0), "must ask for some CPU, memory or GPU"),
])
def test_bad_submissions_say_what_to_change(changes, message):
    sub = Submission(**{**dict(name="w", kind=TRAIN, command=("x.py",)), **changes})
    with pytest.raises(SubmissionError, match=message):
        sub.workload()


def test_a_member_agent_is_labelled_with_its_member_and_joins_the_workloads_job():
    sub = Submission("train1", TRAIN, ("train.py", "--lr", "0.1"), min_members=1, max_members=4,
                     nproc_per_node=2, agent_args=("--global-batch-size", "32"))
    argv = agent_command(sub, "10.0.0.1:2379", job_id(sub, 0), "train1.3.0", python="py")
    assert argv == ["py", "-m", "elastic.run", "--nnodes", "1:4", "--nproc-per-node", "2",
                    "--rdzv-endpoint", "10.0.0.1:2379", "--rdzv-id", "train1", "--node-label",
                    f"{MEMBER_LABEL}=train1.3.0", "--global-batch-size", "32", "train.py",
                    "--lr", "0.1"]
    assert job_id(sub, 2) == "train1-2"  # readmitted after a preemption stopped it


def test_gang_members_get_torchruns_variables():
    env = gang_env(1, 3, "10.0.0.5", 29500, "g-0")
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "3" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == "29500"
    assert env["LOCAL_WORLD_SIZE"] == "1" and env["GROUP_RANK"] == "1"
    assert gang_command(Submission("g", GANG, ("job.py", "-v")), python="py") == ["py", "job.py", "-v"]
    assert gang_command(Submission("g", GANG, ("bash", "-c", "x"))) == ["bash", "-c", "x"]


def test_a_gangs_exit_status_is_its_first_failing_members():
    assert worst_exit([0, 0, 0]) == 0
    assert worst_exit([0, 3, -9]) == 3
    assert worst_exit([None, -9]) == -9


def test_ray_node_records_become_the_cores_nodes():
    infos = [
        {"NodeID": "head", "Alive": True, "Resources": {"memory": 2**33},
         "Labels": {"ray.io/node-id": "head"}},
        {"NodeID": "n1", "Alive": True,
         "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 64 * 2**30, "accelerator_type:A100": 1},
         "Labels": {"ray.io/node-id": "n1", "capacity-type": "spot", "zone": "a",
                    "gpu-memory-mib": "81920"}},
        {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 8.0}},
    ]
    nodes = alive_nodes(infos)
    assert [n.name for n in nodes] == ["head", "n1"]
    n1 = nodes[1]
    assert (n1.cpu_milli, n1.memory_mib, n1.spot, n1.zone) == (8000, 65536, True, "a")
    assert [(g.model, g.memory_mib) for g in n1.gpus] == [("A100", 81920)] * 2
    assert "ray.io/node-id" not in n1.labels
    labelled = node_from_ray({"NodeID": "x", "Resources": {"GPU": 1},
                              "Labels": {"gpu-model": "H100"}})
    assert labelled.gpu_model == "H100" and labelled.cpu_milli == 0


def test_records_round_trip_and_keep_a_bounded_history():
    rec = Record(state="running", members=({"id": "w/0", "node": "n1", "gpus": [],
                                            "joined_at": 1.0},), attempt=2)
    for i in range(HISTORY_KEPT + 5):
        rec.note(float(i), f"event {i}")
    back = Record.from_json(rec.to_json())
    assert back == rec
    assert len(back.history) == HISTORY_KEPT and back.history[-1].endswith(f"event {HISTORY_KEPT + 4}")


def test_a_restored_admission_keeps_its_member_numbering_and_the_step_sees_it_as_running():
    nodes = [Node(f"n{i}", 2000, 4096) for i in range(3)]
    state = State.of(Config.default(), nodes, now=0)
    w = Workload.elastic("job", 1, 3, Shape(cpu_milli=2000))
    # members 0 and 1 left long ago; 2 and 4 run on n0 and n1
    members = (Member("job/2", Binding("n0"), 5.0), Member("job/4", Binding("n1"), 9.0))
    state = restore(state, w, "default", members, now=10, submitted_at=1.0, next_member=5,
                    ready=True)
    a = state.admitted["job"]
    assert [m.id for m in a.members] == ["job/2", "job/4"] and a.ready and a.next_member == 5
    assert state.nodes["n0"].used_cpu_milli == 2000 and state.nodes["n2"].used_cpu_milli == 0
    result = step(state, now=11)
    [grow] = [d for d in result.decisions if type(d).__name__ == "Resize"]
    assert [m.id for m in grow.added] == ["job/5"] and grow.added[0].node == "n2"
    state = apply(state, result)
    assert state.admitted["job"].size == 3


def test_a_restored_workload_is_checked_like_a_submission():
    state = State.of(Config.default(), [Node("n0", 1000, 1024)], now=0)
    big = Workload.gang("big", 1, Shape(cpu_milli=4000))
    with pytest.raises(SubmissionError, match="no node or node type"):
        restore(state, big, "default", (Member("big/0", Binding("n0"), 0.0),), 0, 0, 1, True)
    assert submit(state, Workload.gang("ok", 1, Shape(cpu_milli=1000)), 0).pending


@pytest.mark.parametrize("argv, message", [
    (["submit", "train", "--nnodes", "one:4", "x.py"], "--nnodes takes MIN:MAX"),
    (["submit", "gang", "--members", "2", "--env", "NOEQUALS", "--", "true"],
     "--env takes KEY=VALUE"),
    (["submit", "gang", "--members", "2"], "give the command to run"),
    (["list"], "no etcd endpoint"),
])
def test_command_line_errors_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv(cli.ENV_ENDPOINT, raising=False)
    if argv != ["list"]:
        argv = argv[:2] + ["--rdzv-endpoint", "127.0.0.1:1"] + argv[2:]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_bad_queue_file_fails_the_controller_at_start_with_the_fields_path(tmp_path, capsys):
    bad = tmp_path / "queues.yaml"
    bad.write_text("clusterQueues:\n  - name: a\n    flavors:\n      - name: default\n"
                   "        resources: {cpu: {nominalQuota: eight}}\n")
    assert cli.main(["controller", "--address", "auto", "--rdzv-endpoint", "127.0.0.1:1",
                     "--queues", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "clusterQueues[0].flavors[0].resources.cpu.nominalQuota" in err, err


def test_a_spot_notice_in_a_jobs_history_names_the_member_to_drain_and_a_release_does_not():
    from integrations.ray.inventory import noticed_members
    events = [{"event": "rescale", "node": "a1"},
              {"event": "preemption_notice", "node": "a2", "cause": "released"},
              {"event": "preemption_notice", "node": "a3", "cause": "url"},
              {"event": "preemption_notice", "node": "a3", "cause": "url"},
              {"event": "preemption_notice", "node": "stranger", "cause": "file"}]
    member_of = {"a1": "job.0.0", "a2": "job.1.0", "a3": "job.2.0"}
    assert noticed_members(events, member_of) == ["job.2.0"]


def test_a_missing_working_directory_is_refused_before_etcd(capsys, tmp_path):
    assert cli.main(["submit", "gang", "--rdzv-endpoint", "127.0.0.1:1", "--members", "1",
                     "--working-dir", str(tmp_path / "nope"), "--", "x.py"]) == 2
    assert "no such directory" in capsys.readouterr().err
