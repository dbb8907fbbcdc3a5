"""`--preemption-k8s`: the agent's own pod and node, watched for word that they are going away.

A notice (the same path as the file and metadata sources: launcher/preemption.py) when
- the pod is being deleted (metadata.deletionTimestamp: an eviction, a drain, a scale-down; the
  API server sets it to when the pod will be killed);
- the pod has the condition DisruptionTarget=True (the scheduler preempts it, the taint manager
  or the kubelet is about to stop it; the reason is the detail);
- its node has a NoSchedule or NoExecute taint that node-termination handlers and drains put on
  a node about to go (TERMINATION_TAINTS), e.g. AWS's node termination handler on a spot
  interruption, GKE's impending-node-termination, Karpenter's disruption, a cordon.
A stated deadline is kept; otherwise the pod's terminationGracePeriodSeconds from when it was
seen (the time the kubelet allows after SIGTERM).

`pod_notice` decides, purely, over the official client's V1Pod and V1Node. `PodNoticeSource`
keeps the latest pod and node from two watches (one object each: cheap for the API server,
unlike polling at every agent) and answers the watcher's check() from them.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, Tuple

from launcher.preemption import NoticeSourceError

from .api import KubernetesConfigError, PodRef, connect, own_pod

log = logging.getLogger(__name__)

KUBERNETES = "kubernetes"
DEFAULT_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
# Taint keys (or key prefixes, ending in "/") that mean "this node is about to go".
TERMINATION_TAINTS = (
    "node.kubernetes.io/unschedulable",                # cordoned: kubectl drain's first step
    "aws-node-termination-handler/",                   # spot-itn, rebalance, maintenance, ASG
    "cloud.google.com/impending-node-termination",     # GKE: preemptible/spot shutdown
    "karpenter.sh/disruption",                         # Karpenter consolidation or expiry
    "ToBeDeletedByClusterAutoscaler",                  # cluster-autoscaler scale-down
)
TAINT_EFFECTS = ("NoSchedule", "NoExecute")
WATCH_TIMEOUT_S = 60   # the server ends a watch after this; it is then started again
READ_TIMEOUT_S = 10    # one read of the pod or the node (a blackholed API server)
RETRY_S = 2.0          # after an error, the next try

Found = Optional[Tuple[str, Optional[float]]]


def _seconds(stamp: Any) -> Optional[float]:
    return stamp.timestamp() if stamp is not None and hasattr(stamp, "timestamp") else None


def _grace(pod: Any) -> int:
    grace = getattr(pod.spec, "termination_grace_period_seconds", None) if pod.spec else None
    return DEFAULT_GRACE_S if grace is None else int(grace)


def termination_taint(node: Any) -> Optional[Any]:
    """The first taint on `node` that announces its end, or None."""
    for taint in (node.spec.taints or []) if node is not None and node.spec else []:
        key = taint.key or ""
        if taint.effect in TAINT_EFFECTS and any(
                key.startswith(t) if t.endswith("/") else key == t for t in TERMINATION_TAINTS):
            return taint
    return None


def pod_notice(pod: Any, node: Any, now: float) -> Found:
    """(detail, deadline) when the pod or its node is going away, else None."""
    if pod is not None:
        meta, name = pod.metadata, f"{pod.metadata.namespace}/{pod.metadata.name}"
        if meta.deletion_timestamp is not None:
            return f"pod {name} is being deleted", _seconds(meta.deletion_timestamp)
        for condition in (pod.status.conditions or []) if pod.status else []:
            if condition.type == "DisruptionTarget" and condition.status == "True":
                why = ": ".join(filter(None, (condition.reason, condition.message)))
                return (f"pod {name} is a disruption target" + (f" ({why})" if why else ""),
                        now + _grace(pod))
    taint = termination_taint(node)
    if taint is not None:
        value = f"={taint.value}" if taint.value else ""
        return (f"node {node.metadata.name} has taint {taint.key}{value}:{taint.effect}",
                now + (_grace(pod) if pod is not None else DEFAULT_GRACE_S))
    return None


class _Follow:
    """The latest version of one object, from a GET and then a watch, on a daemon thread."""

    def __init__(self, what: str, read: Callable[[], Any], watch: Callable[..., Any],
                 stopped: threading.Event) -> None:
        self.what, self._read, self._watch, self._stopped = what, read, watch, stopped
        self.latest: Any = None
        self.problem: Optional[str] = None
        self.ready = threading.Event()   # first answer (object or problem) in
        self._thread = threading.Thread(target=self._loop, name=f"k8s-watch-{what}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self._stopped.is_set():
            try:
                self.latest = self._read()
                self.problem = None
                self.ready.set()
                self._watch(self)
            except ApiException as exc:
                self.problem = (f"{self.what} not found" if exc.status == 404
                                else f"{self.what}: HTTP {exc.status} {exc.reason}")
            except Exception as exc:  # unreachable API server, a broken stream: retried
                self.problem = f"{self.what}: {type(exc).__name__}: {exc}"
            self.ready.set()
            self._stopped.wait(RETRY_S)


class PodNoticeSource:
    """The NoticeSource behind --preemption-k8s (launcher.preemption.NoticeSource)."""

    name = KUBERNETES

    def __init__(self, core: Any, pod: PodRef, clock: Callable[[], float] = time.time) -> None:
        self.core, self.pod, self._clock = core, pod, clock
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pod: Optional[_Follow] = None
        self._node: Optional[_Follow] = None
        self._node_name: Optional[str] = None

    def _start(self) -> None:
        from kubernetes import watch

        pod = self.pod

        def read_pod():
            return self.core.read_namespaced_pod(pod.name, pod.namespace,
                                                 _request_timeout=READ_TIMEOUT_S)

        def watch_pod(follow: _Follow) -> None:
            stream = watch.Watch().stream(
                self.core.list_namespaced_pod, pod.namespace,
                field_selector=f"metadata.name={pod.name}", timeout_seconds=WATCH_TIMEOUT_S,
                _request_timeout=WATCH_TIMEOUT_S + 10)
            for event in stream:
                obj = event["object"]
                if self._stopped.is_set():
                    return
                if getattr(obj.metadata, "name", None) != pod.name:
                    continue
                follow.latest = obj
                if event["type"] == "DELETED":
                    return

        self._pod = _Follow(f"pod {pod}", read_pod, watch_pod, self._stopped)

    def _start_node(self, node_name: str) -> None:
        from kubernetes import watch

        def read_node():
            return self.core.read_node(node_name, _request_timeout=READ_TIMEOUT_S)

        def watch_node(follow: _Follow) -> None:
            stream = watch.Watch().stream(
                self.core.list_node, field_selector=f"metadata.name={node_name}",
                timeout_seconds=WATCH_TIMEOUT_S, _request_timeout=WATCH_TIMEOUT_S + 10)
            for event in stream:
                if self._stopped.is_set():
                    return
                if getattr(event["object"].metadata, "name", None) == node_name:
                    follow.latest = event["object"]

        self._node_name = node_name
        self._node = _Follow(f"node {node_name}", read_node, watch_node, self._stopped)

    def check(self) -> Found:
        with self._lock:
            if self._pod is None:
                self._start()
                self._pod.ready.wait(5)  # the first check answers from a first read
            pod = self._pod.latest
            node_name = pod.spec.node_name if pod is not None and pod.spec else None
            if node_name and self._node_name != node_name:
                self._start_node(node_name)
                self._node.ready.wait(5)
        node = self._node.latest if self._node is not None else None
        found = pod_notice(pod, node, self._clock())
        if found is not None:
            return found
        problems = [f.problem for f in (self._pod, self._node) if f is not None and f.problem]
        if problems:
            raise NoticeSourceError(
                f"--preemption-k8s: {'; '.join(problems)}; watching goes on (the pod is "
                f"$POD_NAME in $POD_NAMESPACE, else the hostname in the service account's "
                f"namespace; its service account needs get/watch on its pod and its node)")
        return None

    def close(self) -> None:
        self._stopped.set()


def make_source(kubeconfig: Optional[str] = None,
                warn: Callable[[str], None] = log.warning) -> Optional[PodNoticeSource]:
    """The source for this process's pod, or None (with a warning) when no API server can be
    reached: training goes on with the other sources.

    Raises:
        ImportError: the [kubernetes] extra is not installed (the message says so).
    """
    try:
        api_client = connect(kubeconfig)
    except KubernetesConfigError as exc:
        warn(f"--preemption-k8s: {exc}; training goes on without Kubernetes notices")
        return None
    from kubernetes import client

    return PodNoticeSource(client.CoreV1Api(api_client), own_pod())
