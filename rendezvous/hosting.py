"""A job's etcd hosted by one of its own agents, for torchrun users whose command line names a
c10d or static rendezvous (an endpoint on one of the nodes, no etcd of their own).

The host starts an embedded etcd listening on the endpoint's address; the other agents connect
to it, waiting up to their connect timeout for the host to come up. Such a rendezvous ends with
its host, as torchrun's store does; `python -m rendezvous` runs one that outlives every node.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Optional, Set

import psutil

from .api import RendezvousConnectionError
from .connect import EtcdSecurity, format_endpoint, wait_for_etcd
from .embedded import EmbeddedEtcd

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # is somebody already serving the endpoint?
LINGER_POLL_S = 0.2


def local_addresses() -> Set[str]:
    """Every IP address of this machine's interfaces."""
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.split("%")[0])
    return found


def resolve(host: str) -> Set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def is_local(host: str) -> bool:
    """Whether `host` names this machine (a loopback address or one of its interfaces)."""
    addresses = resolve(host)
    mine = local_addresses()
    return any(a in mine or ipaddress.ip_address(a).is_loopback for a in addresses)


def _bind_address(host: str) -> str:
    mine = local_addresses()
    for address in sorted(resolve(host)):
        if address in mine or ipaddress.ip_address(address).is_loopback:
            return address
    # The name does not resolve to an interface of ours (a service name, a NAT address): listen
    # on every interface, as torchrun's store does.
    return "0.0.0.0"


def start_or_join(host: str, port: int, hosting: str, connect_timeout: float,
                  security: Optional[EtcdSecurity] = None) -> Optional[EmbeddedEtcd]:
    """Make sure an etcd serves host:port; return the one this process started, if any.

    hosting "host": start it here unless one already answers; "join": wait for the host;
    "auto": host it if `host` is this machine and nobody serves it yet, else wait.

    Raises:
        RendezvousConnectionError: no etcd answered within connect_timeout (joining), or the
            port is taken by something that is not etcd (hosting).
    """
    endpoint = format_endpoint(host, port)
    if hosting == "join" or (hosting == "auto" and not is_local(host)):
        _wait_for_host(endpoint, connect_timeout, security)
        return None
    try:
        wait_for_etcd(endpoint, PROBE_TIMEOUT_S, security)
        return None  # another agent on this machine hosts it already
    except RendezvousConnectionError:
        pass
    etcd = EmbeddedEtcd(host=_bind_address(host), port=port)
    try:
        etcd.start()
    except RendezvousConnectionError:
        # Taken between our probe and the bind: by another agent hosting it, or by something
        # else, which the wait below reports.
        _wait_for_host(endpoint, connect_timeout, security)
        return None
    log.info("this node hosts the job's rendezvous (etcd) at %s; the job cannot go on without "
             "this node (for a rendezvous that outlives every node, run `python -m rendezvous` "
             "and pass --rdzv-endpoint)", endpoint)
    return etcd


def _wait_for_host(endpoint: str, timeout: float,
                   security: Optional[EtcdSecurity] = None) -> None:
    log.info("waiting up to %.0f s for the node hosting the rendezvous at %s", timeout, endpoint)
    try:
        wait_for_etcd(endpoint, timeout, security)
    except RendezvousConnectionError as exc:
        raise RendezvousConnectionError(
            f"no rendezvous answered at {endpoint} within {timeout:g} s: start the node that "
            "hosts it (node rank 0, or the agent on the endpoint's host), or raise "
            "connect_timeout in --rdzv-conf") from exc.__cause__


def linger_for_others(store, node_id: str, timeout: float) -> None:
    """The hosting agent is done: give the other nodes up to `timeout` to read the outcome and
    leave before the etcd they use goes away with us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            others = [n for n in store.snapshot().nodes if n != node_id]
        except RendezvousConnectionError:
            return
        if not others:
            return
        time.sleep(LINGER_POLL_S)
