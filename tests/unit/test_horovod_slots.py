"""Horovod's view of a round (integrations.horovod.slots) and host discovery's output, pure."""
from collections import namedtuple

import pytest

from integrations.horovod.discover import hosts
from integrations.horovod.slots import REMOVED, Slot, node_slots, worker_env
from launcher.network import iface_of
from rendezvous.api import NodeInfo

Addr = namedtuple("Addr", "address")


def test_two_nodes_of_two_workers():
    assert node_slots([2, 2], 1) == (Slot(2, 4, 0, 2, 1, 2), Slot(3, 4, 1, 2, 1, 2))


def test_uneven_nodes_give_each_local_rank_its_own_cross_communicator():
    # Local rank 1 exists on nodes 1 and 3 only; local rank 2 on node 3 only.
    members = [1, 2, 1, 3]
    assert [s.rank for n in range(4) for s in node_slots(members, n)] == list(range(7))
    assert node_slots(members, 1)[1] == Slot(rank=2, size=7, local_rank=1, local_size=2,
                                             cross_rank=0, cross_size=2)
    assert node_slots(members, 3) == (Slot(4, 7, 0, 3, 3, 4), Slot(5, 7, 1, 3, 1, 2),
                                      Slot(6, 7, 2, 3, 0, 1))


@pytest.mark.parametrize("members, group_rank", [([1, 1], 2), ([1, 1], -1), ([1, 0], 0)])
def test_bad_rounds_are_refused(members, group_rank):
    with pytest.raises(ValueError):
        node_slots(members, group_rank)


def test_rank_and_size_answer_and_removed():
    assert Slot(3, 4, 1, 2, 1, 2).answer() == "3,4,1,2,1,2"
    assert REMOVED.split(",")[0] == "-1" and len(REMOVED.split(",")) == 6


def test_worker_env_names_the_slot_the_endpoint_and_the_controller():
    env = worker_env(Slot(1, 2, 0, 1, 1, 2), hostname="node-b", port=4242, iface="lo",
                     plan_url="http://127.0.0.1:4242/elastic_plan/node-b:0")
    assert env["HOROVOD_RANK"] == "1" and env["HOROVOD_CROSS_SIZE"] == "2"
    assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "127.0.0.1"
    assert env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "4242"
    assert env["HOROVOD_HOSTNAME"] == "node-b" and env["HOROVOD_GLOO_IFACE"] == "lo"
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_ELASTIC"] == "1"
    assert "HOROVOD_GLOO_IFACE" not in worker_env(Slot(0, 1, 0, 1, 0, 1), hostname="h", port=1,
                                                  iface=None, plan_url="u")


def test_iface_is_the_interface_holding_the_address():
    interfaces = {"lo": [Addr("127.0.0.1")], "eth0": [Addr("10.0.0.5"), Addr("fe80::1")]}
    assert iface_of("127.0.0.1", interfaces) == "lo"
    assert iface_of("10.0.0.5", interfaces) == "eth0"
    assert iface_of("192.168.1.1", interfaces) is None


def node(node_id, host, nproc, joined_at):
    return NodeInfo(node_id=node_id, host=host, nproc=nproc, health_addr="", lease_id=1,
                    joined_at=joined_at)


def test_discovered_hosts_sum_the_agents_of_a_host_in_join_order():
    nodes = {n.node_id: n for n in [node("c", "10.0.0.2", 4, 3.0), node("a", "10.0.0.1", 2, 1.0),
                                    node("b", "10.0.0.1", 1, 2.0)]}
    assert hosts(nodes) == [("10.0.0.1", 3), ("10.0.0.2", 4)]
    assert hosts({}) == []
