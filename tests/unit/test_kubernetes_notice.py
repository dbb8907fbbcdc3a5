"""--preemption-k8s: which pod and node states are notices (pure), and the source reading them
from an API server (kmock's emulator on 127.0.0.1, through the official client)."""
from datetime import datetime, timezone

import pytest

from launcher.preemption import NoticeConfig, NoticeWatcher

from tests.kube import kube  # noqa: F401  (the fixture)

from kubernetes import client  # noqa: E402  (after tests.kube skips without it)

from integrations.kubernetes.api import PodRef  # noqa: E402
from integrations.kubernetes.notice import PodNoticeSource, pod_notice  # noqa: E402

NOW = 1_800_000_000.0


def pod(deleting=None, conditions=(), grace=45, node="n1"):
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="w-0", namespace="ml", deletion_timestamp=deleting),
        spec=client.V1PodSpec(node_name=node, termination_grace_period_seconds=grace,
                              containers=[]),
        status=client.V1PodStatus(phase="Running", conditions=[
            client.V1PodCondition(type=t, status=s, reason=r) for t, s, r in conditions]))


def node(*taints):
    return client.V1Node(metadata=client.V1ObjectMeta(name="n1"), spec=client.V1NodeSpec(
        taints=[client.V1Taint(key=k, effect=e, value=v) for k, e, v in taints]))


def test_a_running_pod_on_a_plain_node_is_no_notice():
    assert pod_notice(pod(conditions=[("Ready", "True", None)]), node(), NOW) is None
    # Taints every GPU or spot node carries for good are not an end.
    assert pod_notice(pod(), node(("nvidia.com/gpu", "NoSchedule", "present"),
                                  ("cloud.google.com/gke-spot", "NoSchedule", "true")), NOW) is None


def test_a_pod_being_deleted_leaves_by_its_deletion_timestamp():
    when = datetime.fromtimestamp(NOW + 40, timezone.utc)
    assert pod_notice(pod(deleting=when), node(), NOW) == ("pod ml/w-0 is being deleted",
                                                           NOW + 40)


def test_a_disruption_target_gets_the_pods_grace_period():
    detail, deadline = pod_notice(pod(conditions=[
        ("DisruptionTarget", "True", "PreemptionByScheduler")]), node(), NOW)
    assert "PreemptionByScheduler" in detail and deadline == NOW + 45
    assert pod_notice(pod(conditions=[("DisruptionTarget", "False", "x")]), node(), NOW) is None


@pytest.mark.parametrize("key,effect", [
    ("aws-node-termination-handler/spot-itn", "NoSchedule"),
    ("cloud.google.com/impending-node-termination", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ("karpenter.sh/disruption", "NoSchedule"),
    ("ToBeDeletedByClusterAutoscaler", "NoSchedule"),
])
def test_a_node_termination_taint_is_a_notice(key, effect):
    detail, deadline = pod_notice(pod(), node((key, effect, None)), NOW)
    assert detail == f"node n1 has taint {key}:{effect}" and deadline == NOW + 45


def test_a_termination_key_with_a_soft_effect_is_not():
    assert pod_notice(pod(), node(("ToBeDeletedByClusterAutoscaler", "PreferNoSchedule", None)),
                      NOW) is None


# -- against the emulator ------------------------------------------------------------------------

def watcher_for(kube, name, namespace="default"):
    notices, warnings = [], []
    source = PodNoticeSource(kube.core, PodRef(namespace, name))
    watcher = NoticeWatcher(NoticeConfig(extra=(source,)), notices.append, warn=warnings.append)
    return source, watcher, notices, warnings


def wait_for_notice(watcher, tries=50):
    import time
    for _ in range(tries):
        notice = watcher.check_once()
        if notice is not None:
            return notice
        time.sleep(0.1)
    raise AssertionError("no notice")


def test_an_eviction_reaches_the_watcher_through_the_api_server(kube):
    kube.add_node("node-e")
    kube.add_pod("evicted", node="node-e", grace=50)
    source, watcher, notices, warnings = watcher_for(kube, "evicted")
    try:
        assert watcher.check_once() is None
        kube.delete_pod("evicted")  # graceful: deletionTimestamp = now + 50 s
        notice = wait_for_notice(watcher)
        assert notice.source == "kubernetes" and "default/evicted is being deleted" in notice.detail
        assert 45 < notice.deadline - notice.received_at <= 50
        assert notices == [notice] and warnings == []
    finally:
        source.close()
        kube.finish_pod("evicted")


def test_a_taint_on_the_pods_node_reaches_the_watcher(kube):
    kube.add_node("node-t")
    kube.add_pod("tainted", node="node-t", grace=20)
    source, watcher, notices, warnings = watcher_for(kube, "tainted")
    try:
        assert watcher.check_once() is None
        kube.taint("node-t", "aws-node-termination-handler/spot-itn")
        notice = wait_for_notice(watcher)
        assert notice.detail == "node node-t has taint aws-node-termination-handler/spot-itn:NoSchedule"
        assert 15 < notice.deadline - notice.received_at <= 20
    finally:
        source.close()


def test_an_unknown_pod_warns_once_and_watching_goes_on(kube):
    source, watcher, notices, warnings = watcher_for(kube, "nobody")
    try:
        assert watcher.check_once() is None and watcher.check_once() is None
        assert len(warnings) == 1 and "pod default/nobody not found" in warnings[0]
        assert "$POD_NAME" in warnings[0]
    finally:
        source.close()
