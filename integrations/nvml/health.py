"""GPU health in the agent's loop: a failing GPU is a notice that this node must leave.

`GpuHealthSource` is a `launcher.preemption.NoticeSource` named "gpu": the agent's notice
watcher polls it with the other sources (every --preemption-poll-interval), and the first GPU of
this node's workers that `probe.problems` finds unhealthy is the notice. The node then leaves as
on any notice: it leaves the rendezvous at once, its in-place workers commit with the others at
the next step boundary and exit, so the job loses no committed step; the event log records
`preemption_notice` and `node_left` with cause `gpu` and the device and its problem as detail;
the agent exits 1 (a fault, not a planned departure).

Keeping the node out afterwards is the agent's start: `launcher.devices.assign` never chooses an
unhealthy device, and when too few healthy ones remain the agent does not join at all (one
line, exit 1; elastic/run.py). Node ids are new for every agent process, so a blacklist entry in
the round would not recognise the machine when its agent starts again; its GPUs do.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from launcher.preemption import NoticeSourceError

from .probe import GpuProbe, ProbeError, problems

GPU = "gpu"


class GpuHealthSource:
    """Polls the probe for the devices this node's workers use."""

    name = GPU
    exit_code = 1  # the agent's exit code after leaving on this notice

    def __init__(self, probe: GpuProbe, watched: Sequence[int]) -> None:
        self.probe = probe
        self.watched = frozenset(watched)
        self._uuids = {d.index: d.uuid for d in probe.devices()}

    def check(self) -> Optional[Tuple[str, None]]:
        try:
            states = self.probe.states()
        except ProbeError as exc:
            raise NoticeSourceError(f"GPU health cannot be read ({exc}); polling goes on") \
                from None
        bad = [(s.index, problems(s)) for s in states if s.index in self.watched]
        bad = [(index, found) for index, found in bad if found]
        if not bad:
            return None
        fake = "fake " if self.probe.source != "nvml" else ""
        return "; ".join(f"{fake}GPU {index} ({self._uuids.get(index, '?')}): "
                         f"{', '.join(found)}" for index, found in bad), None
