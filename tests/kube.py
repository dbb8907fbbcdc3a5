"""A Kubernetes API for tests: kmock's in-memory emulator on 127.0.0.1, served on a thread, for
the official client (no real API server can run on the test machines).

What the emulator lacks is filled in here, not in the product:
- resources it has no object of yet are unknown (404): pods and nodes are declared;
- label selectors (`?labelSelector=`) and the field selector `metadata.name=` (what a pod
  watching itself asks for): it ignores them, so list and watch are filtered here;
- graceful deletion: it removes an object at once unless the object has finalizers, and then
  stamps deletionTimestamp with the current time. A real API server keeps a pod for its grace
  period while the kubelet stops it, with deletionTimestamp = now + grace: `add_pod` puts the
  finalizer KUBELET on every pod to stand in for the kubelet, `delete_pod` deletes as the API
  server does, and `finish_pod` (the kubelet done) removes the pod.
"""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

kmock = pytest.importorskip("kmock", reason="kmock (the [test] extra, Python >= 3.11) is needed")
kubernetes = pytest.importorskip("kubernetes", reason="needs the [kubernetes] extra")
from kubernetes import client  # noqa: E402

KUBELET = "tests.elastic.run/kubelet"


def _matches(selector: str, labels: Dict[str, str]) -> bool:
    """Equality-based selectors (a=b,c!=d,e) and set-based `in`, as the API server reads them."""
    for term in filter(None, (t.strip() for t in _split(selector))):
        if " in " in term or " notin " in term:
            key, op, values = term.replace("(", " ").replace(")", " ").split(None, 2)
            chosen = {v.strip() for v in values.split(",")}
            if (labels.get(key) in chosen) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _split(selector: str):
    depth, start = 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            yield selector[start:i]
            start = i + 1
    yield selector[start:]


def _selected(request, obj: dict) -> bool:
    params = request.params or {}
    meta = obj.get("metadata", {})
    labels, fields = params.get("labelSelector"), params.get("fieldSelector")
    if labels and not _matches(labels, meta.get("labels") or {}):
        return False
    if fields:
        for term in fields.split(","):
            key, _, value = term.partition("=")
            if key.strip() != "metadata.name":
                raise ValueError(f"the test emulator filters only metadata.name, not {key}")
            if meta.get("name") != value.strip():
                return False
    return True


class _Emulator(kmock.KubernetesEmulator):
    async def _serve_list(self, request):
        listed = await super()._serve_list(request)
        listed["items"] = [o for o in listed["items"] if _selected(request, o)]
        return listed

    async def _serve_watch(self, request):
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and not _selected(request, event.get("object", {})):
                continue
            yield event


class KubeAPI:
    """The emulator on a thread; `core` is the official client's CoreV1Api pointed at it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stopped: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._serve, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        configuration = client.Configuration()
        configuration.host = self.url
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        async with _Emulator() as handler, kmock.Server(handler) as server:
            # Known before any object of theirs exists: an empty list, not 404, as a cluster.
            handler.resources["v1/pods"] = {}
            handler.resources["v1/nodes"] = {}
            self.handler, self.url = handler, f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stopped.wait()

    def close(self) -> None:
        """Stop serving; open watch streams may keep the (daemon) thread a little longer."""
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(2)

    def kubeconfig(self, directory: Path, namespace: str = "default") -> Path:
        """A kubeconfig file that points the official client (and our CLIs) at the emulator."""
        path = Path(directory) / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters:\n- name: emulator\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: tester\n  user:\n    token: test\n"
            "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n"
            f"    namespace: {namespace}\n")
        return path

    # -- playing the kubelet and the scheduler -----------------------------------------------

    def add_pod(self, name: str, namespace: str = "default", labels: Optional[dict] = None,
                node: str = "node-1", phase: str = "Running", ip: str = "127.0.0.1",
                grace: int = 30, **spec: Any) -> Any:
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels or {},
                                         finalizers=[KUBELET]),
            spec=client.V1PodSpec(node_name=node, termination_grace_period_seconds=grace,
                                  containers=[client.V1Container(name="agent", image="test")],
                                  **spec))
        self.core.create_namespaced_pod(namespace, pod)
        return self.set_phase(name, phase, namespace=namespace, ip=ip)

    def set_phase(self, name: str, phase: str, namespace: str = "default",
                  ip: Optional[str] = "127.0.0.1", conditions: Optional[list] = None) -> Any:
        status: Dict[str, Any] = {"phase": phase}
        if ip is not None:
            status["podIP"] = ip
        if conditions is not None:
            status["conditions"] = conditions
        return self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def delete_pod(self, name: str, namespace: str = "default") -> Any:
        """A graceful deletion (an eviction, a drain): the pod stays until finish_pod, marked to
        be killed after its grace period."""
        import datetime

        pod = self.core.read_namespaced_pod(name, namespace)
        grace = pod.spec.termination_grace_period_seconds
        grace = 30 if grace is None else grace
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=grace)
        return self.core.patch_namespaced_pod(name, namespace, {"metadata": {
            "deletionTimestamp": when.isoformat(), "deletionGracePeriodSeconds": grace}})

    def finish_pod(self, name: str, namespace: str = "default") -> None:
        """The kubelet has stopped a deleted pod: it goes away."""
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": []}})

    def add_node(self, name: str, taints: Optional[list] = None) -> Any:
        node = client.V1Node(metadata=client.V1ObjectMeta(name=name),
                             spec=client.V1NodeSpec(taints=taints or []))
        return self.core.create_node(node)

    def taint(self, node: str, key: str, effect: str = "NoSchedule", value: str = "") -> Any:
        taints = list(self.core.read_node(node).spec.taints or [])
        taints.append({"key": key, "value": value or None, "effect": effect})
        return self.core.patch_node(node, {"spec": {"taints": [
            t if isinstance(t, dict) else self.api_client.sanitize_for_serialization(t)
            for t in taints]}})


@pytest.fixture(scope="module")
def kube():
    api = KubeAPI()
    yield api
    api.close()


def env_for(kube: KubeAPI, tmp_path: Path, pod: str, namespace: str = "default") -> dict:
    """The environment of an agent 'running in' pod `pod` (kubeconfig, POD_NAME, ...)."""
    env = dict(os.environ)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.update(KUBECONFIG=str(kube.kubeconfig(tmp_path, namespace)), POD_NAME=pod,
               POD_NAMESPACE=namespace)
    return env
