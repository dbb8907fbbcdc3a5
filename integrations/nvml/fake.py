"""`FakeProbe`: recorded device states replayed from a JSON file, for tests and for trying the
GPU paths on a machine without GPUs (`--gpu-probe fake:PATH`).

The file is what `python -m integrations.nvml record` writes on a real machine:

    {"recorded": "...",
     "devices": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
                  "memory_total_mib": 81559, "pci_bus_id": "00000000:18:00.0",
                  "utilization_pct": 0, "memory_used_mib": 0, "xids": [], "ecc_uncorrected": 0,
                  "retired_pages_pending": false, "row_remap_pending": false,
                  "row_remap_failure": false, "lost": false}, ...],
     "topology": ["X NV18", "NV18 X"]}      (rows as `nvidia-smi topo -m` writes them)

Devices and topology are read once; states are read again from the file on every call, so a
test replaces the file (write elsewhere, rename onto it) to make a GPU fail while training runs.
Every message names the file as FAKE: a recorded state is never mistaken for real hardware.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

from launcher.devices import parse_link

from .probe import STATE_FIELDS, DeviceInfo, DeviceState, GpuProbe, ProbeError, node_gpus


class FakeProbe(GpuProbe):
    def __init__(self, path: str) -> None:
        self.path = path
        self.source = f"FAKE, recorded in {path}"
        try:
            doc = self._read()
        except ProbeError as exc:
            raise ValueError(f"--gpu-probe fake:{path}: {exc}") from None
        try:
            self._devices = tuple(
                DeviceInfo(int(d["index"]), str(d["uuid"]), str(d.get("name", "")),
                           int(d.get("memory_total_mib", 0)), str(d.get("pci_bus_id", "")))
                for d in doc["devices"])
            self._links = tuple(tuple(parse_link(cell) for cell in str(row).split())
                                for row in doc.get("topology", ()))
            node_gpus(self)  # the topology fits the devices, every state reads
        except (KeyError, TypeError, ValueError, ProbeError) as exc:
            raise ValueError(f"--gpu-probe fake:{path}: not a recorded GPU state ({exc}); "
                             "write one with `python -m integrations.nvml record`") from None

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise ProbeError(f"recorded GPU state {self.path} cannot be read ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
            raise ProbeError(f"recorded GPU state {self.path} has no list of devices")
        return doc

    def devices(self) -> Tuple[DeviceInfo, ...]:
        return self._devices

    def links(self) -> Tuple[Tuple[int, ...], ...]:
        return self._links

    def states(self) -> Tuple[DeviceState, ...]:
        doc = self._read()
        try:
            return tuple(
                DeviceState(int(d["index"]), **{k: _value(k, d[k]) for k in STATE_FIELDS
                                                if k in d})
                for d in doc["devices"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProbeError(f"recorded GPU state {self.path}: a device is malformed ({exc})") \
                from None


def _value(key: str, value: Any) -> Any:
    if key == "xids":
        return tuple(int(x) for x in value)
    if isinstance(DeviceState.__dataclass_fields__[key].default, bool):
        return bool(value)
    return None if value is None else int(value)
