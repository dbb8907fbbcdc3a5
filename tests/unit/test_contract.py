"""The worker contract: one environment for a worker's world, one encoding of the channel."""
import pytest

from elastic import contract
from elastic.contract import (CheckpointSaved, CollectiveFailed, Hello, Leave, Progress, Ready,
                              RoundMessage, Running, WorkerWorld, decode, encode, world_env)
from elastic.policy import BatchPlan, make_policy


def world(**overrides):
    fields = dict(run_id="job", round=3, rank=5, local_rank=1, world_size=8, local_world_size=2,
                  group_rank=2, group_world_size=4, master_addr="10.0.0.1", master_port=29500,
                  restart_count=1, max_restarts=3, role="trainer")
    fields.update(overrides)
    return WorkerWorld(**fields)


def test_world_env_is_torchruns_variables_the_round_and_the_plan():
    plan = make_policy("fixed", global_batch=16, max_micro_batch=2, warmup_steps=7).plan(8)
    env = world_env(world(plan_env=plan.to_env()))
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE",
                                "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                                "ELASTIC_ROUND")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "4", "ROLE_RANK": "5", "ROLE_WORLD_SIZE": "8",
        "ROLE_NAME": "trainer", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "1",
        "TORCHELASTIC_MAX_RESTARTS": "3", "ELASTIC_ROUND": "3"}
    # The plan comes back whole, its warm-up length included.
    assert BatchPlan.from_env(env) == plan and plan.warmup_steps == 7
    assert env[contract.PLAN_LR_WARMUP_STEPS] == "7"


def test_a_world_outside_its_size_is_refused():
    with pytest.raises(ValueError, match="outside a world of 8"):
        world(rank=8)
    with pytest.raises(ValueError, match="2 on its node"):
        world(local_rank=2)


@pytest.mark.parametrize("message", [
    Hello(local_rank=1, pid=4242), Ready(), Running(round=7), Progress(steps=12),
    Progress(steps=12, committed=10), CheckpointSaved(duration_s=0.5),
    CollectiveFailed(round=7, error="RuntimeError: peer gone", traceback="Traceback ..."),
    CollectiveFailed(round=7, error="RuntimeError: peer gone", lost_steps=3),
    RoundMessage(round=8, member=True, world=world(plan_env={"ELASTIC_GLOBAL_BATCH": "16"})),
    RoundMessage(round=9, member=False), Leave(checkpoint=True),
])
def test_every_message_survives_the_channel(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


def test_a_line_that_is_no_message_is_refused():
    with pytest.raises(ValueError, match="not a control-channel message"):
        decode(b'{"type": "shout"}\n')
    with pytest.raises(ValueError, match="malformed Running"):
        decode(b'{"type": "running"}\n')
