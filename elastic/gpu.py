"""The worker's side of the GPUs its agent chose (launcher/devices.py): which device is its
own, and the share of its memory it may use.

    import elastic.gpu
    elastic.gpu.setup()                  # integrations.torch.run's ElasticWorld does this
    model.to(elastic.gpu.device())

`setup()` makes the worker's own device current and applies ELASTIC_GPU_MEMORY_FRACTION
(--gpu-memory-fraction) with `torch.cuda.set_per_process_memory_fraction` on it, when CUDA
initialises (at once if it already has), so a worker that never touches CUDA does not pay for
it; without CUDA it does nothing. `device()` is cuda:ELASTIC_CUDA_DEVICE (its own among the
devices it sees: LOCAL_RANK when every worker sees the node's list, 0 when it sees only its
own), else cuda:LOCAL_RANK when CUDA is there, else the CPU.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from elastic.contract import CUDA_DEVICE, GPU_MEMORY_FRACTION, LOCAL_RANK


def memory_fraction(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The share of its device's memory this worker may use, or None for no limit."""
    text = (os.environ if env is None else env).get(GPU_MEMORY_FRACTION, "").strip()
    return float(text) if text else None


def ordinal(env: Optional[Mapping[str, str]] = None) -> int:
    """The worker's own device among the CUDA devices it sees."""
    env = os.environ if env is None else env
    return int(env.get(CUDA_DEVICE) or env.get(LOCAL_RANK) or 0)


def device(env: Optional[Mapping[str, str]] = None):
    """torch.device of this worker's own GPU, or the CPU without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ordinal(env) % torch.cuda.device_count())


def setup(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Once CUDA initialises (at once if it has): make the worker's own device the current one
    (what NCCL and `torch.cuda.current_device()` use) when its agent chose it, and limit the
    worker to its share of that device's memory. Returns the share (None: no limit asked for,
    or no CUDA)."""
    env = os.environ if env is None else env
    fraction = memory_fraction(env)
    if CUDA_DEVICE not in env and fraction is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    own = ordinal(env)

    def apply() -> None:
        index = own % torch.cuda.device_count()
        torch.cuda.set_device(index)
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, index)

    # Queued until CUDA initialises (as torch queues its own seeds), run now if it has.
    torch.cuda._lazy_call(apply)
    return fraction
