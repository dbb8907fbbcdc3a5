"""The contract of a GPU probe, the health rule, and what the launcher and the scheduler read.

A `GpuProbe` answers three questions about this machine's NVIDIA GPUs: which devices (index,
UUID, model, memory), how they are linked (NVML's topology levels, NVLink below them all: see
launcher/devices.py), and how each is now (`DeviceState`: utilisation, memory in use, and what
the health rule reads). Two implementations: `NvmlProbe` (integrations/nvml/nvml.py, the real
one) and `FakeProbe` (integrations/nvml/fake.py, recorded states replayed from a JSON file in
the format `record` writes). `choose.open_probe` picks one from `--gpu-probe`.

The health rule (`problems`) says why a device should not be trained on, in the user's words:
- it no longer answers NVML (fallen off the bus, GPU lost);
- a critical Xid event (every Xid except the ones NVIDIA's Kubernetes device plugin ignores as
  the application's own doing: 13, 31, 43, 45, 68, 109);
- uncorrectable ECC errors since the driver loaded (volatile counter);
- retired pages or remapped rows waiting for a GPU reset, or a row remapping that failed.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Tuple

from launcher.devices import LINK_NAMES, Gpu, NodeGpus

NVML, FAKE, NONE = "nvml", "fake:", "none"
# Xids caused by the application (a bad kernel, a page fault, a timeout), not by the GPU.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
XID_MEANING = {
    48: "double-bit ECC error", 62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping", 64: "ECC page retirement or row remapping failed",
    74: "NVLink error", 79: "fallen off the bus", 92: "high single-bit ECC error rate",
    94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout",
    120: "GSP error",
}


class NoGpus(Exception):
    """This machine has no GPU to use (no driver, no device, or none asked for); the message
    says why. Not an error: the workers run on CPU."""


class NotInspected(NoGpus):
    """GPUs were not looked at (--gpu-probe none, nvidia-ml-py missing): there may be some,
    left as they are."""


class ProbeError(Exception):
    """A probe could not read the devices now (the message says which and why)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What does not change while the machine runs."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int
    pci_bus_id: str = ""


@dataclass(frozen=True)
class DeviceState:
    """One device now. xids: critical and other Xid events seen (NVML: since the probe
    started, events are not kept by the driver); ecc_uncorrected: since the driver loaded."""

    index: int
    utilization_pct: Optional[int] = None
    memory_used_mib: Optional[int] = None
    xids: Tuple[int, ...] = ()
    ecc_uncorrected: int = 0
    retired_pages_pending: bool = False
    row_remap_pending: bool = False
    row_remap_failure: bool = False
    lost: bool = False


def problems(state: DeviceState) -> Tuple[str, ...]:
    """Why this device should not be trained on (empty: healthy); see the module docstring."""
    found = []
    if state.lost:
        found.append("does not answer (GPU lost)")
    for xid in dict.fromkeys(state.xids):
        if xid not in APPLICATION_XIDS:
            meaning = XID_MEANING.get(xid)
            found.append(f"Xid {xid}" + (f" ({meaning})" if meaning else ""))
    if state.ecc_uncorrected:
        found.append(f"{state.ecc_uncorrected} uncorrectable ECC errors")
    if state.retired_pages_pending:
        found.append("retired pages pending a GPU reset")
    if state.row_remap_failure:
        found.append("row remapping failed")
    elif state.row_remap_pending:
        found.append("row remapping pending a GPU reset")
    return tuple(found)


class GpuProbe(abc.ABC):
    """This machine's GPUs. `source` names where the answers come from, for every message."""

    source: str = ""

    @abc.abstractmethod
    def devices(self) -> Tuple[DeviceInfo, ...]:
        """Every device, in index order."""

    @abc.abstractmethod
    def links(self) -> Tuple[Tuple[int, ...], ...]:
        """links[a][b] between devices()[a] and devices()[b] (launcher.devices levels)."""

    @abc.abstractmethod
    def states(self) -> Tuple[DeviceState, ...]:
        """How each device is now, in index order.

        Raises:
            ProbeError: the devices cannot be read now.
        """

    def close(self) -> None:
        """Release what the probe holds (NVML's handle); idempotent."""


def node_gpus(probe: GpuProbe) -> NodeGpus:
    """The launcher's view: devices with their health, and their links.

    Raises:
        ProbeError: the devices cannot be read now.
    """
    states = {s.index: s for s in probe.states()}
    gpus = tuple(Gpu(d.index, d.uuid, d.name, d.memory_total_mib,
                     problems(states.get(d.index, DeviceState(d.index, lost=True))))
                 for d in probe.devices())
    return NodeGpus(gpus, probe.links(), probe.source)


def link_name(level: int) -> str:
    """A level as nvidia-smi writes it (NV without the number of links, which we do not keep)."""
    return LINK_NAMES[level]


def record(probe: GpuProbe, note: str = "") -> Dict:
    """The probe's devices, states and topology as the JSON document `FakeProbe` replays."""
    states = {s.index: s for s in probe.states()}
    devices = []
    for d in probe.devices():
        entry = asdict(d)
        state = asdict(states.get(d.index, DeviceState(d.index, lost=True)))
        state.pop("index")
        state["xids"] = list(state["xids"])
        entry.update(state)
        devices.append(entry)
    return {"recorded": note or f"from {probe.source}", "devices": devices,
            "topology": [" ".join(link_name(level) for level in row) for row in probe.links()]}


STATE_FIELDS = tuple(f.name for f in fields(DeviceState) if f.name != "index")
