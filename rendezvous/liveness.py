"""Is a node's agent alive? Each agent answers GET /health with its node id
(launcher.health.HealthServer); this is the question, asked by peers and by the job client.

A node whose agent was killed stops answering at once (connection refused on a live host), long
before its lease TTL runs out. A node that does not answer in time is only suspect.
"""
from __future__ import annotations

import http.client
import json
from typing import Tuple

PROBE_TIMEOUT_S = 1.0

ALIVE, DEAD, SUSPECT = "alive", "dead", "suspect"


def _split(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def probe(addr: str, node_id: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """ALIVE if the agent of `node_id` answers at addr, DEAD if nothing listens there (or another
    node does: the port was reused), SUSPECT if it did not answer in time."""
    host, port = _split(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read() or b"{}")
    except (ConnectionRefusedError, ConnectionResetError):
        return DEAD
    except (OSError, http.client.HTTPException, ValueError):
        return SUSPECT
    finally:
        conn.close()
    return ALIVE if body.get("node_id") == node_id else DEAD
