"""`--gpu-probe`: which `GpuProbe` a node reads (apart from probe.py, which both probes
build on)."""
from __future__ import annotations

from .fake import FakeProbe
from .nvml import NvmlProbe
from .probe import FAKE, NONE, NVML, GpuProbe, NotInspected


def open_probe(spec: str = NVML) -> GpuProbe:
    """The probe `--gpu-probe` names: nvml (the machine's GPUs), fake:PATH (recorded states),
    or none.

    Raises:
        NoGpus: no GPU to use here (with why: no driver, nvidia-ml-py missing, none asked for).
        ValueError: a spec that is none of those, or a recorded file that cannot be read.
    """
    if spec == NONE:
        raise NotInspected("--gpu-probe none")
    if spec.startswith(FAKE):
        return FakeProbe(spec[len(FAKE):])
    if spec != NVML:
        raise ValueError(f"--gpu-probe {spec!r}: use nvml, fake:PATH (recorded states) or none")
    return NvmlProbe()
