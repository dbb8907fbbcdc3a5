"""--preemption-k8s through a running job: an agent whose pod is evicted, or whose node gets a
node-termination taint, leaves at a step boundary and the job loses no committed step. The API
server is kmock's emulator on 127.0.0.1 (tests/kube.py); the agents reach it by kubeconfig."""
import pytest

from tests.kube import env_for, kube  # noqa: F401  (the fixture)

from .test_preemption import assert_left_at_a_step_boundary
from .test_training_semantics import make_job, reference_params, seen  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["eviction", "taint"])
def test_a_pod_told_to_go_by_kubernetes_costs_no_committed_step(make_job, kube, tmp_path, how):
    expected = reference_params(make_job)
    job = make_job(f"k8s-{how}")
    node, pod = f"node-{how}", f"worker-{how}"
    kube.add_node(node)
    kube.add_pod(pod, node=node, grace=40)
    a = job.start("a")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=1")
    b = job.start("b", extra=["--preemption-k8s", "--preemption-poll-interval", "0.2"],
                  env=env_for(kube, tmp_path, pod))
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=2", pos)
    job.allow(23)  # not a multiple of --commit-every: the notice lands between two commits
    pos = seen(a, "step=23 world=2 rank=0", pos)
    job.allow(10**6)
    pos = seen(a, "step=26 world=2 rank=0", pos)
    if how == "eviction":
        kube.delete_pod(pod)  # graceful: marked with deletionTimestamp, kept for its grace
    else:
        kube.taint(node, "cloud.google.com/impending-node-termination")
    assert b.wait(60) == 0, b.output()[-3000:]
    if how == "eviction":
        kube.finish_pod(pod)
    assert a.wait(120) == 0, a.output()[-3000:]
    notice, _ = assert_left_at_a_step_boundary(job, a.output(), expected, "kubernetes")
    if how == "eviction":
        assert notice["detail"] == f"pod default/{pod} is being deleted"
        assert 30 < notice["grace_s"] <= 40
    else:
        assert notice["detail"] == (f"node {node} has taint "
                                    "cloud.google.com/impending-node-termination:NoSchedule")
        assert 30 < notice["grace_s"] <= 40


@pytest.mark.parametrize("case", ["unknown pod", "no kubeconfig"])
def test_kubernetes_that_cannot_be_read_is_one_warning_and_training_goes_on(kube, tmp_path, case):
    import subprocess
    import sys

    from .agents import REPO

    env = env_for(kube, tmp_path, "nobody")
    if case == "no kubeconfig":
        env["KUBECONFIG"] = str(tmp_path / "missing")
    script = tmp_path / "train.py"
    script.write_text("import time\nfor step in range(8):\n    time.sleep(0.25)\n"
                      "print('DONE', flush=True)\n")
    done = subprocess.run(
        [sys.executable, "-m", "elastic.run", "--standalone", "--nproc-per-node", "1",
         "--preemption-k8s", "--preemption-poll-interval", "0.2", "--log-dir", tmp_path / "logs",
         script], cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DONE" in done.stdout + done.stderr
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "--preemption-k8s" in line]
    assert len(warnings) == 1, warnings
    if case == "no kubeconfig":
        assert "no kubeconfig at" in warnings[0] and "training goes on" in warnings[0]
    else:
        assert "pod default/nobody not found" in warnings[0]
