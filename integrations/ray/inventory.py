"""Ray's view of its nodes -> the scheduler's `Node`s. Pure: it reads what `ray.nodes()` returns.

A node's name in the scheduler is its Ray node id. Its labels are Ray's node labels without
Ray's own (`ray.io/...`): `capacity-type`, `zone`, `node-type`, `gpu-model` are read from there.
GPUs: Ray's `GPU` resource; their model is the `gpu-model` label (else Ray's
`accelerator_type:<model>` resource), their memory the `gpu-memory-mib` label (0 when unknown).
"""
from __future__ import annotations

from typing import Iterable, List, Mapping

from .scheduler import Gpu, Node
from .scheduler.config import GPU_MODEL_LABEL

GPU_MEMORY_LABEL = "gpu-memory-mib"
RAY_LABEL_PREFIX = "ray.io/"


def node_from_ray(info: Mapping) -> Node:
    resources = info.get("Resources") or {}
    labels = {k: str(v) for k, v in (info.get("Labels") or {}).items()
              if not k.startswith(RAY_LABEL_PREFIX)}
    model = labels.get(GPU_MODEL_LABEL) or next(
        (k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), "gpu")
    memory = int(labels.get(GPU_MEMORY_LABEL, "0") or 0)
    gpus = tuple(Gpu(model, memory) for _ in range(int(resources.get("GPU", 0))))
    return Node(name=info["NodeID"], cpu_milli=round(resources.get("CPU", 0) * 1000),
                memory_mib=int(resources.get("memory", 0) // 2**20), gpus=gpus, labels=labels)


def alive_nodes(infos: Iterable[Mapping]) -> List[Node]:
    """The live nodes, in Ray's order."""
    return [node_from_ray(i) for i in infos if i.get("Alive")]


def noticed_members(events: Iterable[Mapping], member_of: Mapping[str, str]) -> List[str]:
    """Members whose agent reported a preemption notice (a spot node about to go), from a
    job's event history; `member_of` maps the job's node ids to member names. A release is a
    notice too, but the pool asked for it: it does not count."""
    out = []
    for e in events:
        if e.get("event") == "preemption_notice" and e.get("cause") != "released":
            member = member_of.get(e.get("node", ""))
            if member is not None and member not in out:
                out.append(member)
    return out


def replica_nodes(actors: Mapping[str, Mapping], endpoint: str, state: str = "ALIVE") -> List[str]:
    """The nodes an endpoint's Serve replicas in `state` are on, one entry per replica (empty
    for one not placed yet), from Ray's actor table (Serve names a replica's class
    `ServeReplica:<app>:<deployment>`; an endpoint of `python -m serving` is one application
    with one deployment, both named after it)."""
    cls = f"ServeReplica:{endpoint}:{endpoint}"
    return sorted(a["Address"]["NodeID"] for a in actors.values()
                  if a.get("ActorClassName") == cls and a.get("State") == state)
