"""What a worker process learns from its launcher: the batch plan of the world it runs in.

The agent computes the plan of each round with the job's batch policy and exports it as
ELASTIC_* variables (see `elastic.policy.BatchPlan.to_env`); this is the one place a worker reads
them.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from elastic.contract import PLAN_LR_WARMUP_STEPS
from elastic.policy import BatchPlan, BatchPolicyError, LrSchedule


def current_plan(env: Optional[Mapping[str, str]] = None) -> BatchPlan:
    """The batch plan of this worker's world.

    Raises:
        BatchPolicyError: the launcher was started without a batch policy.
    """
    plan = BatchPlan.from_env(os.environ if env is None else env)
    if plan is None:
        raise BatchPolicyError(
            "no batch plan in this worker's environment; start it with "
            "`python -m elastic.run --global-batch-size N` (or --batch-policy ...)")
    return plan


def lr_schedule(env: Optional[Mapping[str, str]] = None) -> LrSchedule:
    """The learning-rate warm-up the job was started with (--lr-warmup-steps): feed it each
    plan with `on_plan(plan, step)` and multiply the base rate by `factor(step)`."""
    env = os.environ if env is None else env
    return LrSchedule(int(env.get(PLAN_LR_WARMUP_STEPS, "0")))
