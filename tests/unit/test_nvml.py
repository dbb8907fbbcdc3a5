"""integrations/nvml: one contract for the real probe and the recorded fake; the health rule;
the health notice source; a machine without NVML; the scheduler's view of the node."""
import json
import shutil
from pathlib import Path

import pytest

from integrations.nvml.__main__ import main as nvml_main
from integrations.nvml.fake import FakeProbe
from integrations.nvml.health import GpuHealthSource
from integrations.nvml.inventory import ray_start_args, scheduler_node
from integrations.nvml.node import plan_node
from integrations.nvml.nvml import NvmlProbe
from integrations.nvml.choose import open_probe
from integrations.nvml.probe import (DeviceInfo, DeviceState, NoGpus, ProbeError, node_gpus,
                                     problems, record)
from launcher.devices import LINK_NAMES, NVLINK, SYS, GpuRequest, UnhealthyGpus
from launcher.preemption import NoticeConfig, NoticeSourceError, NoticeWatcher

DATA = Path(__file__).parent / "data"
ISLANDS, PCIE = DATA / "gpus-two-islands.json", DATA / "gpus-two-pcie.json"


def real_probe():
    try:
        return NvmlProbe()
    except NoGpus as exc:
        pytest.skip(f"no GPU on this machine ({exc})")


@pytest.fixture(params=["fake", "real"])
def probe(request):
    p = FakeProbe(str(ISLANDS)) if request.param == "fake" else real_probe()
    yield p
    p.close()


def copy_state(tmp_path, source=ISLANDS):
    path = tmp_path / "gpus.json"
    shutil.copy(source, path)
    return path


def change_state(path, index, **fields):
    """Rewrite one device's recorded state, as a test does while the agent runs."""
    doc = json.loads(path.read_text())
    doc["devices"][index].update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


# -- the contract, for the fake and (where there is one) the real GPU ----------------------------

def test_devices_are_listed_once_in_index_order(probe):
    devices = probe.devices()
    assert devices and all(isinstance(d, DeviceInfo) for d in devices)
    assert [d.index for d in devices] == list(range(len(devices)))
    assert len({d.uuid for d in devices}) == len(devices)
    assert all(d.uuid.startswith("GPU-") and d.name and d.memory_total_mib > 0 for d in devices)


def test_links_are_a_symmetric_matrix_of_known_levels(probe):
    links, n = probe.links(), len(probe.devices())
    assert len(links) == n and all(len(row) == n for row in links)
    assert all(links[i][i] == 0 for i in range(n))
    assert all(links[a][b] == links[b][a] and links[a][b] in LINK_NAMES
               for a in range(n) for b in range(n))
    assert all(links[a][b] > 0 for a in range(n) for b in range(n) if a != b)


def test_states_say_use_and_health_of_every_device(probe):
    states = probe.states()
    assert [s.index for s in states] == [d.index for d in probe.devices()]
    for s in states:
        assert isinstance(s, DeviceState)
        assert s.utilization_pct is None or 0 <= s.utilization_pct <= 100
        assert s.memory_used_mib is None or s.memory_used_mib >= 0
        assert isinstance(problems(s), tuple)


def test_a_recording_replays_as_the_same_machine(probe, tmp_path):
    path = tmp_path / "recorded.json"
    path.write_text(json.dumps(record(probe)))
    replay = FakeProbe(str(path))
    assert replay.devices() == probe.devices() and replay.links() == probe.links()
    live, replayed = node_gpus(probe), node_gpus(replay)
    assert [g.problems for g in replayed.gpus] == [g.problems for g in live.gpus]
    assert replay.source == f"FAKE, recorded in {path}"


# -- no NVIDIA driver ----------------------------------------------------------------------------

def test_without_a_driver_the_real_probe_says_so_and_the_workers_run_on_cpu():
    try:
        import pynvml
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(NoGpus, match=r"no NVIDIA driver \(NVML library not found\)"):
        NvmlProbe()
    plan = plan_node("nvml", 2, GpuRequest(gpus_per_proc=1))
    assert plan.local_env == () and plan.health is None
    assert plan.note == ("no GPU: no NVIDIA driver (NVML library not found); the workers run on "
                         "CPU; --gpus-per-proc ignored")


def test_not_looking_leaves_the_devices_alone():
    plan = plan_node("none", 2, GpuRequest())
    assert plan.local_env == () and plan.health is None
    assert plan.note == ("GPUs not inspected: --gpu-probe none; CUDA_VISIBLE_DEVICES left as it "
                         "is")
    with pytest.raises(ValueError, match="use nvml, fake:PATH"):
        open_probe("cuda")


# -- the health rule -----------------------------------------------------------------------------

