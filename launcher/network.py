"""Which network interface the workers' collectives use.

gloo picks its interface from the machine's host name unless told otherwise, and on Debian and
Ubuntu the host name resolves to a loopback address (127.0.1.1): peers on other hosts are then
given 127.0.0.1 to connect to, and a one-machine job listens on every interface. So the agent
names the interface that holds its own address (--local-addr, or the one that routes to the
rendezvous): `lo` for a job on loopback, the shared network's interface across hosts. A user's
own GLOO_SOCKET_IFNAME is kept.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Dict, Mapping, Optional

import psutil

ENV_GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the caller binds it soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def iface_of(address: str, interfaces: Optional[Mapping[str, list]] = None) -> Optional[str]:
    """The network interface that holds `address`, or None when no interface does (a name, or
    an address translated on the way)."""
    interfaces = psutil.net_if_addrs() if interfaces is None else interfaces
    for name, addresses in interfaces.items():
        if any(getattr(a, "address", None) == address for a in addresses):
            return name
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def hostname_is_loopback() -> bool:
    try:
        return _is_loopback(socket.gethostbyname(socket.gethostname()))
    except OSError:
        return False


def gloo_env(host: str, environ: Mapping[str, str],
             interfaces: Optional[Mapping[str, list]] = None) -> Dict[str, str]:
    """GLOO_SOCKET_IFNAME for workers of an agent reachable at `host`: the interface holding it,
    unless the user set the variable (then nothing); empty when no interface holds it."""
    if environ.get(ENV_GLOO_IFNAME):
        return {}
    name = iface_of(host, interfaces)
    return {ENV_GLOO_IFNAME: name} if name else {}


def interface_warning(host: str, multi_node: bool, environ: Mapping[str, str],
                      interfaces: Optional[Mapping[str, list]] = None) -> Optional[str]:
    """A warning when gloo would fall back to the host name's address and that address is a
    loopback one, in a job whose nodes may be on other hosts."""
    if not multi_node or environ.get(ENV_GLOO_IFNAME) or _is_loopback(host):
        return None
    if iface_of(host, interfaces) is not None or not hostname_is_loopback():
        return None
    return (f"no network interface holds this node's address {host} and the host name "
            f"{socket.gethostname()} resolves to a loopback address, so other hosts cannot reach "
            "its workers; pass --local-addr with this host's address on the shared network, or "
            "set GLOO_SOCKET_IFNAME")
