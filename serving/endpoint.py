"""Endpoints on Ray Serve: one Serve application per endpoint, served at
`http://127.0.0.1:PORT/NAME` (JSON in, JSON out), its replica count set by this project's policy
(`serving.policy`) bound as Serve's custom autoscaling policy.

Serve calls the policy every 0.1 s in its controller; Serve's own delays are set to 0 and its
metrics interval short, since Serve applies its delays to custom policies too and pushes metrics
every 10 s by default. Ray is imported only inside functions.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
import json
from dataclasses import asdict, replace
from typing import Any, Dict, Optional, Tuple

from .policy import PolicyConfig, PolicyState, Sample, decide, observe
from .spec import EndpointSpec, SpecError, check_target

NAMESPACE = "serving"
METRICS_INTERVAL_S = 0.5
RETRY_AFTER_S = 1  # told to a client turned away because the router's queue is full


class Replica:
    """One replica: the user's class (built once) or function, called with the request's JSON
    body; what it returns goes back as JSON. Each request's latency and outcome is counted and
    published for the metrics (`integrations.ray.endpoint_stats`)."""

    def __init__(self, target: str, path: Optional[str], version: str = "1",
                 concurrency: int = 8):
        self.version = version
        obj = check_target(target, path)
        self.model = obj() if inspect.isclass(obj) else obj
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model")
        self._stats = _recorder()

    async def __call__(self, request) -> Any:
        started = time.perf_counter()
        ok = False
        try:
            result = await self._call(await request.json())
            ok = True
            return result
        finally:
            if self._stats is not None:
                self._stats.observe(time.perf_counter() - started, ok)

    async def _call(self, body) -> Any:
        if inspect.iscoroutinefunction(self.model) or \
                inspect.iscoroutinefunction(getattr(self.model, "__call__", None)):
            return await self.model(body)
        # A plain model runs on a thread: on the replica's event loop it would serve one request
        # at a time, whatever --max-concurrency says.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.model, body)


def _recorder():
    """This replica's request counter, published under its endpoint (the Serve application)
    and replica id; None outside a Serve replica."""
    from integrations.ray.endpoint_stats import Publisher, Recorder
    try:
        from ray import serve
        rid = serve.get_replica_context().replica_id
    except Exception:  # noqa: BLE001 (not in a replica: a test calling the class directly)
        return None
    recorder = Recorder(rid.deployment_id.app_name, rid.unique_id)
    Publisher(recorder)
    return recorder


class ServePolicy:
    """Serve's custom autoscaling policy: this project's policy over Serve's count of requests
    running and queued. Serve builds it once per deployment (with `policy_kwargs`) and calls it
    every tick in its controller, so the policy's state lives here."""

    def __init__(self, policy: Dict[str, Any], pool: Optional[Dict[str, str]] = None):
        self.cfg = PolicyConfig(**policy)
        self.state = PolicyState()
        self.reason = ""
        self.grant = None
        if pool is not None:  # in the shared pool: Serve runs what the pool grants of the ask
            from .pool import Grant
            self.grant = Grant(pool["etcd"], pool["name"])

    def __call__(self, ctx) -> Tuple[int, Dict[str, Any]]:
        now = ctx.current_time or time.time()
        self.state = observe(self.state, Sample(now, float(ctx.total_num_requests)), self.cfg)
        d = decide(self.state, now, ctx.current_num_replicas, self.cfg)
        self.state, self.reason = d.state, d.reason
        replicas = d.replicas if self.grant is None else self.grant(d.replicas)
        return replicas, {"reason": d.reason, "panic": d.panic, "wanted": d.replicas}