def test_what_makes_a_gpu_unhealthy():
    assert problems(DeviceState(0, utilization_pct=100, memory_used_mib=80000)) == ()
    assert problems(DeviceState(0, xids=(13, 31, 43, 45, 68, 109))) == ()  # the application's
    assert problems(DeviceState(0, xids=(79, 79, 48, 150))) == (
        "Xid 79 (fallen off the bus)", "Xid 48 (double-bit ECC error)", "Xid 150")
    assert problems(DeviceState(0, lost=True, ecc_uncorrected=3, retired_pages_pending=True,
                                row_remap_pending=True)) == (
        "does not answer (GPU lost)", "3 uncorrectable ECC errors",
        "retired pages pending a GPU reset", "row remapping pending a GPU reset")
    assert problems(DeviceState(0, row_remap_pending=True, row_remap_failure=True)) == (
        "row remapping failed",)


# -- the fake replays what the file says, now ----------------------------------------------------

def test_the_fake_reads_the_states_again_on_every_call(tmp_path):
    path = copy_state(tmp_path)
    fake = FakeProbe(str(path))
    assert fake.states()[2].utilization_pct == 87 and fake.states()[2].memory_used_mib == 40110
    change_state(path, 5, xids=[79], utilization_pct=0)
    assert fake.states()[5].xids == (79,)
    assert node_gpus(fake).gpus[5].problems == ("Xid 79 (fallen off the bus)",)
    path.write_text("{not json")
    with pytest.raises(ProbeError, match="cannot be read"):
        fake.states()


@pytest.mark.parametrize("content,why", [
    ("[]", "no list of devices"),
    ('{"devices": [{"index": 0}]}', "not a recorded GPU state"),
    ('{"devices": [{"index": 0, "uuid": "GPU-1"}], "topology": ["X NV2"]}', "1x1 matrix"),
])
def test_a_file_that_is_no_recording_is_refused_at_start(tmp_path, content, why):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=why) as err:
        open_probe(f"fake:{path}")
    assert f"--gpu-probe fake:{path}" in str(err.value)


# -- health in the loop --------------------------------------------------------------------------

def test_an_xid_on_a_watched_gpu_is_a_notice_that_names_it(tmp_path):
    path = copy_state(tmp_path)
    source = GpuHealthSource(FakeProbe(str(path)), watched=[4, 5, 6, 7])
    assert source.check() is None
    change_state(path, 1, xids=[79])  # not one of ours
    assert source.check() is None
    change_state(path, 6, xids=[31])  # the application's own fault: not the GPU's
    assert source.check() is None
    change_state(path, 6, xids=[31, 48])
    detail, deadline = source.check()
    uuid = json.loads(path.read_text())["devices"][6]["uuid"]
    assert detail == f"fake GPU 6 ({uuid}): Xid 48 (double-bit ECC error)" and deadline is None
    path.write_text("")
    with pytest.raises(NoticeSourceError, match="GPU health cannot be read"):
        source.check()


def test_the_watcher_turns_a_gpu_failure_into_a_notice_that_exits_non_zero(tmp_path):
    path = copy_state(tmp_path, PCIE)
    source = GpuHealthSource(FakeProbe(str(path)), watched=[0])
    got, warnings = [], []
    watcher = NoticeWatcher(NoticeConfig(extra=(source,), default_grace=20.0), got.append,
                            clock=lambda: 100.0, warn=warnings.append)
    assert watcher.check_once() is None
    change_state(path, 0, ecc_uncorrected=2)
    notice = watcher.check_once()
    assert (notice.source, notice.exit_code, notice.deadline) == ("gpu", 1, 120.0)
    assert notice.detail.endswith("): 2 uncorrectable ECC errors")
    assert got == [notice] and warnings == []


# -- the node's plan: devices and what is watched ------------------------------------------------

def test_the_plan_gives_each_rank_its_devices_and_watches_only_those(tmp_path):
    path = copy_state(tmp_path)
    change_state(path, 0, ecc_uncorrected=1)
    plan = plan_node(f"fake:{path}", 2, GpuRequest(gpus_per_proc=2))
    # GPU 0 is out: the four of the other island are all NVLinked, 1-3 with 4 are not.
    assert [env["CUDA_VISIBLE_DEVICES"] for env in plan.local_env] == ["4,5", "6,7"]
    assert plan.health.watched == {4, 5, 6, 7}
    assert plan.note.startswith(f"GPUs (FAKE, recorded in {path}): ")
    assert "left out as unhealthy: GPU 0 (1 uncorrectable ECC errors)" in plan.note
    plan.close()


