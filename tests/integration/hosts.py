"""Simulated hosts for tests: network namespaces joined by a veth pair, each with its own
loopback and one private address, so what crosses hosts (interfaces, addresses peers are told,
reachability) is tested as it would be across machines. Needs root and `ip` (iproute2)."""
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import List, Optional

SUBNET = "10.201.{}.{}"


@dataclass(frozen=True)
class Host:
    netns: str
    address: str
    iface: str

    @property
    def prefix(self) -> List[str]:
        """Run a command on this host: `ip netns exec` execs it in place (same pid)."""
        return ["ip", "netns", "exec", self.netns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> Optional[str]:
    """Why namespaced hosts cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = "elprobe" + uuid.uuid4().hex[:6]
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` is not allowed here: {getattr(exc, 'stderr', '') or exc}".strip()
    _ip("netns", "delete", probe)
    return None


class HostPair:
    """Two hosts on one private /24; close() removes the namespaces and the link."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        subnet = int(tag, 16) % 250 + 1
        self.hosts = []
        names = [f"el{tag}a", f"el{tag}b"]
        links = [f"ve{tag}a", f"ve{tag}b"]
        try:
            for ns in names:
                _ip("netns", "add", ns)
            _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
            for i, (ns, link) in enumerate(zip(names, links), start=1):
                address = SUBNET.format(subnet, i)
                _ip("link", "set", link, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", link)
                _ip("-n", ns, "link", "set", link, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts.append(Host(ns, address, link))
        except BaseException:
            self.close(names)
            raise

    def close(self, names=None) -> None:
        for ns in names or [h.netns for h in self.hosts]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
