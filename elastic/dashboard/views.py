"""What the dashboard's JSON API returns, built from what the job client and the pool's client
read (pure: no etcd, no Ray, no clock of its own).

- `job_row(status)`: one job in the list.
- `job_detail(status, events)`: a job's members, its world-size timeline (one entry per round,
  with the round's cause and, when the leader recorded it, which nodes left), recent events.
- `pool_view(...)`: queues with their pending workloads and why they wait, the pool's
  allocation by resource, endpoints with replicas and latency.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

ROUND_EVENTS = ("rendezvous", "rescale", "waiting")
RECENT = 50


def job_row(status) -> dict:
    """One job of `JobClient.status` (a JobStatus) for the list."""
    rnd = status.round
    spec = status.spec
    return {"job": status.job, "state": status.state,
            "world_size": rnd.world_size if rnd is not None and rnd.active else 0,
            "round": rnd.number if rnd is not None else None,
            "cause": rnd.cause if rnd is not None else None,
            "nodes": {"active": sum(1 for n in status.nodes if n.state == "active"),
                      "spare": sum(1 for n in status.nodes if n.state == "spare"),
                      "released": sum(1 for n in status.nodes if n.state == "released")},
            "size": {"min": spec.min_nodes, "max": spec.max_nodes, "desired": spec.target},
            "created_at": spec.created_at,
            "outcome": status.outcome.status if status.outcome is not None else None}


def members(status) -> List[dict]:
    out = []
    for n in status.nodes:
        ranks = (f"{n.rank_offset}..{n.rank_offset + n.slots - 1}"
                 if n.rank_offset is not None else None)
        out.append({"node_id": n.node_id, "host": n.host, "state": n.state, "slots": n.slots,
                    "ranks": ranks, "labels": dict(n.labels), "joined_at": n.joined_at,
                    "metrics": f"http://{n.health_addr}/metrics" if n.health_addr else None})
    return out


def timeline(events: Iterable[dict], current=None) -> List[dict]:
    """The job's rounds, oldest first: when each was first seen (published by the leader, or
    reached a node), its world size, its cause, the longest rescale any node reported for it,
    and the nodes the leader saw leave. `current` (a RoundStatus) is added when the history does
    not have it (yet)."""
    rounds: Dict[int, dict] = {}
    left: Dict[int, List[str]] = {}
    first_seen: Dict[int, float] = {}
    for e in events:
        if e.get("round") is not None and e.get("time") is not None:
            first_seen[e["round"]] = min(first_seen.get(e["round"], e["time"]), e["time"])
    for e in events:
        number = e.get("round")
        if number is None:
            continue
        if e.get("event") in ROUND_EVENTS:
            entry = rounds.setdefault(number, {
                "round": number, "time": e.get("time"), "world_size": e.get("world_size"),
                "cause": e.get("cause"), "members": e.get("members") or [], "duration_s": None})
            if e.get("duration_s") is not None:
                entry["duration_s"] = max(entry["duration_s"] or 0.0, e["duration_s"])
        elif e.get("event") == "node_left" and e.get("nodes"):
            for nid in e["nodes"]:
                if nid not in left.setdefault(number, []):
                    left[number].append(nid)
    if current is not None and current.number not in rounds:
        rounds[current.number] = {"round": current.number, "time": None,
                                  "world_size": current.world_size, "cause": current.cause,
                                  "members": list(current.members), "duration_s": None}
    out = []
    for number in sorted(rounds):
        entry = dict(rounds[number])
        if number in first_seen:
            entry["time"] = first_seen[number]
        entry["left"] = left.get(number, [])
        out.append(entry)
    return out


def job_detail(status, events: Sequence[dict]) -> dict:
    detail = job_row(status)
    detail.update({
        "endpoint": status.endpoint, "members": members(status),
        "timeline": timeline(events, status.round),
        "leaving_costs": status.leaving_costs,
        "events": list(events)[-RECENT:],
        "outcome_detail": ({"status": status.outcome.status, "reason": status.outcome.reason,
                            "exit_code": status.outcome.exit_code}
                           if status.outcome is not None else None)})
    return detail


def _pending_reasons(workloads: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for w in workloads:
        if w["state"] == "pending":
            out.setdefault(w["queue"], []).append(
                {"name": w["name"], "kind": w["kind"], "reason": w["reason"],
                 "submitted_at": w["submitted_at"]})
    return out


def allocation(inventory: Sequence, queues: Sequence[dict]) -> Dict[str, dict]:
    """The pool's capacity (its nodes as the controller last saw them) and what is allocated
    (every queue's running workloads), per resource: cpu in cores, memory in MiB, gpu in GPUs."""
    capacity = {"cpu": sum(n.cpu_milli for n in inventory) / 1000,
                "memory_mib": float(sum(n.memory_mib for n in inventory)),
                "gpu": float(sum(len(n.gpus) for n in inventory))}
    used = {r: sum(q["used"][r] for q in queues) for r in capacity}
    return {r: {"capacity": capacity[r], "allocated": used[r]} for r in capacity}


def endpoint_rows(workloads: Sequence[dict], asks: Mapping[str, int],
                  replicas: Optional[Mapping[str, Mapping[str, int]]] = None,
                  traffic: Optional[Mapping[str, dict]] = None) -> List[dict]:
    """Endpoints of the pool (granted, asked) and, with Ray, every endpoint Serve runs
    (replicas running and starting, requests and latency)."""
    rows: Dict[str, dict] = {}
    for w in workloads:
        if w["kind"] != "endpoint":
            continue
        granted = len(w["members"]) if w["state"] == "running" else 0
        rows[w["name"]] = {"name": w["name"], "queue": w["queue"], "state": w["state"],
                           "reason": w["reason"], "granted": granted, "asked": asks.get(w["name"]),
                           "in_pool": True}
    for name in sorted(set(replicas or {}) | set(traffic or {})):
        rows.setdefault(name, {"name": name, "queue": None, "state": "running", "reason": "",
                               "granted": None, "asked": None, "in_pool": False})
    for name, row in rows.items():
        r = (replicas or {}).get(name, {})
        row["replicas"] = {"running": r.get("running", 0), "starting": r.get("starting", 0)} \
            if replicas is not None else None
        row["traffic"] = (traffic or {}).get(name)
    return [rows[n] for n in sorted(rows)]


def pool_view(workloads: Sequence[dict], queues: Sequence[dict], inventory: Sequence,
              asks: Mapping[str, int], controller: Optional[dict], now: float,
              replicas=None, traffic=None) -> dict:
    """The pool from its records in etcd (PoolClient.list, queues, store.inventory, replicas
    asked), with Serve's replicas and traffic when Ray is read too."""
    pending = _pending_reasons(workloads)
    return {
        "controller": ({"pid": controller.get("pid"), "age_s": round(now - controller["time"], 1)}
                       if controller else None),
        "nodes": len(inventory),
        "allocation": allocation(inventory, queues),
        "queues": [{**q, "pending_workloads": pending.get(q["queue"], [])} for q in queues],
        "workloads": [{k: w[k] for k in ("name", "kind", "queue", "state", "reason", "size")}
                      for w in workloads],
        "endpoints": endpoint_rows(workloads, asks, replicas, traffic),
    }
