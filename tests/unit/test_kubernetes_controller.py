"""The scaling controller's decisions (`reconcile`, `desired_size`, the pod template) and pod
discovery (`live_hosts`, `node_pods`), over the official client's model objects; the controller's
pacing after failures and the command lines' errors against kmock's emulator."""
from datetime import datetime, timedelta, timezone

import pytest

import tests.kube as kube_api  # skips this module without kmock or kubernetes

kube = kube_api.kube  # the emulator fixture

from kubernetes import client  # noqa: E402  (after tests.kube skips without it)

from integrations.kubernetes import controller as ctl  # noqa: E402
from integrations.kubernetes.controller import (Controller, Plan, TemplateError,  # noqa: E402
                                                check_names, desired_size, failure_pause,
                                                load_template, reconcile, worker_pod)
from integrations.kubernetes.discovery import live_hosts, node_pods  # noqa: E402
from rendezvous.api import JobOutcome, JobSpec  # noqa: E402
from rendezvous.client import JobStatus, NodeStatus, UnknownJobError  # noqa: E402

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
JOB = "j"


def pod(index, phase="Running", ip=None, deleting=False, ready=None, slots=None, exit_code=None,
        age=0, name=None):
    """Worker pod j-worker-<index>; age: seconds after T0 it was created."""
    statuses = None
    if exit_code is not None:
        statuses = [client.V1ContainerStatus(
            name="agent", image="x", image_id="", ready=False, restart_count=0,
            state=client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
                exit_code=exit_code, reason="Error" if exit_code else "Completed")))]
    conditions = None if ready is None else [
        client.V1PodCondition(type="Ready", status="True" if ready else "False")]
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name or f"{JOB}-worker-{index}", creation_timestamp=T0 + timedelta(seconds=age),
            deletion_timestamp=T0 if deleting else None,
            annotations={"elastic.run/slots": slots} if slots is not None else None,
            labels={"elastic.run/job": JOB, "elastic.run/role": "worker"}),
        spec=client.V1PodSpec(node_name="k8s-1", containers=[]),
        status=client.V1PodStatus(phase=phase, pod_ip=ip or f"10.0.0.{index + 1}",
                                  conditions=conditions, container_statuses=statuses))


def node(index, state="active", joined=0.0, pod_name=None):
    return NodeStatus(node_id=f"n{index}", host=f"10.0.0.{index + 1}", slots=1,
                      labels={"pod": pod_name or f"{JOB}-worker-{index}"}, joined_at=joined,
                      state=state)


def plan(desired, pods, nodes=(), ended=False):
    return reconcile(desired, ended, pods, nodes, job=JOB)


def names(*indices):
    return tuple(f"{JOB}-worker-{i}" for i in indices)


# -- reconcile ------------------------------------------------------------------------------------
def test_scale_up_from_nothing_creates_the_first_indices():
    p = plan(4, [])
    assert p.create == names(0, 1, 2, 3) and p.delete == () and p.release == ()
    assert p.reasons[f"{JOB}-worker-0"] == "the job wants 4 workers, 0 live"


def test_scale_up_from_two_to_four_adds_two():
    p = plan(4, [pod(0), pod(1)], [node(0), node(1)])
    assert p.create == names(2, 3) and p.live == 2


def test_pending_and_unregistered_pods_count_as_live():
    # Just created, not started, not a job node yet: a second pass must not add more.
    assert plan(3, [pod(0), pod(1, "Pending"), pod(2, "Pending")], [node(0)]) == Plan(live=3)
    assert plan(3, [pod(0), pod(1), pod(2, "Unknown")], [node(0), node(1)]).create == ()


def test_a_released_pod_is_leaving_then_deleted_and_not_replaced_once_it_exited_0():
    # The job released n3 (pod 3): its desired size went 4 -> 3 in the same write.
    pods = [pod(0), pod(1), pod(2), pod(3)]
    nodes = [node(0), node(1), node(2), node(3, "released")]
    assert plan(3, pods, nodes) == Plan(live=3)
    pods[3] = pod(3, "Succeeded", exit_code=0)
    p = plan(3, pods, nodes[:3])  # the agent left: its node is gone
    assert p.delete == names(3) and p.create == () and p.failed == ()
    assert "exited 0" in p.reasons[f"{JOB}-worker-3"]
    assert plan(3, pods, nodes) == p  # its node's record outlived it: the same


