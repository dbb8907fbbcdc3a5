"""launcher/devices.py: which GPUs a node's workers get, from recorded topologies (pure)."""
import itertools

import pytest

from launcher.devices import (INTERNAL, NODE, NVLINK, PHB, PIX, SYS, DeviceError, Gpu, GpuRequest,
                              NodeGpus, UnhealthyGpus, assign, best_connected, memory_shares,
                              parse_link, topology_order, visible_devices)


def matrix(rows):
    """nvidia-smi topo -m's table (strings) -> link levels."""
    return tuple(tuple(parse_link(cell) for cell in row.split()) for row in rows)


# A DGX-like node: two NVLink islands of four, joined across sockets.
TWO_ISLANDS = matrix([
    "X   NV4 NV4 NV4 SYS SYS SYS SYS",
    "NV4 X   NV4 NV4 SYS SYS SYS SYS",
    "NV4 NV4 X   NV4 SYS SYS SYS SYS",
    "NV4 NV4 NV4 X   SYS SYS SYS SYS",
    "SYS SYS SYS SYS X   NV4 NV4 NV4",
    "SYS SYS SYS SYS NV4 X   NV4 NV4",
    "SYS SYS SYS SYS NV4 NV4 X   NV4",
    "SYS SYS SYS SYS NV4 NV4 NV4 X  ",
])
# Islands interleaved by index: {0, 2, 4, 6} and {1, 3, 5, 7}.
INTERLEAVED = tuple(tuple(INTERNAL if a == b else NVLINK if a % 2 == b % 2 else SYS
                          for b in range(8)) for a in range(8))
# PCIe only: pairs under one switch (PIX), switches under one host bridge per socket.
PCIE = matrix([
    "X    PIX  PHB  PHB  SYS  SYS",
    "PIX  X    PHB  PHB  SYS  SYS",
    "PHB  PHB  X    PIX  SYS  SYS",
    "PHB  PHB  PIX  X    SYS  SYS",
    "SYS  SYS  SYS  SYS  X    PIX",
    "SYS  SYS  SYS  SYS  PIX  X  ",
])


def node(links, unhealthy=(), source="test"):
    gpus = tuple(Gpu(i, f"GPU-{i:08x}-0000", "NVIDIA H100", 81559,
                     problems=("Xid 79 (fallen off the bus)",) if i in unhealthy else ())
                 for i in range(len(links)))
    return NodeGpus(gpus, links, source)


def pairs_worst(n, devices):
    return max(n.link(a, b) for a, b in itertools.combinations(devices, 2))


def test_links_read_as_nvidia_smi_writes_them():
    assert [parse_link(x) for x in ("X", "NV18", "PIX", "PXB", "PHB", "NODE", "SYS")] == \
        [0, NVLINK, PIX, 20, PHB, NODE, SYS]
    with pytest.raises(ValueError, match="not X, NV<n>"):
        parse_link("SOC")


def test_ranks_of_a_node_sit_in_one_nvlink_island_in_index_order():
    a = assign(node(TWO_ISLANDS), 4, GpuRequest())
    assert a.own == ((0,), (1,), (2,), (3,))
    assert [a.env(r)["CUDA_VISIBLE_DEVICES"] for r in range(4)] == ["0,1,2,3"] * 4
    assert [a.env(r)["ELASTIC_CUDA_DEVICE"] for r in range(4)] == ["0", "1", "2", "3"]
    assert a.env(0)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "worst link NV" in a.note


def test_an_unhealthy_device_moves_the_ranks_to_the_other_island():
    a = assign(node(TWO_ISLANDS, unhealthy={1}), 4, GpuRequest())
    assert a.used == (4, 5, 6, 7)
    assert "left out as unhealthy: GPU 1 (Xid 79" in a.note


