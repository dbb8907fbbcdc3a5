"""One node's GPUs for `python -m elastic.run`: read them, choose the workers' devices, watch
their health. The glue between the probe (here), the pure choice (launcher/devices.py) and the
agent's notice sources (health.py); elastic/run.py calls `plan_node` once before the agent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from launcher.devices import GpuRequest, assign

from .health import GpuHealthSource
from .choose import open_probe
from .probe import GpuProbe, NoGpus, NotInspected, ProbeError, node_gpus


@dataclass(frozen=True)
class NodeGpuPlan:
    """What the agent does with this node's GPUs: each local rank's variables, one line for
    the user, and the health source to poll (None: nothing to watch)."""

    local_env: Tuple[Mapping[str, str], ...]
    note: str
    health: Optional[GpuHealthSource] = None
    probe: Optional[GpuProbe] = None

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def plan_node(spec: str, nproc: int, request: GpuRequest) -> NodeGpuPlan:
    """Raises:
        ValueError: --gpu-probe names no probe, or a recorded file that cannot be read.
        launcher.devices.DeviceError: this node cannot serve the request (UnhealthyGpus: only
            because GPUs are unhealthy; the node must not join).
    """
    try:
        probe = open_probe(spec)
    except NoGpus as exc:
        return NodeGpuPlan((), _without_gpus(exc, request))
    try:
        node = node_gpus(probe)
        assignment = assign(node, nproc, request)
    except ProbeError as exc:
        probe.close()
        return NodeGpuPlan((), _without_gpus(NotInspected(f"{probe.source}: {exc}"), request))
    except ValueError:
        probe.close()
        raise
    # The devices the workers use; with none chosen (left alone), those healthy now.
    watched = assignment.used or tuple(g.index for g in node.gpus if g.healthy)
    health = GpuHealthSource(probe, watched) if watched else None
    return NodeGpuPlan(assignment.local_env(nproc), assignment.note, health, probe)


def _without_gpus(why: NoGpus, request: GpuRequest) -> str:
    asked = [flag for flag, value in (("--gpus-per-proc", request.gpus_per_proc),
                                      ("--gpu-memory-fraction", request.memory_fraction))
             if value is not None]
    ignored = f"; {' and '.join(asked)} ignored" if asked else ""
    if isinstance(why, NotInspected):
        return f"GPUs not inspected: {why}; CUDA_VISIBLE_DEVICES left as it is{ignored}"
    return f"no GPU: {why}; the workers run on CPU{ignored}"