def test_a_node_without_enough_healthy_gpus_is_refused(tmp_path):
    path = copy_state(tmp_path, PCIE)
    change_state(path, 1, lost=True)
    with pytest.raises(UnhealthyGpus, match=r"GPU 1 \(GPU-01.*\): does not answer"):
        plan_node(f"fake:{path}", 2, GpuRequest())
    assert plan_node(f"fake:{path}", 1, GpuRequest()).health.watched == {0}


# -- the scheduler's inventory -------------------------------------------------------------------

def test_the_scheduler_core_gets_the_healthy_gpus_of_the_node(tmp_path):
    path = copy_state(tmp_path)
    change_state(path, 3, xids=[79])
    probe = FakeProbe(str(path))
    node = scheduler_node("node-a", probe, cpu_milli=64000, memory_mib=512000,
                          labels={"zone": "a"})
    assert len(node.gpus) == 7 and node.gpu_model == "NVIDIA A100-SXM4-80GB"
    assert {g.memory_mib for g in node.gpus} == {81920} and node.zone == "a"
    assert (node.cpu_milli, node.memory_mib) == (64000, 512000)
    assert ray_start_args(probe) == ["--num-gpus", "7", "--labels",
                                     "gpu-model=NVIDIA A100-SXM4-80GB,gpu-memory-mib=81920"]
    assert scheduler_node("cpu-only", None, cpu_milli=2000, memory_mib=1024).gpus == ()


def test_the_command_line_shows_records_and_prints_ray_flags(tmp_path, capsys):
    assert nvml_main(["--gpu-probe", f"fake:{ISLANDS}"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"GPUs (FAKE, recorded in {ISLANDS}):")
    assert "   2  NVIDIA A100-SXM4-80GB             81920     40110     87  ok" in shown
    assert "\n  GPU0     X     NV     NV     NV    SYS" in shown
    assert nvml_main(["--gpu-probe", f"fake:{PCIE}", "record"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert recorded["topology"] == ["X SYS", "SYS X"] and len(recorded["devices"]) == 2
    assert nvml_main(["--gpu-probe", f"fake:{PCIE}", "ray-args"]) == 0
    assert capsys.readouterr().out.strip() == \
        "--num-gpus 2 --labels 'gpu-model=NVIDIA L4,gpu-memory-mib=23034'"
    assert nvml_main(["--gpu-probe", "none", "ray-args"]) == 0
    assert capsys.readouterr().out.strip() == "--num-gpus 0"


def test_the_two_recorded_topologies_are_what_their_names_say():
    islands = FakeProbe(str(ISLANDS)).links()
    assert {islands[0][b] for b in (1, 2, 3)} == {NVLINK} and islands[0][4] == SYS
    assert FakeProbe(str(PCIE)).links() == ((0, SYS), (SYS, 0))


# -- the command line ----------------------------------------------------------------------------

def test_gpu_flags_are_checked_and_a_request_the_node_cannot_serve_is_a_usage_error(tmp_path):
    from elastic.cli import UsageError, parse_args
    from elastic.run import node_gpus as run_node_gpus

    script = str(tmp_path / "train.py")
    Path(script).write_text("")
    config = parse_args(["--gpus-per-proc", "2", "--gpu-probe", f"fake:{PCIE}", script],
                        {"CUDA_VISIBLE_DEVICES": "1,0"})
    assert config.gpus == GpuRequest(gpus_per_proc=2, visible="1,0")
    assert config.gpu_probe == f"fake:{PCIE}"
    assert run_node_gpus(config).local_env == ({"CUDA_VISIBLE_DEVICES": "0,1",
                                                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                                "ELASTIC_CUDA_DEVICE": "0"},)
    two = parse_args(["--nproc-per-node", "2", "--gpus-per-proc", "2", "--gpu-probe",
                      f"fake:{PCIE}", script], {})
    with pytest.raises(UsageError, match=r"--gpus-per-proc 2 x 2 workers need 4 GPUs; this "
                                         r"node shows 2 \(FAKE, recorded in .*\); ask for fewer"):
        run_node_gpus(two)
    for argv, message in ((["--gpu-memory-fraction", "0"], "must be in"),
                          (["--gpu-memory-fraction", "0.5", "--gpus-per-proc", "2"],
                           "leave out --gpus-per-proc 2"),
                          (["--gpu-probe", "fake:"], "use nvml, fake:PATH"),
                          (["--gpu-probe", "dcgm"], "use nvml, fake:PATH")):
        with pytest.raises(UsageError, match=message):
            parse_args([*argv, script], {})
    missing = parse_args(["--gpu-probe", f"fake:{tmp_path / 'none.json'}", script], {})
    with pytest.raises(UsageError, match="cannot be read"):
        run_node_gpus(missing)