def test_islands_interleaved_by_index_are_still_found():
    n = node(INTERLEAVED)
    assert best_connected(n, range(8), 4) == (0, 2, 4, 6)
    assert topology_order(n, range(8)) == (0, 2, 4, 6, 1, 3, 5, 7)
    two_each = assign(n, 2, GpuRequest(gpus_per_proc=4))
    assert two_each.own == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert [two_each.env(r)["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["0,2,4,6", "1,3,5,7"]
    assert [two_each.env(r)["ELASTIC_CUDA_DEVICE"] for r in (0, 1)] == ["0", "0"]


def test_pcie_pairs_under_one_switch_are_preferred():
    n = node(PCIE)
    assert best_connected(n, range(6), 2) == (0, 1)
    assert best_connected(n, [1, 2, 3, 5], 2) == (2, 3)
    assert best_connected(n, range(6), 4) == (0, 1, 2, 3)
    assert best_connected(n, [0, 2, 4, 5], 3) == (0, 2, 4)  # SYS either way: lowest indices


@pytest.mark.parametrize("links", [TWO_ISLANDS, INTERLEAVED, PCIE],
                         ids=["islands", "mixed", "pcie"])
def test_the_choice_is_the_best_worst_link_over_every_subset(links):
    n = node(links)
    for k in range(2, len(links) + 1):
        chosen = best_connected(n, range(len(links)), k)
        assert len(set(chosen)) == k
        best = min(pairs_worst(n, c) for c in itertools.combinations(range(len(links)), k))
        assert pairs_worst(n, chosen) == best


@pytest.mark.parametrize("nproc,per_proc", [(1, 1), (2, 1), (8, 1), (2, 2), (4, 2), (2, 4),
                                            (3, None), (8, None)])
def test_ranks_get_distinct_devices(nproc, per_proc):
    a = assign(node(TWO_ISLANDS), nproc, GpuRequest(gpus_per_proc=per_proc))
    owned = [i for own in a.own for i in own]
    assert len(owned) == len(set(owned)) == nproc * (per_proc or 1)
    assert all(share == 1.0 for share in memory_shares(a).values())


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.34, 0.3, 0.25, 0.2, 0.1, 0.07])
@pytest.mark.parametrize("nproc", [1, 2, 3, 5, 8, 13])
def test_memory_shares_never_exceed_a_device(fraction, nproc):
    n = node(TWO_ISLANDS)
    try:
        a = assign(n, nproc, GpuRequest(memory_fraction=fraction))
    except DeviceError as exc:  # more workers than 8 GPUs can hold at that fraction
        assert nproc > 8 * int(1 / fraction + 1e-9)
        assert "need" in str(exc) and "ask for fewer" in str(exc)
        return
    shares = memory_shares(a)
    assert sum(len(own) for own in a.own) == nproc
    assert all(total <= 1.0 + 1e-9 for total in shares.values()), shares
    assert all(a.env(r)["CUDA_VISIBLE_DEVICES"] == str(a.own[r][0]) for r in range(nproc))
    assert all(a.env(r)["ELASTIC_GPU_MEMORY_FRACTION"] == repr(fraction) for r in range(nproc))
    # As few devices as the fraction allows, the best-connected ones.
    assert len(shares) == -(-nproc // int(1 / fraction + 1e-9))


def test_a_fifth_of_a_gpu_lets_five_workers_share_it():
    a = assign(node(TWO_ISLANDS), 5, GpuRequest(memory_fraction=0.2))
    assert a.own == ((0,),) * 5 and memory_shares(a) == {0: pytest.approx(1.0)}


def test_more_workers_than_gpus_share_them_all_unlimited_as_torchrun():
    a = assign(node(PCIE), 8, GpuRequest())
    assert a.own == ((),) * 8 and a.used == (0, 1, 2, 3, 4, 5)
    assert a.env(7)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5"
    assert a.env(7)["ELASTIC_CUDA_DEVICE"] == "1"
    assert "more workers than GPUs" in a.note


def test_a_user_cuda_visible_devices_is_respected_in_its_own_words():
    n = node(TWO_ISLANDS)
    a = assign(n, 2, GpuRequest(visible="GPU-00000006,3,7"))
    assert a.used == (6, 7) and a.env(0)["CUDA_VISIBLE_DEVICES"] == "GPU-00000006,7"
    b = assign(n, 2, GpuRequest(visible="3,GPU-00000006,0"))
    assert b.used == (0, 3) and b.env(1)["CUDA_VISIBLE_DEVICES"] == "0,3"  # NVLink over SYS
    # As CUDA: entries after the first that is no device are not seen.
    assert visible_devices(n, "5,9,6") == {5: "5"}
    assert visible_devices(n, "-1") == {}
    assert visible_devices(n, "MIG-1234") is None


def test_what_is_left_alone():
    n = node(TWO_ISLANDS)
    for request in (GpuRequest(gpus_per_proc=0), GpuRequest(visible="MIG-abc"),
                    GpuRequest(visible="")):
        a = assign(n, 2, request)
        assert a.mode == "none" and a.local_env(2) == () and a.env(0) == {}
        assert "CUDA_VISIBLE_DEVICES left as it is" in a.note
    none = assign(NodeGpus((), ()), 2, GpuRequest(gpus_per_proc=1))
    assert none.local_env(2) == () and "no GPU" in none.note


def test_requests_a_node_cannot_serve_say_what_to_change():
    n = node(PCIE)
    with pytest.raises(DeviceError, match=r"--gpus-per-proc 2 x 4 workers need 8 GPUs; this "
                                          r"node shows 6 \(test\); ask for fewer"):
        assign(n, 4, GpuRequest(gpus_per_proc=2))
    with pytest.raises(DeviceError, match=r"shows 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        assign(n, 5, GpuRequest(memory_fraction=0.5, visible="0,1"))
    with pytest.raises(DeviceError, match="must be in"):
        GpuRequest(memory_fraction=1.5)
    with pytest.raises(DeviceError, match="leave out --gpus-per-proc 2"):
        GpuRequest(gpus_per_proc=2, memory_fraction=0.5)
    with pytest.raises(DeviceError, match="0 or more"):
        GpuRequest(gpus_per_proc=-1)


def test_too_few_healthy_gpus_keep_the_node_out_and_say_which():
    n = node(tuple(row[:2] for row in PCIE[:2]), unhealthy={1})
    with pytest.raises(UnhealthyGpus) as err:
        assign(n, 2, GpuRequest())
    message = str(err.value)
    assert "GPU 1 (GPU-00000001-0000): Xid 79 (fallen off the bus)" in message
    assert "stays out of the job" in message and "\n" not in message
    assert assign(n, 1, GpuRequest()).used == (0,)  # one worker still has a healthy GPU
    with pytest.raises(UnhealthyGpus):
        assign(node(tuple(row[:1] for row in PCIE[:1]), unhealthy={0}), 4, GpuRequest())


def test_a_topology_must_be_square_and_symmetric():
    gpus = (Gpu(0, "a"), Gpu(1, "b"))
    with pytest.raises(ValueError, match="2x2"):
        NodeGpus(gpus, ((0, 5),))
    with pytest.raises(ValueError, match="not symmetric"):
        NodeGpus(gpus, ((0, 5), (10, 0)))


# -- what reaches the workers --------------------------------------------------------------------

def test_each_local_rank_gets_its_own_variables_in_standby_and_in_a_round():
    from launcher.workers import WorkerSpec, WorldAssignment, worker_env

    a = assign(node(TWO_ISLANDS), 2, GpuRequest(gpus_per_proc=2))
    spec = WorkerSpec(argv=("python", "train.py"), nproc=2, local_env=a.local_env(2))
    world = WorldAssignment(run_id="r", round=3, group_rank=0, group_world_size=1,
                            rank_offset=0, world_size=2, master_addr="127.0.0.1",
                            master_port=29500, restart_count=0, max_restarts=0)
    base = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "PATH": "/bin"}
    for assignment in (None, world):
        envs = [worker_env(base, spec, assignment, r) for r in (0, 1)]
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
        assert all(e["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and e["PATH"] == "/bin" for e in envs)
    with pytest.raises(ValueError, match="1 entries for 2 workers"):
        WorkerSpec(argv=("python", "x.py"), nproc=2, local_env=({},))


def test_the_worker_reads_its_device_and_share():
    import elastic.gpu as gpu

    assert gpu.memory_fraction({"ELASTIC_GPU_MEMORY_FRACTION": "0.25"}) == 0.25
    assert gpu.memory_fraction({}) is None
    assert gpu.ordinal({"ELASTIC_CUDA_DEVICE": "0", "LOCAL_RANK": "3"}) == 0
    assert gpu.ordinal({"LOCAL_RANK": "3"}) == 3
    import torch
    if not torch.cuda.is_available():  # without CUDA: the CPU, and no limit to apply
        assert gpu.device({"ELASTIC_CUDA_DEVICE": "1"}) == torch.device("cpu")
        assert gpu.setup({"ELASTIC_GPU_MEMORY_FRACTION": "0.5"}) is None
