"""The worker contract: everything a worker process is told by its agent, in one place.

- The environment variables: torchrun's (a script written for torchrun runs unmodified), this
  project's `ELASTIC_*`, and the names a backend adds.
- `WorkerWorld`, one worker's place in one round, and `world_env`, the variables a worker of that
  world has. It is the only place they are built: at spawn (`launcher.workers`), when an in-place
  worker enters a new world (`integrations.torch.world`), and when a pre-warmed Horovod worker
  gets its first world (`integrations.horovod`, through the launcher's spawn environment).
- The messages of the local control channel between an agent and its in-place workers
  (`launcher.control` on one end, `integrations.torch.world` on the other), as dataclasses with
  one encoding: newline-delimited JSON, a "type" field naming the message.

Imports nothing of the project: the worker library, the launcher and the integrations all use it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Mapping, Optional, Union

# -- torchrun's variables ------------------------------------------------------------------
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
GROUP_RANK = "GROUP_RANK"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
ROLE_RANK = "ROLE_RANK"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
ROLE_NAME = "ROLE_NAME"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
RUN_ID = "TORCHELASTIC_RUN_ID"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # torch's @record writes an uncaught exception there
OMP_NUM_THREADS = "OMP_NUM_THREADS"
PYTHONUNBUFFERED = "PYTHONUNBUFFERED"

# -- this project's variables -----------------------------------------------------------------
ROUND = "ELASTIC_ROUND"              # the round the worker's world belongs to
STANDBY = "ELASTIC_STANDBY"          # "1": started without a world, pre-warmed; it waits for one
AGENT_ADDR = "ELASTIC_AGENT_ADDR"    # host:port of the agent's control channel (in-place workers)
# The batch plan (elastic.policy.BatchPlan.to_env / from_env)
PLAN_POLICY = "ELASTIC_BATCH_POLICY"
PLAN_WORLD_SIZE = "ELASTIC_PLAN_WORLD_SIZE"
PLAN_GLOBAL_BATCH = "ELASTIC_GLOBAL_BATCH"
PLAN_ACCUM_STEPS = "ELASTIC_ACCUM_STEPS"
PLAN_MICRO_BATCHES = "ELASTIC_MICRO_BATCHES"
PLAN_LR_FACTOR = "ELASTIC_LR_FACTOR"
PLAN_SCALE = "ELASTIC_BATCH_SCALE"
PLAN_LR_WARMUP_STEPS = "ELASTIC_LR_WARMUP_STEPS"
# Horovod workers (integrations.horovod)
HOROVOD_ENDPOINTS = "ELASTIC_HOROVOD_ENDPOINTS"  # one rendezvous endpoint per local rank
PLAN_URL = "ELASTIC_PLAN_URL"                    # where a worker asks for its current plan
# GPUs (launcher.devices chooses them; elastic.gpu reads these in the worker)
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
CUDA_DEVICE_ORDER = "CUDA_DEVICE_ORDER"          # PCI_BUS_ID: CUDA numbers GPUs as nvidia-smi
CUDA_DEVICE = "ELASTIC_CUDA_DEVICE"              # the worker's own device: cuda:<this>
GPU_MEMORY_FRACTION = "ELASTIC_GPU_MEMORY_FRACTION"  # its share of that device's memory


@dataclass(frozen=True)
class WorkerWorld:
    """One worker's place in one round's world. plan_env: the round's batch plan as variables."""

    run_id: str
    round: int
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    group_rank: int
    group_world_size: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    max_restarts: int = 0
    role: str = "default"
    plan_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"rank {self.rank} (local {self.local_rank}) is outside a world of "
                             f"{self.world_size} ({self.local_world_size} on its node)")
        object.__setattr__(self, "plan_env", dict(self.plan_env))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "WorkerWorld":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def world_env(world: WorkerWorld) -> Dict[str, str]:
    """The variables of a worker in `world`: torchrun's, the round, and the batch plan."""
    w = world
    env = dict(w.plan_env)
    env.update({
        RANK: str(w.rank), LOCAL_RANK: str(w.local_rank), WORLD_SIZE: str(w.world_size),
        LOCAL_WORLD_SIZE: str(w.local_world_size), GROUP_RANK: str(w.group_rank),
        GROUP_WORLD_SIZE: str(w.group_world_size), ROLE_RANK: str(w.rank),
        ROLE_WORLD_SIZE: str(w.world_size), ROLE_NAME: w.role, MASTER_ADDR: w.master_addr,
        MASTER_PORT: str(w.master_port), RUN_ID: w.run_id,
        RESTART_COUNT: str(w.restart_count), MAX_RESTARTS: str(w.max_restarts),
        USE_AGENT_STORE: "False", PYTHONUNBUFFERED: "1", ROUND: str(w.round),
    })
    return env


def standby_env(local_rank: int, local_world_size: int) -> Dict[str, str]:
    """The variables of a worker started without a world (pre-warmed, waiting for a round)."""
    return {LOCAL_RANK: str(local_rank), LOCAL_WORLD_SIZE: str(local_world_size),
            PYTHONUNBUFFERED: "1", STANDBY: "1"}


# -- control-channel messages ----------------------------------------------------------------
# worker -> agent
@dataclass(frozen=True)
class Hello:
    """First message of a worker that uses the in-place API."""

    local_rank: int
    pid: int


@dataclass(frozen=True)
class Ready:
    """The worker waits for a round (standby)."""


@dataclass(frozen=True)
class Running:
    """The worker runs in `round`'s world."""

    round: int


@dataclass(frozen=True)
class Progress:
    """The worker passed `steps` step boundaries (sent at most every few tenths of a second);
    `committed`: steps of progress it had committed by then (metrics; None: not known)."""

    steps: int
    committed: Optional[int] = None


@dataclass(frozen=True)
class CollectiveFailed:
    """A collective failed in `round`; the worker rolled back and waits for the next round."""

    round: int
    error: str = ""
    traceback: str = ""
    lost_steps: Optional[int] = None  # steps since the last commit, to be trained again


@dataclass(frozen=True)
class CheckpointSaved:
    """The worker wrote a checkpoint in `duration_s` seconds (metrics)."""

    duration_s: float


# agent -> worker
@dataclass(frozen=True)
class RoundMessage:
    """A new round: `world` is the worker's place in it when its node is a member."""

    round: int
    member: bool
    world: Optional[WorkerWorld] = None


@dataclass(frozen=True)
class Leave:
    """The node leaves: finish at the next step boundary; checkpoint when no node remains."""

    checkpoint: bool = False


Message = Union[Hello, Ready, Running, Progress, CollectiveFailed, CheckpointSaved, RoundMessage,
                Leave]
_TYPES = {"hello": Hello, "ready": Ready, "running": Running, "progress": Progress,
          "collective_failed": CollectiveFailed, "checkpoint_saved": CheckpointSaved,
          "round": RoundMessage, "leave": Leave}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    """One line of the channel."""
    data = {"type": _NAMES[type(message)], **asdict(message)}
    return (json.dumps(data) + "\n").encode()


def decode(line: Union[str, bytes]) -> Message:
    """A message from one line of the channel.

    Raises:
        ValueError: not a message of this contract.
    """
    data = json.loads(line)
    cls = _TYPES.get(data.pop("type", None)) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"not a control-channel message: {line!r}")
    if cls is RoundMessage and data.get("world") is not None:
        data["world"] = WorkerWorld.from_dict(data["world"])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"malformed {cls.__name__} message: {line!r}") from exc
