"""The configuration an operator writes: one YAML file in the manner of Kueue.

    resourceFlavors:                      # kinds of capacity, told apart by node labels
      - name: a100-spot
        nodeLabels: {gpu-model: A100, capacity-type: spot}
      - name: a100
        nodeLabels: {gpu-model: A100, capacity-type: on-demand}
    clusterQueues:
      - name: team-a
        cohort: research                  # queues of a cohort lend each other unused quota
        queueingStrategy: BestEffortFIFO  # or StrictFIFO: the head blocks the queue
        flavors:                          # tried in this order
          - name: a100
            resources:
              gpu: {nominalQuota: 8, borrowingLimit: 4, lendingLimit: 2}
              cpu: {nominalQuota: 64}
              memory: {nominalQuota: 512Gi}
    priorityClasses:                      # these are the defaults
      - {name: inference, value: 300}
      - {name: training, value: 200}
      - {name: batch, value: 100}
    nodeTypes:                            # what the autoscaler may add (optional)
      - {name: a100x8, cpu: 96, memory: 1Ti, gpus: 8, gpuModel: A100, gpuMemory: 80Gi,
         labels: {capacity-type: spot}, min: 0, max: 16}
    timeouts: {waitForReadySeconds: 300, requeueBaseSeconds: 60, requeueMaxSeconds: 3600,
               requeueLimit: 5, nodeIdleSeconds: 600, nodeRequestSeconds: 900}
    placement: best_fit                   # best_fit | binpack | spread | packing | fgd | ours | random

Quantities are written as Kubernetes writes them: cpu 4 or 500m, memory 512Gi (a bare number is
bytes), gpu 2 or 0.5. The label `gpu-model` matches a node's GPU model. A resource a queue's flavor
does not list is not limited by that queue. Without a file (`Config.default()`) there is one
flavor holding every node and one queue without limits.

Every error names the field it is about: `clusterQueues[0].flavors[1].resources.gpu.nominalQuota:
must be a number >= 0, got 'eight'`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .model import CAPACITY_TYPE, GPU_MILLI, Gpu, Node

RESOURCES = ("cpu", "memory", "gpu")  # cpu in millicores, memory in MiB, gpu in milli-GPUs
RESOURCE_ALIASES = {"nvidia.com/gpu": "gpu"}
GPU_MODEL_LABEL = "gpu-model"
NODE_TYPE_LABEL = "node-type"
STRICT_FIFO, BEST_EFFORT_FIFO = "StrictFIFO", "BestEffortFIFO"
DEFAULT_PRIORITIES = {"inference": 300, "training": 200, "batch": 100}
PLACEMENTS = ("best_fit", "binpack", "spread", "packing", "fgd", "ours", "random")
DEFAULT_FLAVOR = DEFAULT_QUEUE = "default"


class ConfigError(ValueError):
    """A bad configuration; the message starts with the path of the bad field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass(frozen=True)
class Flavor:
    name: str
    node_labels: Mapping[str, str] = field(default_factory=dict)

    def matches(self, node: Node) -> bool:
        for key, value in self.node_labels.items():
            have = node.gpu_model if key == GPU_MODEL_LABEL else node.labels.get(key)
            if have != value:
                return False
        return True


@dataclass(frozen=True)
class Quota:
    """Of one resource of one flavor in one queue (units as RESOURCES)."""

    nominal: int
    borrowing_limit: Optional[int] = None  # None: as much as the cohort lends
    lending_limit: Optional[int] = None  # None: all of the unused nominal quota

    @property
    def lendable(self) -> int:
        return self.nominal if self.lending_limit is None else min(self.lending_limit, self.nominal)


@dataclass(frozen=True)
class QueueFlavor:
    flavor: str
    quotas: Mapping[str, Quota]  # resource -> quota; a resource not listed is not limited


