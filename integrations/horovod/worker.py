"""What a Horovod worker asks its agent: the batch plan of the world it is in *now*.

A Horovod worker started by `python -m elastic.run --backend horovod` gets the plan of its first
round as ELASTIC_* variables, like a torch worker; after an in-place reset (`hvd.elastic.run`) it
is in another world, and its environment still names the old plan. `current_plan()` asks the
agent instead, so a reset callback applies the new world's plan:

    state = hvd.elastic.TorchState(model, optimizer, step=0)
    def on_reset():
        plan = current_plan()                       # this world's global batch and lr factor
        for g in optimizer.param_groups:
            g["lr"] = BASE_LR * plan.lr_factor
    state.register_reset_callbacks([on_reset])

Anywhere else (horovodrun, the torch backend) it reads the environment as
`elastic.worker.current_plan()` does.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Mapping, Optional

from elastic.policy import BatchPlan, BatchPolicyError
from elastic.worker import current_plan as plan_from_env

from .slots import ENV_PLAN_URL

REQUEST_TIMEOUT_S = 10.0


def current_plan(env: Optional[Mapping[str, str]] = None) -> BatchPlan:
    """The batch plan of this worker's current world.

    Raises:
        BatchPolicyError: the job was started without a batch policy.
        OSError: the agent did not answer.
    """
    env = os.environ if env is None else env
    url = env.get(ENV_PLAN_URL)
    if not url:
        return plan_from_env(env)
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
            variables = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        variables = {}
    plan = BatchPlan.from_env(variables)
    if plan is None:
        return plan_from_env({})  # raises the error that names the flags to pass
    return plan
