"""An endpoint as a user declares it, checked before anything contacts Ray. Pure, except that
`check_target` imports the user's module to find the class or function it names.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .policy import PolicyConfig, PolicyError

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class SpecError(ValueError):
    """A bad endpoint spec; the message says what to change."""


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    target: str  # "module:Attr", a class (instantiated once per replica) or a function
    min_replicas: int = 1
    max_replicas: int = 4
    target_concurrency: float = 4.0  # concurrent requests per replica the policy aims for
    max_concurrency: int = 8  # per replica; more wait at the router
    max_queued: int = 64  # waiting at the router beyond that: 503 with Retry-After
    timeout_s: float = 30.0
    slo_p95_ms: Optional[float] = None
    idle_s: float = 300.0  # before scale-to-zero, when min_replicas is 0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    priority: str = "inference"
    cpus: float = 1.0  # per replica
    memory_mib: int = 0
    gpus: float = 0.0
    version: str = "1"
    pool: Optional[str] = None  # the shared pool's etcd (HOST:PORT): replicas only as granted
    queue: str = "default"  # the pool's queue it is submitted to

    def policy(self) -> PolicyConfig:
        return PolicyConfig(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                            target=self.target_concurrency, idle_s=self.idle_s,
                            stable_window_s=self.stable_window_s,
                            panic_window_s=self.panic_window_s,
                            slo_p95_s=None if self.slo_p95_ms is None else self.slo_p95_ms / 1000)

    def check(self) -> None:
        """SpecError naming the field, for anything that cannot work."""
        where = f"endpoint {self.name!r}"
        if not _NAME.match(self.name or ""):
            raise SpecError(f"{where}: --name is 1-63 lower-case letters, digits and '-'")
        if self.target.count(":") != 1 or not all(self.target.split(":")):
            raise SpecError(f"{where}: the model is MODULE:NAME (e.g. examples.serve_model:Model),"
                            f" got {self.target!r}")
        try:
            self.policy().check()
        except PolicyError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if self.max_concurrency < 1 or self.max_queued < 0:
            raise SpecError(f"{where}: --max-concurrency must be >= 1 and --max-queued >= 0")
        if self.timeout_s <= 0:
            raise SpecError(f"{where}: --timeout must be > 0, got {self.timeout_s:g}")
        if self.cpus < 0 or self.memory_mib < 0 or self.gpus < 0:
            raise SpecError(f"{where}: --cpus, --memory and --gpus must not be negative")
        if self.pool is not None and self.gpus != int(self.gpus):
            raise SpecError(f"{where}: in the shared pool (--rdzv-endpoint) --gpus is a whole "
                            f"number, got {self.gpus:g}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "EndpointSpec":
        raw = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def check_target(target: str, path: Optional[str] = None) -> Any:
    """Import MODULE and return NAME from it; SpecError if either is missing. `path` (the
    working directory) goes first on sys.path, as it will on the replicas."""
    module_name, _, attr = target.partition(":")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(f"cannot import {module_name!r} ({exc}); run from the directory that "
                        "holds it, or give --working-dir") from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise SpecError(f"{module_name!r} has no class or function {attr!r}")
    return obj