def test_a_failed_pod_is_deleted_and_replaced_under_a_free_name():
    pods = [pod(0), pod(1, "Failed", exit_code=3), pod(2)]
    p = plan(3, pods, [node(0), node(2)])
    assert p.delete == names(1) and p.failed == names(1)
    assert p.create == names(3)  # worker-1 still exists until its deletion completes
    assert p.reasons[f"{JOB}-worker-1"] == "failed: container agent exited 3 (Error)"


def test_an_evicted_pod_that_exited_0_is_replaced_since_the_size_did_not_drop():
    p = plan(2, [pod(0), pod(1, "Succeeded", exit_code=0)], [node(0)])
    assert p.delete == names(1) and p.create == names(2)


def test_terminating_pods_are_not_live_and_not_touched():
    pods = [pod(0), pod(1), pod(2, deleting=True)]
    p = plan(3, pods, [node(0), node(1), node(2)])
    assert p.create == names(3) and p.delete == () and p.live == 2


def test_an_ended_job_gets_nothing_created_or_deleted():
    pods = [pod(0, "Succeeded", exit_code=0), pod(1, "Failed", exit_code=1)]
    p = plan(4, pods, ended=True)
    assert p.done and p.create == p.delete == p.release == ()


def test_names_reuse_the_lowest_free_indices():
    pods = [pod(0), pod(2), pod(5)]
    assert plan(5, pods).create == names(1, 3)
    # A worker pod named otherwise counts as live and takes no index.
    assert plan(5, [pod(1, name="other-pod")] + pods).create == names(1)


def test_an_unknown_size_creates_and_shrinks_nothing_but_clears_exited_pods():
    pods = [pod(0), pod(1, "Failed", exit_code=1), pod(2, "Pending")]
    p = plan(None, pods)
    assert p.create == () and p.release == () and p.delete == names(1)


def test_shrinking_never_deletes_a_running_pod():
    pods = [pod(i) for i in range(4)]
    assert plan(2, pods, [node(i) for i in range(4)]) == Plan(live=4)


def test_shrinking_deletes_pods_that_never_started_newest_first():
    pods = [pod(0), pod(1), pod(2, "Pending", age=5), pod(3, "Pending", age=9)]
    p = plan(3, pods, [node(0), node(1)])
    assert p.delete == names(3) and p.release == ()
    assert p.reasons[f"{JOB}-worker-3"] == "the job wants 3 workers, 4 live; it has not started"
    # A Pending pod whose agent already registered (the phase lags) is not deleted.
    assert plan(3, pods, [node(0), node(1), node(3, "spare", joined=9)]).delete == names(2)


def test_shrinking_releases_the_spares_the_job_left_out_newest_first():
    pods = [pod(i) for i in range(4)]
    nodes = [node(0), node(1), node(2, "spare", joined=2.0), node(3, "spare", joined=3.0)]
    p = plan(3, pods, nodes)
    assert p.release == ("n3",) and p.delete == () and p.create == ()
    assert "runs a spare the job left out" in p.reasons["n3"]
    assert plan(2, pods, nodes).release == ("n3", "n2")


def test_no_spare_is_released_while_the_job_has_no_active_round():
    # Between rounds every node reads as a spare, members included.
    pods = [pod(i) for i in range(3)]
    assert plan(2, pods, [node(i, "spare") for i in range(3)]).release == ()


def test_spares_are_kept_while_the_job_wants_them():
    pods = [pod(i) for i in range(3)]
    assert plan(3, pods, [node(0), node(1), node(2, "spare")]) == Plan(live=3)


# -- the desired size ------------------------------------------------------------------------------
def spec(desired=None, lo=1, hi=8):
    return JobSpec(min_nodes=lo, max_nodes=hi, created_at=0.0, desired=desired)


def test_desired_size():
    assert desired_size(None, 2) == (2, None)          # no job yet: the seed
    assert desired_size(None, None) == (None, None)
    assert desired_size(spec(3), 2) == (3, None)       # someone set it: followed
    assert desired_size(spec(), None) == (8, None)     # unset: the job aims for its max
    assert desired_size(spec(), 2) == (2, 2)           # unset: --initial, written into the job
    assert desired_size(spec(lo=3), 2) == (3, 3)       # clamped to min..max
    assert desired_size(spec(hi=4), 6) == (4, 4)


# -- the pod template ------------------------------------------------------------------------------
TEMPLATE = """
apiVersion: v1
kind: Pod
metadata:
  name: ignored
  labels: {app: train}
  annotations: {elastic.run/slots: "2"}
spec:
  containers:
  - name: agent
    image: trainer:1
"""


