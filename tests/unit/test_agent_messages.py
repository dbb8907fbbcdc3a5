"""What the agent tells the user while it waits (pure: a Snapshot in, a line out)."""
from rendezvous.api import JobOutcome, JobSpec, Member, NodeInfo, RendezvousSettings, Round
from rendezvous.store import Snapshot

from launcher.decision import waiting_message

SETTINGS = RendezvousSettings(run_id="job7", min_nodes=2, max_nodes=2)


def snap(nodes, rnd=None, outcome=None):
    infos = {n: NodeInfo(node_id=n, host="h", nproc=1, health_addr="", lease_id=1, joined_at=0)
             for n in nodes}
    return Snapshot(nodes=infos, leader=None, round=rnd, round_revision=0, masters={},
                    failures={}, outcome=outcome, spec=JobSpec(min_nodes=2, max_nodes=2,
                                                                 created_at=0.0))


def test_below_min_says_how_many_are_here_and_how_others_join():
    text = waiting_message(snap(["a"]), "a", SETTINGS, "10.0.0.1:2379")
    assert text == ("waiting for nodes: 1 of the 2 needed are here (job 'job7' at etcd "
                    "10.0.0.1:2379); start the others with --rdzv-endpoint 10.0.0.1:2379 "
                    "--rdzv-id job7")


def test_a_node_left_out_of_a_full_job_waits_for_room():
    full = Round(number=1, members=(Member("a", "h", 1), Member("b", "h", 1)))
    text = waiting_message(snap(["a", "b", "c"], full), "c", SETTINGS, "e:1")
    assert text.startswith("waiting as a spare: the job runs at its size of 2 nodes")


def test_nothing_to_say_when_running_or_finished():
    running = Round(number=1, members=(Member("a", "h", 1), Member("b", "h", 1)))
    assert waiting_message(snap(["a", "b"], running), "a", SETTINGS, "e:1") is None
    done = snap(["a"], outcome=JobOutcome("succeeded"))
    assert waiting_message(done, "a", SETTINGS, "e:1") is None