@dataclass(frozen=True)
class ClusterQueue:
    name: str
    flavors: Tuple[QueueFlavor, ...]
    cohort: Optional[str] = None
    strategy: str = BEST_EFFORT_FIFO

    def flavor(self, name: str) -> Optional[QueueFlavor]:
        return next((f for f in self.flavors if f.flavor == name), None)


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may add; its nodes carry the label node-type=<name>."""

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int = 0
    gpu_model: Optional[str] = None
    gpu_memory_mib: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    min: int = 0
    max: int = 0

    def node(self, name: str) -> Node:
        gpus = tuple(Gpu(self.gpu_model or "gpu", self.gpu_memory_mib) for _ in range(self.gpus))
        return Node(name, self.cpu_milli, self.memory_mib, gpus,
                    {**self.labels, NODE_TYPE_LABEL: self.name})

    @property
    def spot(self) -> bool:
        return self.labels.get(CAPACITY_TYPE) == "spot"


@dataclass(frozen=True)
class Timeouts:
    wait_for_ready_s: float = 300.0  # an admitted gang whose members have not all started by then is requeued
    requeue_base_s: float = 60.0  # back-off after a requeue: base * 2**(requeues - 1), capped
    requeue_max_s: float = 3600.0
    requeue_limit: int = 5  # requeues before the workload is deactivated (0: no limit)
    node_idle_s: float = 600.0  # an added node idle this long is released
    node_request_s: float = 900.0  # a node request not met by then is asked for again


@dataclass(frozen=True)
class Config:
    flavors: Mapping[str, Flavor]
    queues: Mapping[str, ClusterQueue]
    priorities: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    node_types: Mapping[str, NodeType] = field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    placement: str = "best_fit"

    @classmethod
    def default(cls, placement: str = "best_fit", **kwargs) -> "Config":
        return cls(flavors={DEFAULT_FLAVOR: Flavor(DEFAULT_FLAVOR)},
                   queues={DEFAULT_QUEUE: ClusterQueue(DEFAULT_QUEUE, (QueueFlavor(DEFAULT_FLAVOR, {}),))},
                   placement=placement, **kwargs)

    def cohort_members(self, cohort: Optional[str]) -> Tuple[str, ...]:
        if cohort is None:
            return ()
        return tuple(q.name for q in self.queues.values() if q.cohort == cohort)


def load(path: str) -> Config:
    """Read a configuration file (YAML)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("", "reading a scheduler configuration needs PyYAML: "
                              "pip install 'elastic-run[ray]'") from None
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{path} is not valid YAML{where}") from None
    return parse(raw if raw is not None else {})


# ---- parsing ----------------------------------------------------------------------------------

_SUFFIXES = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50,
             "k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15}


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(path, f"must be a number >= 0, got {value!r}")
    return value