def test_a_worker_pod_is_the_template_named_and_labelled(tmp_path):
    path = tmp_path / "pod.yaml"
    path.write_text(TEMPLATE)
    template = load_template(str(path))
    made = worker_pod(template, "j-worker-3", "ml", JOB)
    assert made["metadata"]["name"] == "j-worker-3" and made["metadata"]["namespace"] == "ml"
    assert made["metadata"]["labels"] == {"app": "train", "elastic.run/job": JOB,
                                          "elastic.run/role": "worker"}
    assert made["metadata"]["annotations"] == {"elastic.run/slots": "2"}
    assert made["spec"]["restartPolicy"] == "Never"
    assert made["spec"]["containers"] == [{"name": "agent", "image": "trainer:1"}]
    assert template["metadata"]["name"] == "ignored"  # the template itself is not changed


@pytest.mark.parametrize("text,words", [
    ("kind: Deployment\nspec: {containers: [{name: a}]}\n", "is not a v1 Pod"),
    ("kind: Pod\nspec: {}\n", "has no spec.containers"),
    ("kind: Pod\nspec: {restartPolicy: Always, containers: [{name: a}]}\n", "use Never"),
    ("kind: Pod\nspec: [\n", "cannot be read"),
])
def test_an_unusable_template_is_refused_with_what_to_change(tmp_path, text, words):
    path = tmp_path / "pod.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError, match=words):
        load_template(str(path))
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template(str(tmp_path / "missing.yaml"))


def test_a_job_name_must_make_valid_pod_names():
    check_names("my-job-2")
    for bad in ("My_Job", "x" * 60, "-job"):
        with pytest.raises(TemplateError):
            check_names(bad)


# -- discovery -------------------------------------------------------------------------------------
def test_only_running_ready_pods_with_an_ip_that_are_not_deleted_are_hosts():
    pods = [pod(0), pod(1, "Pending"), pod(2, deleting=True), pod(3, ready=False),
            pod(4, ready=True), pod(5, "Succeeded"), pod(6, ip="")]
    pods[6].status.pod_ip = None
    assert live_hosts(pods) == [("10.0.0.1", 1), ("10.0.0.5", 1)]


def test_slots_come_from_the_flag_else_the_annotation_else_one():
    pods = [pod(0, slots="4"), pod(1), pod(2, slots="many")]
    assert live_hosts(pods) == [("10.0.0.1", 4), ("10.0.0.2", 1), ("10.0.0.3", 1)]
    assert live_hosts(pods, slots=2) == [("10.0.0.1", 2), ("10.0.0.2", 2), ("10.0.0.3", 2)]


def test_hosts_come_oldest_pod_first_and_pods_sharing_an_ip_add_up():
    # Same age: worker-9 before worker-10; worker-2 is the youngest but shares worker-9's IP.
    pods = [pod(10, age=1), pod(2, age=3), pod(9, age=1, ip="10.0.0.3")]
    assert live_hosts(pods) == [("10.0.0.3", 2), ("10.0.0.11", 1)]
    assert live_hosts(list(reversed(pods))) == live_hosts(pods)


def test_node_pods_maps_each_job_node_to_its_pod_and_lists_unclaimed_pods():
    pods = [pod(0), pod(1, "Pending"), pod(2, deleting=True)]
    nodes = [node(0), node(2, "released"), node(7, "spare", pod_name="gone")]
    rows = node_pods(nodes, pods)
    assert [(r.pod, r.node_id, r.state, r.phase, r.k8s_node) for r in rows] == [
        ("j-worker-0", "n0", "active", "Running", "k8s-1"),
        ("j-worker-2", "n2", "released", "Terminating", "k8s-1"),
        (None, "n7", "spare", "-", "-"),
        ("j-worker-1", None, "-", "Pending", "k8s-1")]


# -- the loop, against the emulator ----------------------------------------------------------------


class FakeJobs:
    """The job client's read and write calls the controller makes, over a JobStatus."""

    def __init__(self, status=None):
        self.status_now, self.resized, self.released = status, [], []

    def status(self, job, probe=True, recent=0):
        if self.status_now is None:
            raise UnknownJobError(f"no job {job!r}")
        return self.status_now

    def resize(self, job, nodes):
        self.resized.append(nodes)
        self.status_now = _status(spec(nodes, hi=self.status_now.spec.max_nodes),
                                  self.status_now.nodes)
        return self.status_now.spec

    def release(self, job, node_ids, reason=""):
        self.released.extend(node_ids)

    def close(self):
        pass


def _status(job_spec, nodes=(), outcome=None):
    return JobStatus(job=JOB, endpoint="-", revision=1, spec=job_spec, round=None,
                     nodes=tuple(nodes), events=(), outcome=outcome, stop_requested=False,
                     leaving_costs="-")


