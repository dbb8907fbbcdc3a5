"""The scaling controller and pod discovery against kmock's Kubernetes API, a real etcd and real
agents: the test plays the kubelet (a pod the controller creates gets a `python -m elastic.run`
process with `--node-label pod=<name>` and goes Running; an agent's exit sets its pod's phase;
a deleted pod's agent is stopped), and changes the job only through the job client."""
import json
import os
import subprocess
import sys

import pytest

import tests.kube as kube_api  # skips this module without kmock or kubernetes

from rendezvous.client import JobClient, UnknownJobError  # noqa: E402

from .agents import REPO, Agent, kill_tree, new_mark, wait_for  # noqa: E402

pytestmark = pytest.mark.integration
kube = kube_api.kube  # the emulator fixture

WORKER = """
import os, sys, time
print("WORKER", os.environ["RANK"], os.environ["WORLD_SIZE"], flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
"""
TEMPLATE = """apiVersion: v1
kind: Pod
metadata:
  labels: {app: trainer}
spec:
  containers:
  - name: agent
    image: trainer:test
"""


class Kubelet:
    """Runs an agent for each pod the controller creates, and reports its exit in the pod."""

    def __init__(self, kube, job, agent_args, tmp_path, mark):
        self.kube, self.job, self.args = kube, job, agent_args
        self.tmp, self.mark = tmp_path, mark
        self.agents = {}   # pod name -> its current Agent
        self.started = []  # every Agent, for the cleanup
        self.exits = {}    # pod name -> exit codes of its agents, in order

    def pods(self):
        return {p.metadata.name: p for p in self.kube.core.list_namespaced_pod(
            "default", label_selector=f"elastic.run/job={self.job}").items}

    def sync(self):
        pods = self.pods()
        for name, pod in pods.items():
            agent = self.agents.get(name)
            if pod.metadata.deletion_timestamp is not None:
                if agent is not None and agent.proc.poll() is None:
                    agent.stop()  # the kubelet stops a deleted pod's containers
                self.kube.finish_pod(name)
            elif pod.status is None or not pod.status.phase:  # a new pod: start it
                self._start(name)
            elif pod.status.phase == "Running" and agent.proc.poll() is not None:
                code = agent.proc.returncode
                self.exits.setdefault(name, []).append(code)
                self._report(name, "Succeeded" if code == 0 else "Failed", code)
        for name, agent in self.agents.items():
            if name not in pods and agent.proc.poll() is None:
                agent.stop()
        return pods

    def _start(self, name):
        self.kube.core.patch_namespaced_pod(name, "default", {"metadata": {
            "finalizers": [kube_api.KUBELET]}})
        agent = Agent([*self.args, "--node-label", f"pod={name}", "--log-dir",
                       self.tmp / "logs" / name, self.tmp / "worker.py", self.tmp / "stop"],
                      self.tmp, name, self.mark)
        self.agents[name] = agent
        self.started.append(agent)
        index = int(name.rsplit("-", 1)[1])
        self.kube.set_phase(name, "Running", ip=f"127.0.0.{index + 1}")

    def _report(self, name, phase, code):
        self.kube.core.patch_namespaced_pod_status(name, "default", {"status": {
            "phase": phase, "containerStatuses": [{
                "name": "agent", "image": "trainer:test", "imageID": "", "ready": False,
                "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]}})

    def stop(self):
        for agent in self.started:
            agent.stop()


def command(*args, env=None):
    return subprocess.run([sys.executable, "-m", "integrations.kubernetes", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def nodes_by_pod(client, job):
    """The job's nodes by the pod they run in; none before the job exists."""
    try:
        return {n.labels.get("pod"): n for n in client.status(job, probe=False, recent=0).nodes}
    except UnknownJobError:
        return {}




def test_the_controller_follows_the_job_and_the_job_chooses_who_leaves(
        kube, tmp_path, etcd_endpoint, run_id):
    job, mark = run_id, new_mark()
    (tmp_path / "worker.py").write_text(WORKER)
    template = tmp_path / "pod.yaml"
    template.write_text(TEMPLATE)
    config = kube.kubeconfig(tmp_path)
    kubelet = Kubelet(kube, job, [
        "--nnodes", "1:4", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
        "--rdzv-id", job, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
        "--rescale-mode", "restart", "--preload", "none"], tmp_path, mark)
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as sink:
        controller = subprocess.Popen(
            [sys.executable, "-m", "integrations.kubernetes", "controller", "--job", job,
             "--rdzv-endpoint", etcd_endpoint, "--template", template, "--initial", "1",
             "--kubeconfig", config, "--namespace", "default", "--interval", "0.3"],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "ELASTIC_TEST_MARK": mark})

    def controller_log():
        return log_path.read_text(errors="replace")

    def until(predicate, what, timeout=90):
        return wait_for(lambda: kubelet.sync() is not None and predicate(), timeout=timeout,
                        interval=0.2, what=f"{what}\n--- controller:\n{controller_log()[-3000:]}")

    def worker(n):
        return f"{job}-worker-{n}"

    try:
        with JobClient(etcd_endpoint) as client:
            # The job does not exist: the controller starts --initial pods; the first agent
            # creates the job (1..4, no desired size), which the controller sets to 1.
            until(lambda: nodes_by_pod(client, job).get(worker(0), None) is not None,
                  "the first pod's agent to create the job")
            until(lambda: client.status(job, probe=False).spec.desired == 1,
                  "the controller to set the desired size")
            assert sorted(kubelet.sync()) == [worker(0)]

            # Scale up through the job client: the controller creates the pods, agents join.
            client.resize(job, 3)
            until(lambda: {p: n.state for p, n in nodes_by_pod(client, job).items()} == {
                worker(0): "active", worker(1): "active", worker(2): "active"},
                "three active nodes, one per pod")
            assert "created pod " + worker(2) + ": the job wants 3 workers, 1 live" in \
                controller_log()

            # Discovery lists the live pods; the controller's view maps nodes to pods.
            found = command("discover", "--job", job, "--kubeconfig", config)
            assert found.returncode == 0, found.stderr
            assert found.stdout.splitlines() == ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1"]
            once = command("controller", "--job", job, "--rdzv-endpoint", etcd_endpoint,
                           "--template", template, "--kubeconfig", config, "--once", "--json")
            assert once.returncode == 0, once.stderr
            view = json.loads(once.stdout)
            assert view["created"] == view["deleted"] == view["released"] == []
            assert sorted((r["pod"], r["state"], r["phase"]) for r in view["pods"]) == [
                (worker(n), "active", "Running") for n in range(3)]
            table = command("controller", "--job", job, "--rdzv-endpoint", etcd_endpoint,
                            "--template", template, "--kubeconfig", config, "--once")
            assert table.returncode == 0, table.stderr
            header, *rows = table.stdout.splitlines()
            assert header.split() == ["POD", "PHASE", "K8S", "NODE", "JOB", "NODE", "STATE"]
            assert sorted(r.split()[0] for r in rows) == [worker(n) for n in range(3)]

            # Release the node in pod 1: its agent leaves and exits 0, the controller deletes
            # the pod and makes no replacement (the release lowered the desired size).
            released = nodes_by_pod(client, job)[worker(1)].node_id
            client.release(job, [released], reason="room for another job")
            until(lambda: worker(1) not in kubelet.pods(), "pod 1 to be deleted")
            assert kubelet.exits[worker(1)] == [0]
            assert f"deleted pod {worker(1)}: exited 0" in controller_log()

            def after_deletion():
                return controller_log().partition(f"deleted pod {worker(1)}")[2]

            # Each pass logs the job's pods when they changed: a line without pod 1.
            until(lambda: any(" live of " in line and worker(1) not in line
                              for line in after_deletion().splitlines()),
                  "a pass of the controller after the deletion")
            assert sorted(kubelet.sync()) == [worker(0), worker(2)]
            assert "created pod" not in after_deletion()
            status = client.status(job, probe=False)
            assert status.spec.desired == 2
            assert sorted(n.labels["pod"] for n in status.nodes) == [worker(0), worker(2)]

            # A node's death: its pod fails; the controller replaces it (the size did not drop),
            # under the lowest free name, and the new agent joins.
            kubelet.agents[worker(2)].kill_node()
            until(lambda: {p: n.state for p, n in nodes_by_pod(client, job).items()} == {
                worker(0): "active", worker(1): "active"}, "a replacement for the dead pod")
            assert kubelet.exits[worker(2)] == [-9]
            assert f"deleted pod {worker(2)}: failed: container agent exited -9" in \
                controller_log()

            # A resize down: the job leaves its newest node out (a spare); the controller
            # releases that spare, its agent exits 0 and its pod goes. Pod 0 is never touched.
            spare = nodes_by_pod(client, job)[worker(1)].node_id
            client.resize(job, 1)
            until(lambda: worker(1) not in kubelet.pods(), "the left-out pod to be deleted")
            assert kubelet.exits[worker(1)] == [0, 0]  # the released pod 1, then this one
            assert f"released node {spare}: the job wants 1 workers, 2 live; pod {worker(1)} " \
                "runs a spare the job left out" in controller_log()
            assert list(nodes_by_pod(client, job)) == [worker(0)]
            assert worker(0) not in kubelet.exits

            # The job ends: the controller creates nothing more, keeps the pods, exits 0.
            client.stop(job, reason="done")
            until(lambda: controller.poll() is not None, "the controller to exit")
            assert controller.returncode == 0, controller_log()
            assert "has ended" in controller_log()
            until(lambda: all(a.proc.poll() is not None for a in kubelet.agents.values()),
                  "every agent to exit")
            kubelet.sync()  # reports the last exits
            assert {n: p.status.phase for n, p in kubelet.pods().items()} == {
                worker(0): "Succeeded"}
    finally:
        (tmp_path / "stop").touch()
        kubelet.stop()
        if controller.poll() is None:
            kill_tree(controller)


def test_an_unknown_job_without_initial_is_an_error(kube, tmp_path, etcd_endpoint,
                                                    run_id):
    template = tmp_path / "pod.yaml"
    template.write_text(TEMPLATE)
    done = command("controller", "--job", run_id, "--rdzv-endpoint", etcd_endpoint,
                   "--template", template, "--kubeconfig", kube.kubeconfig(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: no job {run_id!r} at etcd") and \
        "--initial N" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert kube.core.list_namespaced_pod(
        "default", label_selector=f"elastic.run/job={run_id}").items == []


def test_the_controller_waits_for_an_etcd_it_cannot_reach_yet(kube, tmp_path):
    from rendezvous.embedded import EmbeddedEtcd
    from tests.support import quiet_port

    template = tmp_path / "pod.yaml"
    template.write_text(TEMPLATE)
    port, log_path = quiet_port(), tmp_path / "controller.log"
    with open(log_path, "wb") as sink:
        controller = subprocess.Popen(
            [sys.executable, "-m", "integrations.kubernetes", "controller", "--job", "late",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--template", template, "--initial", "1",
             "--kubeconfig", kube.kubeconfig(tmp_path), "--interval", "0.3"],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    etcd = EmbeddedEtcd(port=port)
    try:
        wait_for(lambda: "until etcd answers" in log_path.read_text(), timeout=60,
                 what="the controller's warning")
        assert controller.poll() is None
        # Without etcd it cannot tell whether the job exists: it creates nothing.
        assert kube.core.list_namespaced_pod(
            "default", label_selector="elastic.run/job=late").items == []
        etcd.start()
        wait_for(lambda: kube.core.list_namespaced_pod(
            "default", label_selector="elastic.run/job=late").items, timeout=60,
            what="the first pod once etcd answers")
        assert log_path.read_text().count("until etcd answers") == 1
    finally:
        kill_tree(controller)
        etcd.stop()
