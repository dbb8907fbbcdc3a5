"""The shared pool's records in etcd, under their own prefix (`/elastic-ray/`, beside the training
jobs' `/elastic/<job>/`, so the job client does not list them as jobs):

    /elastic-ray/config              the controller's queue configuration (YAML text)
    /elastic-ray/inventory           the nodes the controller last saw (for checks at submission)
    /elastic-ray/controller          the controller's heartbeat: {"pid", "time"}
    /elastic-ray/workloads/<name>    what was submitted (spec.Submission), written once
    /elastic-ray/records/<name>      what the controller made of it (Record)
    /elastic-ray/stop/<name>         a request to stop it
    /elastic-ray/replicas/<name>     an endpoint's replica count, as its policy asks for it:
                                     {"replicas", "time"} (written by `serving`)

A restarted controller reads the workloads and records back and continues from them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from rendezvous.connect import EtcdSecurity, connect

from .scheduler import Node
from .scheduler.model import Gpu
from .spec import Submission

PREFIX = "/elastic-ray"
PENDING, RUNNING, FINISHED, FAILED, STOPPED = "pending", "running", "finished", "failed", "stopped"
ENDED = (FINISHED, FAILED, STOPPED)
HISTORY_KEPT = 30


@dataclass
class Record:
    """Where a workload stands, as the controller last wrote it."""

    state: str = PENDING
    reason: str = ""  # pending: why it waits; ended: how it ended
    flavor: str = ""
    members: Tuple[dict, ...] = ()  # admitted: {"id", "node", "gpus", "joined_at"}, rank order
    next_member: int = 0
    admitted_at: float = 0.0
    ready: bool = False  # every member started
    restarts: int = 0  # gang: started again after a failure this often
    attempt: int = 0  # train: admissions after a preemption stopped it
    exit_code: Optional[int] = None
    ended_at: Optional[float] = None
    logs: Dict[str, str] = field(default_factory=dict)  # member id -> the end of its output
    history: List[str] = field(default_factory=list)  # "<time> <what happened>", oldest first

    def note(self, now: float, what: str) -> None:
        self.history = (self.history + [f"{now:.3f} {what}"])[-HISTORY_KEPT:]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "Record":
        raw = json.loads(text)
        raw["members"] = tuple(raw.get("members", ()))
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


class PoolStore:
    def __init__(self, endpoint: str, timeout: float = 5.0,
                 security: Optional[EtcdSecurity] = None):
        self.endpoint = endpoint
        self._client = connect(endpoint, timeout=timeout, security=security)

    def close(self) -> None:
        self._client.close()

    def _get(self, key: str) -> Optional[bytes]:
        value, _ = self._client.get(f"{PREFIX}/{key}")
        return value

    def _prefix(self, sub: str) -> Dict[str, bytes]:
        base = f"{PREFIX}/{sub}/"
        return {meta.key.decode()[len(base):]: value
                for value, meta in self._client.get_prefix(base)}

    # -- the controller's side -------------------------------------------------------------
    def publish(self, config_text: str, nodes: List[Node], now: float, pid: int) -> None:
        self._client.put(f"{PREFIX}/config", config_text)
        self.put_inventory(nodes)
        self.heartbeat(now, pid)

    def put_inventory(self, nodes: List[Node]) -> None:
        self._client.put(f"{PREFIX}/inventory", json.dumps([asdict(n) for n in nodes]))

    def heartbeat(self, now: float, pid: int) -> None:
        self._client.put(f"{PREFIX}/controller", json.dumps({"pid": pid, "time": now}))

    def put_record(self, name: str, record: Record) -> None:
        self._client.put(f"{PREFIX}/records/{name}", record.to_json())

    def watch(self, callback) -> int:
        """Call `callback(event)` on every write under the prefix; returns the watch id."""
        return self._client.add_watch_prefix_callback(f"{PREFIX}/", callback)

    def cancel_watch(self, watch_id: int) -> None:
        self._client.cancel_watch(watch_id)

    def clear_stop(self, name: str) -> None:
        self._client.delete(f"{PREFIX}/stop/{name}")

    # -- anyone's --------------------------------------------------------------------------
    def config_text(self) -> Optional[str]:
        value = self._get("config")
        return None if value is None else value.decode()

    def inventory(self) -> List[Node]:
        value = self._get("inventory")
        out = []
        for raw in json.loads(value) if value else []:
            raw["gpus"] = tuple(Gpu(**g) for g in raw.get("gpus", ()))
            out.append(Node(**raw))
        return out

    def controller(self) -> Optional[dict]:
        value = self._get("controller")
        return json.loads(value) if value else None

    def add_workload(self, sub: Submission) -> bool:
        """Write a submission unless one of that name exists; True if this call wrote it."""
        key = f"{PREFIX}/workloads/{sub.name}"
        tx = self._client.transactions
        ok, _ = self._client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, sub.to_json()),
                     tx.put(f"{PREFIX}/records/{sub.name}",
                            Record(reason="submitted; the controller has not seen it yet"
                                   ).to_json())],
            failure=[])
        return ok

    def workloads(self) -> Dict[str, Submission]:
        return {name: Submission.from_json(v) for name, v in self._prefix("workloads").items()}

    def records(self) -> Dict[str, Record]:
        return {name: Record.from_json(v) for name, v in self._prefix("records").items()}

    def request_stop(self, name: str, reason: str) -> None:
        self._client.put(f"{PREFIX}/stop/{name}", json.dumps({"reason": reason,
                                                              "time": time.time()}))

    def stops(self) -> Dict[str, dict]:
        return {name: json.loads(v) for name, v in self._prefix("stop").items()}

    def ask_replicas(self, name: str, replicas: int) -> None:
        self._client.put(f"{PREFIX}/replicas/{name}",
                         json.dumps({"replicas": replicas, "time": time.time()}))

    def replicas(self) -> Dict[str, int]:
        return {name: int(json.loads(v)["replicas"])
                for name, v in self._prefix("replicas").items()}

    def record(self, name: str) -> Optional[Record]:
        value = self._get(f"records/{name}")
        return None if value is None else Record.from_json(value)

    def delete_workload(self, name: str) -> None:
        for sub in ("workloads", "records", "stop", "replicas"):
            self._client.delete(f"{PREFIX}/{sub}/{name}")