def _names(kube, job):
    return sorted(p.metadata.name for p in kube.core.list_namespaced_pod(
        "default", label_selector=f"elastic.run/job={job}").items)


def _controller(kube, jobs, job, **kw):
    template = {"apiVersion": "v1", "kind": "Pod",
                "spec": {"containers": [{"name": "agent", "image": "t"}]}}
    return Controller(kube.core, lambda: jobs, job, "default", template, **kw)


def test_the_loop_starts_the_job_sets_its_size_and_stops_when_it_ends(kube):
    jobs = FakeJobs()
    c = _controller(kube, jobs, "seed", initial=2)
    assert c.tick().create == ("seed-worker-0", "seed-worker-1")
    assert c.tick() == Plan(live=2)  # not registered yet, still counted
    jobs.status_now = _status(spec(lo=1, hi=4))  # the first agent created the job
    assert c.tick() == Plan(live=2) and jobs.resized == [2]
    jobs.status_now = _status(spec(2, hi=4), outcome=JobOutcome(status="succeeded"))
    assert c.tick().done and _names(kube, "seed") == ["seed-worker-0", "seed-worker-1"]


def test_an_unknown_job_without_initial_is_an_error(kube):
    with pytest.raises(ctl.UnknownJob, match="--initial"):
        _controller(kube, FakeJobs(), "nojob").tick()


def test_pods_failing_before_their_agent_joins_are_replaced_after_a_growing_pause(
        kube):
    now, warnings = [0.0], []
    jobs = FakeJobs(_status(spec(1, hi=2)))
    c = _controller(kube, jobs, "crash", clock=lambda: now[0], warn=warnings.append)

    def fail(plan):
        [name] = plan.create
        kube.set_phase(name, "Failed")
        return name

    first = c.tick()
    assert first.create == ("crash-worker-0",)
    fail(first)
    second = c.tick()
    assert second.create == ("crash-worker-1",)  # the first failure: replaced at once
    fail(second)
    assert c.tick().create == ()                  # the second: after 5 s
    assert warnings[-1].endswith("the next is created in 5 s")
    now[0] = 5.0
    third = c.tick()
    assert third.create == ("crash-worker-0",)    # worker-0 is gone, its name is free again
    # Its agent joins the job: the streak is over, the next failure is replaced at once.
    jobs.status_now = _status(spec(1, hi=2), [node(0, pod_name="crash-worker-0")])
    c.tick()
    kube.set_phase("crash-worker-0", "Failed")
    assert c.tick().create == ("crash-worker-1",)
    assert [failure_pause(n) for n in range(1, 9)] == [0, 5, 10, 20, 40, 80, 160, 300]


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, kube, capsys, monkeypatch):
    from integrations.kubernetes.__main__ import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    template = tmp_path / "pod.yaml"
    template.write_text(TEMPLATE)
    base = ["controller", "--job", JOB, "--rdzv-endpoint", "127.0.0.1:1"]
    cases = [
        (base + ["--template", str(tmp_path / "missing.yaml")], "cannot be read"),
        (base + ["--template", str(template)], "no kubeconfig at"),
        (base + ["--template", str(template), "--interval", "0"], "--interval 0"),
        (["controller", "--job", JOB], "required"),
        (["discover", "--job", JOB], "no kubeconfig at"),
        (["discover", "--job", JOB, "--slots", "0"], "--slots 0"),
        (["discover"], "one of the arguments"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_discover_prints_the_live_pods_of_the_emulator(tmp_path, kube, capsys, monkeypatch):
    from integrations.kubernetes.discovery import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    labels = {"elastic.run/job": "disc", "elastic.run/role": "worker"}
    kube.add_pod("disc-worker-0", labels=labels, ip="10.1.0.1")
    kube.add_pod("disc-worker-1", labels=labels, ip="10.1.0.2", phase="Pending")
    kube.add_pod("other", labels={"elastic.run/job": "other"}, ip="10.1.0.3")
    config = str(kube.kubeconfig(tmp_path))
    assert main(["--job", "disc", "--kubeconfig", config, "--slots", "2"]) == 0
    assert capsys.readouterr().out == "10.1.0.1:2\n"
    assert main(["--selector", "elastic.run/job in (disc,other)", "--kubeconfig", config,
                 "--json"]) == 0
    assert capsys.readouterr().out.strip() == ('[{"host": "10.1.0.1", "slots": 1}, '
                                               '{"host": "10.1.0.3", "slots": 1}]')
