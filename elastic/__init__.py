"""What the user touches: `python -m elastic.run` and the worker-side API.

    from elastic import ElasticState, ElasticSampler, current_plan

Names are imported on first use, so the launcher itself starts without importing torch.
"""
import importlib

_EXPORTS = {
    "ElasticState": "elastic.state",
    "StateSyncError": "elastic.state",
    "ElasticSampler": "elastic.sampler",
    "collate_or_none": "elastic.sampler",
    "current_plan": "elastic.worker",
    "lr_schedule": "elastic.worker",
    "BatchPlan": "elastic.policy",
    "BatchPolicyError": "elastic.policy",
    "LrSchedule": "elastic.policy",
    "make_policy": "elastic.policy",
    "valid_global_batches": "elastic.policy",
    "AdaScaleGain": "elastic.adascale",
    "CheckpointError": "elastic.checkpoint",
    "CheckpointCorrupted": "elastic.checkpoint",
    "CheckpointMismatch": "elastic.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elastic' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