def deployment(spec: EndpointSpec, path: Optional[str]):
    """The Serve application of an endpoint (not yet run)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    actor = {"num_cpus": spec.cpus}
    if spec.gpus:
        actor["num_gpus"] = spec.gpus
    if spec.memory_mib:
        actor["memory"] = spec.memory_mib * 2**20
    kwargs: Dict[str, Any] = {"policy": asdict(spec.policy())}
    if spec.pool:
        kwargs["pool"] = {"etcd": spec.pool, "name": spec.name}
    # In the pool Serve's own floor would start replicas nobody granted: the policy keeps the
    # min instead (it asks for at least min, and Serve runs what is granted of that).
    floor = 0 if spec.pool else spec.min_replicas
    autoscaling = AutoscalingConfig(
        min_replicas=floor, max_replicas=spec.max_replicas,
        initial_replicas=floor,
        upscale_delay_s=0, downscale_delay_s=0, downscale_to_zero_delay_s=0,
        metrics_interval_s=METRICS_INTERVAL_S, look_back_period_s=2 * METRICS_INTERVAL_S,
        policy=AutoscalingPolicy(policy_function="serving.endpoint:ServePolicy",
                                 policy_kwargs=kwargs))
    # Serve versions a deployment by its code and config; spec.version goes into the replicas'
    # arguments, so a new version is a new config and rolls out.
    dep = serve.deployment(Replica, name=spec.name, max_ongoing_requests=spec.max_concurrency,
                           max_queued_requests=spec.max_queued, ray_actor_options=actor,
                           backpressure_config={"status_code": 503,
                                                "retry_after_s": RETRY_AFTER_S},
                           autoscaling_config=autoscaling)
    return dep.bind(spec.target, path, spec.version, spec.max_concurrency)


def connect(address: Optional[str], http_port: int, timeout_s: float) -> None:
    import ray
    from ray import serve
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=False)
    # One HTTP proxy, on the head node: the endpoint's URL is the head's (proxies on every node
    # would also collide on one port when a test cluster's nodes share 127.0.0.1).
    serve.start(proxy_location="HeadOnly",
                http_options={"host": "127.0.0.1", "port": http_port,
                              "request_timeout_s": timeout_s})


def deploy(spec: EndpointSpec, address: Optional[str] = None, http_port: int = 8000,
           path: Optional[str] = None) -> str:
    """Run (or update: a new --version rolls out, new replicas ready before old ones go) the
    endpoint; its URL."""
    from ray import serve
    spec.check()
    check_target(spec.target, path)
    registered = False
    if spec.pool:  # the pool refuses a bad queue or size before Serve changes anything
        from .pool import register
        registered = register(spec)
    try:
        connect(address, http_port, spec.timeout_s)
        _check_same_pool(spec)
        serve.run(deployment(spec, path), name=spec.name, route_prefix=f"/{spec.name}",
                  blocking=False)
    except BaseException:
        if registered:  # nothing of a failed deploy stays in the pool
            from .pool import unregister
            unregister(spec.pool, spec.name)
        raise
    _save(spec, path)
    return f"http://127.0.0.1:{http_port}/{spec.name}"


def _check_same_pool(spec: EndpointSpec) -> None:
    """A running endpoint stays in the pool it was deployed to (or out of any)."""
    try:
        old, _ = load(spec.name)
    except KeyError:
        return
    if old.pool != spec.pool:
        where = f"in the pool at {old.pool}" if old.pool else "outside any pool"
        flag = f"--rdzv-endpoint {old.pool}" if old.pool else "no --rdzv-endpoint"
        raise SpecError(f"endpoint {spec.name!r} runs {where}; deploy it with {flag}, or "
                        "`python -m serving delete` it first")


def _save(spec: EndpointSpec, path: Optional[str]) -> None:
    """The spec, kept in the cluster (Ray's key-value store) for `scale` and `update`."""
    from ray.experimental import internal_kv
    internal_kv._internal_kv_put(f"endpoint/{spec.name}",
                                 json.dumps({"spec": spec.to_json(), "path": path}),
                                 namespace=NAMESPACE)


def load(name: str) -> Tuple[EndpointSpec, Optional[str]]:
    from ray.experimental import internal_kv
    raw = internal_kv._internal_kv_get(f"endpoint/{name}", namespace=NAMESPACE)
    if raw is None:
        raise KeyError(f"no endpoint {name!r} deployed by `python -m serving` on this cluster")
    kept = json.loads(raw)
    return EndpointSpec.from_json(kept["spec"]), kept["path"]


def scale(name: str, min_replicas: Optional[int] = None, max_replicas: Optional[int] = None,
          http_port: int = 8000) -> EndpointSpec:
    """New bounds for the running endpoint (the policy keeps choosing within them)."""
    spec, path = load(name)
    spec = replace(spec, min_replicas=spec.min_replicas if min_replicas is None else min_replicas,
                   max_replicas=spec.max_replicas if max_replicas is None else max_replicas)
    deploy(spec, http_port=http_port, path=path)
    return spec


def update(name: str, version: Optional[str] = None, target: Optional[str] = None,
           http_port: int = 8000) -> EndpointSpec:
    """Roll out a new version (new replicas ready before the old ones drain)."""
    spec, path = load(name)
    new_version = version or (str(int(spec.version) + 1) if spec.version.isdigit()
                              else f"{spec.version}+1")
    spec = replace(spec, version=new_version, target=target or spec.target)
    deploy(spec, http_port=http_port, path=path)
    return spec


def status(name: str) -> Dict[str, Any]:
    from ray import serve
    apps = serve.status().applications
    if name not in apps:
        raise KeyError(f"no endpoint {name!r} (endpoints: {', '.join(sorted(apps)) or 'none'})")
    app = apps[name]
    dep = app.deployments.get(name)
    replicas = dict(dep.replica_states) if dep is not None else {}
    out = {"name": name, "status": str(app.status), "message": app.message,
           "replicas": {str(k): v for k, v in replicas.items()},
           "running": replicas.get("RUNNING", 0)}
    try:
        spec, _ = load(name)
    except KeyError:
        spec = None
    if spec is not None and spec.pool:
        from .pool import describe
        out["pool"] = describe(spec.pool, name)
    return out


def delete(name: str) -> None:
    from ray import serve
    from ray.experimental import internal_kv
    try:
        spec, _ = load(name)
    except KeyError:
        spec = None
    serve.delete(name)
    from integrations.ray import endpoint_stats
    endpoint_stats.forget(name)
    if spec is not None and spec.pool:
        from .pool import unregister
        unregister(spec.pool, name)
    internal_kv._internal_kv_del(f"endpoint/{name}", namespace=NAMESPACE)
