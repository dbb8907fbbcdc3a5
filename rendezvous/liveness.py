"""Is a node's agent alive? Each agent answers GET /health with its node id
(launcher.health.HealthServer); this is the question, asked by peers and by the job client.

A node whose agent was killed stops answering at once (connection refused on a live host), long
before its lease TTL runs out. A node that does not answer in time is only suspect.
"""
from __future__ import annotations

import http.client
import json
import socket
from typing import Dict, Iterable, Tuple

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


class Prober:
    """Probes that keep one HTTP/1.1 connection per peer open from one probe to the next: no TCP
    set-up and no server thread per probe, which is what probing costs at a thousand nodes. A
    kept connection that broke (the peer closed it, or died) is replaced by a new one for the
    same probe, which then tells a dead agent (refused) from a dropped connection."""

    def __init__(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        self._timeout = timeout
        self._kept: Dict[str, Tuple[str, http.client.HTTPConnection]] = {}

    def probe(self, addr: str, node_id: str) -> str:
        kept = self._kept.pop(node_id, None)
        if kept is not None:
            kept_addr, conn = kept
            if kept_addr == addr:
                result = _ask(conn, node_id, fresh=False)
                if result is not None:
                    self._keep(node_id, addr, conn, result)
                    return result
            conn.close()
        host, port = _split(addr)
        conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        result = _ask(conn, node_id, fresh=True)
        self._keep(node_id, addr, conn, result)
        return result

    def _keep(self, node_id: str, addr: str, conn: http.client.HTTPConnection,
              result: str) -> None:
        if result == ALIVE:
            self._kept[node_id] = (addr, conn)
        else:
            conn.close()

    def retain(self, node_ids: Iterable[str]) -> None:
        """Close the connections to every peer but these."""
        keep = set(node_ids)
        for node_id in [n for n in self._kept if n not in keep]:
            self._kept.pop(node_id)[1].close()

    def close(self) -> None:
        self.retain(())


def _ask(conn: http.client.HTTPConnection, node_id: str, fresh: bool):
    """One GET /health on conn; None when a kept connection broke (ask again on a new one)."""
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
            http.client.RemoteDisconnected) as exc:
        if not fresh:
            return None
        return DEAD if not isinstance(exc, http.client.RemoteDisconnected) else SUSPECT
    except (socket.timeout, OSError, http.client.HTTPException, ValueError):
        return SUSPECT
    return ALIVE if body.get("node_id") == node_id else DEAD
