"""`NvmlProbe`: this machine's NVIDIA GPUs through NVML (`pynvml`, the [gpu] extra).

Without a driver (`NVMLError_LibraryNotFound`, `NVMLError_DriverNotLoaded`), without
nvidia-ml-py, or with no device, opening it raises `NoGpus` with the reason: the caller says so
in one line and the workers run on CPU.

Links: NVLink when NVML reports NVLink peer-to-peer between the two devices (direct links or
through NVSwitches), else their common PCIe ancestor (`nvmlDeviceGetTopologyCommonAncestor`;
"internal", two GPUs on one board, counts as one PCIe switch).

Xid events are not kept by the driver: the probe registers for them when it opens and keeps
every one it has seen since, per device. A GPU whose Xid came before the probe opened is seen
through what the Xid left behind: a device that no longer answers, uncorrectable ECC errors, or
retired pages and remapped rows waiting for a reset (see `probe.problems`).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

from launcher.devices import NVLINK, PIX

from .probe import DeviceInfo, DeviceState, GpuProbe, NoGpus, NotInspected, ProbeError

MIB = 2 ** 20


def _pynvml():
    try:
        import pynvml
    except ImportError:
        raise NotInspected("nvidia-ml-py is not installed: pip install 'elastic-run[gpu]'") \
            from None
    return pynvml


class NvmlProbe(GpuProbe):
    source = "nvml"

    def __init__(self) -> None:
        nvml = self._nvml = _pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError_LibraryNotFound:
            raise NoGpus("no NVIDIA driver (NVML library not found)") from None
        except nvml.NVMLError_DriverNotLoaded:
            raise NoGpus("the NVIDIA driver is not loaded") from None
        except nvml.NVMLError as exc:
            raise NoGpus(f"NVML does not start ({exc})") from None
        self._lock = threading.Lock()
        self._open = True
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise NoGpus("NVML finds no GPU")
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._devices = tuple(self._info(i, h) for i, h in enumerate(self._handles))
            self._links = self._topology()
            self._xids: Dict[int, List[int]] = {i: [] for i in range(count)}
            self._events = [self._watch_xids(h) for h in self._handles]
        except NoGpus:
            self.close()
            raise
        except nvml.NVMLError as exc:
            self.close()
            raise NoGpus(f"NVML cannot read the GPUs ({exc})") from None

    def _info(self, index: int, handle: Any) -> DeviceInfo:
        nvml = self._nvml
        pci = nvml.nvmlDeviceGetPciInfo(handle)
        bus_id = pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)
        return DeviceInfo(index=index, uuid=nvml.nvmlDeviceGetUUID(handle),
                          name=nvml.nvmlDeviceGetName(handle),
                          memory_total_mib=nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB,
                          pci_bus_id=bus_id)

    def _topology(self) -> Tuple[Tuple[int, ...], ...]:
        nvml, handles = self._nvml, self._handles
        rows = []
        for a, ha in enumerate(handles):
            row = []
            for b, hb in enumerate(handles):
                if a == b:
                    row.append(0)
                    continue
                try:
                    nvlink = nvml.nvmlDeviceGetP2PStatus(
                        ha, hb, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == nvml.NVML_P2P_STATUS_OK
                except nvml.NVMLError:
                    nvlink = False
                if nvlink:
                    row.append(NVLINK)
                else:
                    level = nvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb)
                    row.append(PIX if level == nvml.NVML_TOPOLOGY_INTERNAL else int(level))
            rows.append(row)
        for a in range(len(rows)):  # NVML may answer P2P one way only; a link is both ways
            for b in range(a):
                rows[a][b] = rows[b][a] = min(rows[a][b], rows[b][a])
        return tuple(tuple(r) for r in rows)

    def _watch_xids(self, handle: Any):
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except nvml.NVMLError:  # not supported (some virtual GPUs): health without Xids
            return None

    def devices(self) -> Tuple[DeviceInfo, ...]:
        return self._devices

    def links(self) -> Tuple[Tuple[int, ...], ...]:
        return self._links

    def states(self) -> Tuple[DeviceState, ...]:
        with self._lock:
            if not self._open:
                raise ProbeError("the NVML probe is closed")
            return tuple(self._state(i, h) for i, h in enumerate(self._handles))

    def _state(self, index: int, handle: Any) -> DeviceState:
        nvml = self._nvml
        self._drain_xids(index)
        lost = False

        def ask(call, *args, default=None):
            nonlocal lost
            try:
                return call(handle, *args)
            except (nvml.NVMLError_GpuIsLost, nvml.NVMLError_Unknown):
                lost = True
            except nvml.NVMLError:  # not supported, no permission: that field is unknown
                pass
            return default

        util = ask(nvml.nvmlDeviceGetUtilizationRates)
        memory = ask(nvml.nvmlDeviceGetMemoryInfo)
        ecc = ask(nvml.nvmlDeviceGetTotalEccErrors, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                  nvml.NVML_VOLATILE_ECC, default=0)
        pending = ask(nvml.nvmlDeviceGetRetiredPagesPendingStatus, default=0)
        remap = ask(nvml.nvmlDeviceGetRemappedRows, default=(0, 0, 0, 0))
        return DeviceState(
            index=index, utilization_pct=None if util is None else int(util.gpu),
            memory_used_mib=None if memory is None else int(memory.used) // MIB,
            xids=tuple(self._xids[index]), ecc_uncorrected=int(ecc),
            retired_pages_pending=bool(pending), row_remap_pending=bool(remap[2]),
            row_remap_failure=bool(remap[3]), lost=lost)

    def _drain_xids(self, index: int) -> None:
        nvml, events = self._nvml, self._events[index]
        if events is None:
            return
        while True:
            try:
                data = nvml.nvmlEventSetWait(events, 0)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as exc:
                raise ProbeError(f"NVML: Xid events of GPU {index} cannot be read ({exc})") \
                    from None
            if data.eventType == nvml.nvmlEventTypeXidCriticalError:
                self._xids[index].append(int(data.eventData))

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            for events in getattr(self, "_events", ()):
                if events is not None:
                    try:
                        self._nvml.nvmlEventSetFree(events)
                    except self._nvml.NVMLError:
                        pass
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
