"""What a user submits to the shared Ray pool, and what each member is started with. Pure: no Ray,
no etcd, no clock.

Three kinds; `python -m integrations.ray submit` names the first two:

  train  an elastic training job: min..max members, each an agent of this project
         (`python -m elastic.run`) running `--nproc-per-node` workers of the script; the members
         form one job in the etcd rendezvous (its id is the workload's name), so it grows and
         shrinks as the scheduler decides, at step boundaries.
  gang   `members` processes of one command, all started at once or none; each gets torchrun's
         variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...), so a plain DDP
         script runs as a gang.
  endpoint  an inference endpoint of `python -m serving` (registered by `serving deploy
         --rdzv-endpoint`): no process of its own; Ray Serve runs its replicas, as many as the
         scheduler granted of what the endpoint's policy asks for (`min_members` may be 0).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .scheduler import Shape, SubmissionError, Workload
from .scheduler.workload import SAME_NODE, check

TRAIN, GANG, ENDPOINT = "train", "gang", "endpoint"
KINDS = (TRAIN, GANG, ENDPOINT)
# A gang's --placement -> Ray's placement-group strategy. strict-pack is also the scheduler's
# same-node constraint; the others are Ray's to enforce on the nodes the scheduler chose.
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict-pack": "STRICT_PACK",
              "strict-spread": "STRICT_SPREAD"}
MEMBER_LABEL = "ray-member"  # the agent's --node-label naming its member (for release)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Submission:
    name: str
    kind: str
    command: Tuple[str, ...]  # train: the script and its arguments; gang: the whole command
    queue: str = "default"
    priority: Optional[str] = None  # a priority class of the configuration; None: by kind
    min_members: int = 1
    max_members: int = 1
    nproc_per_node: int = 1  # train: workers per member
    cpus: float = 1.0  # per member
    memory_mib: int = 0
    gpus: int = 0
    placement: str = "pack"  # gang: a key of PLACEMENTS
    max_restarts: int = 0  # gang: a failed gang is started again this often
    working_dir: Optional[str] = None  # shipped to the members (Ray's runtime_env working_dir)
    cwd: Optional[str] = None  # without working_dir: where members run (a path every node has)
    agent_args: Tuple[str, ...] = ()  # train: more `elastic.run` flags (batch policy, ...)
    env: Mapping[str, str] = field(default_factory=dict)
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(str(c) for c in self.command))
        object.__setattr__(self, "agent_args", tuple(str(a) for a in self.agent_args))
        object.__setattr__(self, "env", dict(self.env))

    def check(self) -> None:
        """The checks that need nothing but the submission; SubmissionError says what to fix."""
        where = f"workload {self.name!r}"
        if not _NAME.match(self.name or ""):
            raise SubmissionError(f"{where}: a name is 1-63 lower-case letters, digits and '-', "
                                  "starting and ending with a letter or digit")
        if self.kind not in KINDS:
            raise SubmissionError(f"{where}: kind must be one of {', '.join(KINDS)}, got "
                                  f"{self.kind!r}")
        if not self.command and self.kind != ENDPOINT:
            raise SubmissionError(f"{where}: give the command to run (train: the script)")
        if self.placement not in PLACEMENTS:
            raise SubmissionError(f"{where}: --placement must be one of "
                                  f"{', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.nproc_per_node < 1 or self.max_restarts < 0:
            raise SubmissionError(f"{where}: --nproc-per-node must be >= 1 and --max-restarts "
                                  ">= 0")
        if self.cpus < 0 or self.memory_mib < 0 or self.gpus < 0:
            raise SubmissionError(f"{where}: --cpus, --memory and --gpus must not be negative")
        if self.kind == GANG and self.min_members != self.max_members:
            raise SubmissionError(f"{where}: a gang has one size (--members)")
        if self.min_members < (0 if self.kind == ENDPOINT else 1) or \
                self.max_members < max(self.min_members, 1):
            raise SubmissionError(f"{where}: members must be within 1..max, max >= 1 (an "
                                  f"endpoint's min may be 0); got {self.min_members}.."
                                  f"{self.max_members}")

    def workload(self, replicas: int = 0) -> Workload:
        """The scheduler's view: one member = one bundle of cpus/memory/gpus. An endpoint's
        asks for `replicas` (at least one: at zero it is not in the scheduler at all)."""
        self.check()
        shape = Shape(cpu_milli=round(self.cpus * 1000), memory_mib=self.memory_mib,
                      gpus=self.gpus)
        kw = dict(queue=self.queue, priority_class=self.priority)
        if self.kind == TRAIN:
            w = Workload.elastic(self.name, self.min_members, self.max_members, shape, **kw)
        elif self.kind == ENDPOINT:
            ask = max(replicas, self.min_members, 1)  # its policy keeps it within its bounds
            w = Workload.inference(self.name, ask, shape, min_replicas=max(self.min_members, 1),
                                   **kw)
        else:
            constraint = SAME_NODE if self.placement == "strict-pack" else None
            w = Workload.gang(self.name, self.max_members, shape, constraint=constraint, **kw)
        check(w)
        return w

    def bundle(self) -> Dict[str, float]:
        """Ray resources of one member (its placement-group bundle and its actor)."""
        out: Dict[str, float] = {"CPU": self.cpus} if self.cpus else {}
        if self.memory_mib:
            out["memory"] = float(self.memory_mib * 2**20)
        if self.gpus:
            out["GPU"] = float(self.gpus)
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "Submission":
        raw = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def with_time(sub: Submission, now: float) -> Submission:
    return replace(sub, submitted_at=now)


def job_id(sub: Submission, attempt: int) -> str:
    """The rendezvous job of a training workload: its name; a new one per admission after a
    preemption stopped it (the checkpoint carries the progress across)."""
    return sub.name if attempt == 0 else f"{sub.name}-{attempt}"


def agent_command(sub: Submission, endpoint: str, job: str, member: str,
                  python: str = sys.executable) -> List[str]:
    """A training member: one agent of this project, labelled with its member id."""
    return [python, "-m", "elastic.run", "--nnodes", f"{sub.min_members}:{sub.max_members}",
            "--nproc-per-node", str(sub.nproc_per_node), "--rdzv-endpoint", endpoint,
            "--rdzv-id", job, "--node-label", f"{MEMBER_LABEL}={member}", *sub.agent_args,
            *sub.command]


def gang_command(sub: Submission, python: str = sys.executable) -> List[str]:
    """A gang member's command; a leading `.py` file runs under this Python."""
    cmd = list(sub.command)
    return [python, *cmd] if cmd[0].endswith(".py") else cmd


def gang_env(rank: int, world: int, master_addr: str, master_port: int, job: str) -> Dict[str, str]:
    """torchrun's variables for one gang member (one process per member)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port), "TORCHELASTIC_RUN_ID": job}


def worst_exit(codes: Sequence[Optional[int]]) -> int:
    """A gang's exit status: its first failing member's (a signal counts as failing), else 0."""
    for code in codes:
        if code:
            return code
    return 0


def member_name(member_id: str) -> str:
    """A Ray actor / placement-group name for a scheduler member id (`<workload>/<n>`)."""
    return member_id.replace("/", ".")