def quantity(path: str, resource: str, value: Any) -> int:
    """A Kubernetes-style quantity in the scheduler's units (millicores, MiB, milli-GPUs)."""
    if resource == "cpu":
        if isinstance(value, str) and re.fullmatch(r"\d+m", value.strip()):
            return int(value.strip()[:-1])
        if isinstance(value, str):
            value = _parse_float(path, value, "a CPU count such as 4, 0.5 or 500m")
        return int(round(_number(path, value) * 1000))
    if resource == "gpu":
        if isinstance(value, str):
            value = _parse_float(path, value, "a GPU count such as 2 or 0.5")
        return int(round(_number(path, value) * GPU_MILLI))
    # memory
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]i|[kKMGTP])?\s*", value)
        if not m:
            raise ConfigError(path, f"must be a memory size such as 512Mi or 80Gi, got {value!r}")
        return int(float(m.group(1)) * _SUFFIXES.get(m.group(2) or "", 1) // 2 ** 20)
    return int(_number(path, value) // 2 ** 20)


def _parse_float(path: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(path, f"must be {what}, got {text!r}") from None


def _mapping(path: str, value: Any, allowed: Tuple[str, ...], required: Tuple[str, ...] = ()) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}" if path else str(key),
                              f"unknown field; expected one of {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise ConfigError(f"{path}.{key}" if path else key, "is required")
    return value


def _list(path: str, value: Any) -> List:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list, got {type(value).__name__}")
    return value


def _name(path: str, value: Any, seen: Dict[str, str]) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ConfigError(path, f"must be a name of letters, digits, '.', '_' or '-', got {value!r}")
    if value in seen:
        raise ConfigError(path, f"{value!r} is already defined at {seen[value]}")
    seen[value] = path
    return value


def _labels(path: str, value: Any) -> Dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise ConfigError(path, "must be a mapping of label names to string values")
    return dict(value)


def _count(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(path, f"must be a whole number >= 0, got {value!r}")
    return value


def parse(raw: Any) -> Config:
    """Build a Config from the parsed YAML (plain dicts and lists)."""
    top = _mapping("", raw, ("resourceFlavors", "clusterQueues", "cohorts", "priorityClasses",
                             "nodeTypes", "timeouts", "placement"))
    flavors: Dict[str, Flavor] = {}
    seen: Dict[str, str] = {}
    for i, item in enumerate(_list("resourceFlavors", top.get("resourceFlavors"))):
        path = f"resourceFlavors[{i}]"
        item = _mapping(path, item, ("name", "nodeLabels"), ("name",))
        name = _name(f"{path}.name", item["name"], seen)
        flavors[name] = Flavor(name, _labels(f"{path}.nodeLabels", item.get("nodeLabels")))
    if not flavors:
        flavors[DEFAULT_FLAVOR] = Flavor(DEFAULT_FLAVOR)

    cohorts: Dict[str, str] = {}
    for i, item in enumerate(_list("cohorts", top.get("cohorts"))):
        item = _mapping(f"cohorts[{i}]", item, ("name",), ("name",))
        _name(f"cohorts[{i}].name", item["name"], cohorts)

    queues: Dict[str, ClusterQueue] = {}
    seen = {}
    for i, item in enumerate(_list("clusterQueues", top.get("clusterQueues"))):
        path = f"clusterQueues[{i}]"
        item = _mapping(path, item, ("name", "cohort", "queueingStrategy", "flavors"), ("name",))
        name = _name(f"{path}.name", item["name"], seen)
        cohort = item.get("cohort")
        if cohort is not None and not isinstance(cohort, str):
            raise ConfigError(f"{path}.cohort", f"must be a cohort name, got {cohort!r}")
        if cohort is not None and cohorts and cohort not in cohorts:
            raise ConfigError(f"{path}.cohort", f"unknown cohort {cohort!r}; the cohorts section "
                                                f"defines {', '.join(sorted(cohorts))}")
        strategy = item.get("queueingStrategy", BEST_EFFORT_FIFO)
        if strategy not in (STRICT_FIFO, BEST_EFFORT_FIFO):
            raise ConfigError(f"{path}.queueingStrategy",
                              f"must be {STRICT_FIFO} or {BEST_EFFORT_FIFO}, got {strategy!r}")
        qflavors = []
        used: Dict[str, str] = {}
        for j, fl in enumerate(_list(f"{path}.flavors", item.get("flavors"))):
            fpath = f"{path}.flavors[{j}]"
            fl = _mapping(fpath, fl, ("name", "resources"), ("name",))
            fname = fl["name"]
            if fname not in flavors:
                raise ConfigError(f"{fpath}.name", f"unknown resource flavor {fname!r}; defined: "
                                                   f"{', '.join(flavors)}")
            _name(f"{fpath}.name", fname, used)
            quotas = {}
            resources = _mapping(f"{fpath}.resources", fl.get("resources") or {},
                                 RESOURCES + tuple(RESOURCE_ALIASES))
            for rname, spec in resources.items():
                rpath = f"{fpath}.resources.{rname}"
                resource = RESOURCE_ALIASES.get(rname, rname)
                if not isinstance(spec, Mapping):
                    spec = {"nominalQuota": spec}
                spec = _mapping(rpath, spec, ("nominalQuota", "borrowingLimit", "lendingLimit"),
                                ("nominalQuota",))
                nominal = quantity(f"{rpath}.nominalQuota", resource, spec["nominalQuota"])
                borrow = lend = None
                if spec.get("borrowingLimit") is not None:
                    if cohort is None:
                        raise ConfigError(f"{rpath}.borrowingLimit",
                                          "a queue outside a cohort has nobody to borrow from; "
                                          "set the queue's cohort or remove the limit")
                    borrow = quantity(f"{rpath}.borrowingLimit", resource, spec["borrowingLimit"])
                if spec.get("lendingLimit") is not None:
                    lend = quantity(f"{rpath}.lendingLimit", resource, spec["lendingLimit"])
                    if lend > nominal:
                        raise ConfigError(f"{rpath}.lendingLimit",
                                          "must not exceed nominalQuota (a queue lends only its own quota)")
                quotas[resource] = Quota(nominal, borrow, lend)
            qflavors.append(QueueFlavor(fname, quotas))
        if not qflavors:
            raise ConfigError(f"{path}.flavors", "must list at least one resource flavor")
        queues[name] = ClusterQueue(name, tuple(qflavors), cohort, strategy)
    if not queues:
        queues[DEFAULT_QUEUE] = ClusterQueue(
            DEFAULT_QUEUE, tuple(QueueFlavor(f, {}) for f in flavors))

    priorities: Dict[str, int] = {}
    seen = {}
    entries = _list("priorityClasses", top.get("priorityClasses"))
    for i, item in enumerate(entries):
        path = f"priorityClasses[{i}]"
        item = _mapping(path, item, ("name", "value"), ("name", "value"))
        name = _name(f"{path}.name", item["name"], seen)
        value = item["value"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}.value", f"must be a whole number, got {value!r}")
        priorities[name] = value
    priorities = {**DEFAULT_PRIORITIES, **priorities}

    node_types: Dict[str, NodeType] = {}
    seen = {}
    for i, item in enumerate(_list("nodeTypes", top.get("nodeTypes"))):
        path = f"nodeTypes[{i}]"
        item = _mapping(path, item, ("name", "cpu", "memory", "gpus", "gpuModel", "gpuMemory",
                                     "labels", "min", "max"), ("name", "cpu", "memory", "max"))
        name = _name(f"{path}.name", item["name"], seen)
        gpus = _count(f"{path}.gpus", item.get("gpus", 0))
        model = item.get("gpuModel")
        if gpus and not isinstance(model, str):
            raise ConfigError(f"{path}.gpuModel", "is required when the node type has GPUs")
        low, high = _count(f"{path}.min", item.get("min", 0)), _count(f"{path}.max", item["max"])
        if low > high:
            raise ConfigError(f"{path}.min", f"min {low} is above max {high}")
        node_types[name] = NodeType(
            name, quantity(f"{path}.cpu", "cpu", item["cpu"]),
            quantity(f"{path}.memory", "memory", item["memory"]), gpus, model,
            quantity(f"{path}.gpuMemory", "memory", item.get("gpuMemory", 0)),
            _labels(f"{path}.labels", item.get("labels")), low, high)

    raw_timeouts = _mapping("timeouts", top.get("timeouts") or {}, (
        "waitForReadySeconds", "requeueBaseSeconds", "requeueMaxSeconds", "requeueLimit",
        "nodeIdleSeconds", "nodeRequestSeconds"))
    names = {"waitForReadySeconds": "wait_for_ready_s", "requeueBaseSeconds": "requeue_base_s",
             "requeueMaxSeconds": "requeue_max_s", "nodeIdleSeconds": "node_idle_s",
             "nodeRequestSeconds": "node_request_s"}
    values: Dict[str, Any] = {names[k]: float(_number(f"timeouts.{k}", v))
                              for k, v in raw_timeouts.items() if k in names}
    if "requeueLimit" in raw_timeouts:
        values["requeue_limit"] = _count("timeouts.requeueLimit", raw_timeouts["requeueLimit"])
    placement = top.get("placement", "best_fit")
    if placement not in PLACEMENTS:
        raise ConfigError("placement", f"must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    return Config(flavors, queues, priorities, node_types, Timeouts(**values), placement)
