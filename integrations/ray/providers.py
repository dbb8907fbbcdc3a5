"""Where new nodes come from: the scheduler's RequestNodes / ReleaseNodes, carried out.

    request(node_type, count)   ask for `count` more nodes of a configured node type
    release(node_ids)           give these (idle) nodes back

`RayAutoscalerProvider` asks a real cluster's autoscaler (`ray.autoscaler.sdk.request_resources`:
the autoscaler adds nodes to meet the request and removes idle ones itself). `LocalClusterProvider`
adds and removes the nodes of a `ray.cluster_utils.Cluster` in this process (tests, local use;
Ray 2.60's own AutoscalingCluster is broken as shipped and its start runs `ray stop`).
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Sequence

from .scheduler.config import NODE_TYPE_LABEL, NodeType

log = logging.getLogger(__name__)


class NodeProvider:
    def request(self, node_type: NodeType, count: int) -> None:
        raise NotImplementedError

    def release(self, node_ids: Sequence[str]) -> None:
        raise NotImplementedError


class NoProvider(NodeProvider):
    """A fixed pool: requests and releases are logged and nothing else."""

    def request(self, node_type: NodeType, count: int) -> None:
        log.info("the pool is fixed (no --provider): %d node(s) of type %s not requested",
                 count, node_type.name)

    def release(self, node_ids: Sequence[str]) -> None:
        log.info("the pool is fixed (no --provider): idle nodes %s kept", ", ".join(node_ids))


def _bundle(t: NodeType) -> Dict[str, float]:
    out = {"CPU": t.cpu_milli / 1000}
    if t.gpus:
        out["GPU"] = float(t.gpus)
    return out


class RayAutoscalerProvider(NodeProvider):
    """A real cluster's autoscaler. Requests are standing: what is asked for stays asked for,
    and a release lowers the ask so the autoscaler may take idle nodes away."""

    def __init__(self):
        self._asked: Dict[str, int] = {}
        self._types: Dict[str, NodeType] = {}

    def _send(self) -> None:
        from ray.autoscaler.sdk import request_resources
        bundles = [_bundle(self._types[name]) for name, n in self._asked.items()
                   for _ in range(n)]
        request_resources(bundles=bundles)

    def request(self, node_type: NodeType, count: int) -> None:
        self._types[node_type.name] = node_type
        self._asked[node_type.name] = self._asked.get(node_type.name, 0) + count
        self._send()

    def release(self, node_ids: Sequence[str]) -> None:
        import ray
        kinds = {n["NodeID"]: (n.get("Labels") or {}).get(NODE_TYPE_LABEL) for n in ray.nodes()}
        for nid in node_ids:
            kind = kinds.get(nid)
            if kind in self._asked:
                self._asked[kind] = max(0, self._asked[kind] - 1)
        self._send()


class LocalClusterProvider(NodeProvider):
    """Nodes of a `ray.cluster_utils.Cluster` started in this process; each added node carries
    its type's labels and `node-type=<name>`. Ray starts a node only from the main thread, and
    it takes seconds: the controller using this provider ticks in the main thread (tests, local
    use)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._nodes: Dict[str, object] = {}
        self._lock = threading.Lock()
        self.added = 0
        self.removed = 0

    def request(self, node_type: NodeType, count: int) -> None:
        for _ in range(count):
            self._add(node_type)

    def _add(self, t: NodeType) -> None:
        with self._lock:
            node = self.cluster.add_node(
                num_cpus=t.cpu_milli / 1000, num_gpus=t.gpus,
                labels={**{k: str(v) for k, v in t.labels.items()}, NODE_TYPE_LABEL: t.name})
            self._nodes[node.node_id] = node
            self.added += 1
        log.info("added a node of type %s: %s", t.name, node.node_id)

    def release(self, node_ids: Sequence[str]) -> None:
        with self._lock:
            for nid in node_ids:
                node = self._nodes.pop(nid, None)
                if node is not None:
                    self.cluster.remove_node(node, allow_graceful=True)
                    self.removed += 1
                    log.info("released node %s", nid)
