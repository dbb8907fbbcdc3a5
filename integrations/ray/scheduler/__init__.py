"""The cluster scheduler's decisions as a pure library: no Ray, no etcd, no clock of its own.

    from integrations.ray.scheduler import Config, State, Workload, Shape, Node, step, apply, submit

    state = State.of(Config.default(), nodes, now=0)
    state = submit(state, Workload.gang("train", 4, Shape(gpus=8, cpu_milli=32000)), now=0)
    result = step(state, now=1)          # typed decisions, each with a reason; a reason per pending workload
    state = apply(state, result)         # what the simulator does; the Ray binding carries them out

`model` (nodes, shapes), `config` (the operator's YAML), `workload` (gangs, elastic jobs,
endpoints), `quota` (cluster queues and cohorts), `pool` + `placement` (where members go),
`step` (the policy), `state` (the state and the events that change it).
"""
from .config import Config, ConfigError, load, parse
from .decisions import (Admit, Preempt, Release, ReleaseNodes, Requeue, RequestNodes, Reserve,
                        Resize, Step, Unreserve)
from .model import Gpu, ModelError, Node, Shape
from .state import (State, add_node, apply, drain_node, finish, mark_ready, rebind,
                    remove_node, restore, set_replicas, submit)
from .step import step
from .workload import SubmissionError, Workload

__all__ = ["Config", "ConfigError", "load", "parse", "Admit", "Preempt", "Release",
           "ReleaseNodes", "Requeue", "RequestNodes", "Reserve", "Resize", "Step", "Unreserve",
           "Gpu", "ModelError", "Node", "Shape", "State", "add_node", "apply", "drain_node",
           "finish", "mark_ready", "rebind", "remove_node", "restore", "set_replicas", "submit", "step",
           "SubmissionError", "Workload"]
