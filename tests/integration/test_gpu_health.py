"""GPUs through a running job, on recorded device states (--gpu-probe fake:PATH): a GPU that
fails with an Xid makes its node leave at a step boundary with no committed step lost, and an
agent started again on that node does not join while the GPU stays unhealthy; a machine without
an NVIDIA driver runs an agent as before, with one line saying so."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .agents import REPO
from .test_preemption import assert_left_at_a_step_boundary
from .test_training_semantics import make_job  # noqa: F401  (the fixture)
from .test_training_semantics import reference_params, seen

pytestmark = pytest.mark.integration

PCIE = Path(__file__).resolve().parents[1] / "unit" / "data" / "gpus-two-pcie.json"


def one_gpu_node(path):
    """A node with one GPU (the first of a recorded two-GPU machine): when it fails, no other
    GPU can take its worker."""
    doc = json.loads(PCIE.read_text())
    doc.update(devices=doc["devices"][:1], topology=["X"])
    path.write_text(json.dumps(doc))


def fail_gpu(path, index, xid):
    """The recorded state of one GPU gains an Xid event, as NVML would report it."""
    doc = json.loads(path.read_text())
    doc["devices"][index]["xids"].append(xid)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return doc["devices"][index]["uuid"]


def test_a_gpu_with_an_xid_makes_its_node_leave_losing_nothing_and_keeps_it_out(make_job,
                                                                                tmp_path):
    expected = reference_params(make_job)
    job = make_job("gpu-xid")
    gpus = tmp_path / "b-gpus.json"
    one_gpu_node(gpus)
    probe = ["--gpu-probe", f"fake:{gpus}", "--preemption-poll-interval", "0.2"]
    a = job.start("a")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=1")
    b = job.start("b", extra=probe)
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=2", pos)
    assert f"GPUs (FAKE, recorded in {gpus}): local rank 0 on GPU 0;" in b.output()
    job.allow(23)  # not a multiple of --commit-every: the Xid lands between two commits
    pos = seen(a, "step=23 world=2 rank=0", pos)
    job.allow(40)
    pos = seen(a, "step=26 world=2 rank=0", pos)
    uuid = fail_gpu(gpus, 0, 79)
    assert b.wait(60) == 1, b.output()[-3000:]  # a fault: not a planned departure
    assert (f"left the job (gpu: left at a step boundary): fake GPU 0 ({uuid}): Xid 79 "
            "(fallen off the bus)") in b.output()
    pos = seen(a, "step=40 world=1 rank=0", pos)

    # The node stays out: its agent, started again, says why in one line and does not join.
    again = job.start("b-again", extra=probe)
    assert again.wait(60) == 1, again.output()[-3000:]
    errors = [line for line in again.output().splitlines() if line.startswith("error:")]
    assert errors == [f"error: not joining the job: unhealthy GPU (FAKE, recorded in {gpus}): "
                      f"GPU 0 ({uuid}): Xid 79 (fallen off the bus); the workers need 1 healthy "
                      "GPU, 0 of the 1 here are, so this node stays out of the job until the GPU "
                      "is fixed (or hidden with CUDA_VISIBLE_DEVICES)"]
    assert "rendezvous leader" not in again.output() and "world=" not in again.output()

    job.allow(10**6)
    assert a.wait(120) == 0, a.output()[-3000:]
    out = a.output()
    assert "world=2" not in out[pos:]  # the job went on without the node
    notice, events = assert_left_at_a_step_boundary(job, out, expected, "gpu")
    assert notice["detail"] == f"fake GPU 0 ({uuid}): Xid 79 (fallen off the bus)"
    assert len([e for e in events if e["event"] == "joined"]) == 2  # a and b; never b-again


WORKER = """import os
for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "ELASTIC_CUDA_DEVICE",
             "ELASTIC_GPU_MEMORY_FRACTION"):
    print("ENV", name, os.environ.get(name, "unset"), flush=True)
"""


def run_agent(tmp_path, *extra):
    script = tmp_path / "show_env.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "elastic.run", "--standalone",
                           "--nproc-per-node", "1", *extra, str(script)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def normalized(output):
    """The output with what differs between any two runs (node ids, durations) blanked."""
    text = re.sub(r"vm-\d+-[0-9a-f]+|\b[0-9a-f]{6,}\b", "NODE", output)
    return [re.sub(r"\d+\.\d+ s", "T s", line) for line in text.splitlines()]


def test_without_nvml_an_agent_runs_as_before_with_one_line_saying_so(tmp_path):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    looked = normalized(run_agent(tmp_path))
    note = "[elastic] no GPU: no NVIDIA driver (NVML library not found); the workers run on CPU"
    assert looked.count(note) == 1
    # As without looking at GPUs at all (--gpu-probe none), apart from that line.
    untouched = normalized(run_agent(tmp_path, "--gpu-probe", "none"))
    skipped = ("[elastic] GPUs not inspected: --gpu-probe none; CUDA_VISIBLE_DEVICES left as it "
               "is")
    assert [line for line in looked if line != note] == \
        [line for line in untouched if line != skipped]
    assert [line for line in looked if "ENV" in line] == [
        f"[rank0]: ENV {name} unset" for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                                                 "ELASTIC_CUDA_DEVICE",
                                                 "ELASTIC_GPU_MEMORY_FRACTION")]
