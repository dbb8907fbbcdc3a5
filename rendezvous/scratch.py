"""Temporary directories that belong to one live process and do not outlive it for long.

A process that is SIGKILLed cannot remove what it put in the temp directory (an embedded etcd's
data dir is over 100 MB), so each directory made here carries an owner marker (pid, the pid's
start time, host name and pid namespace), and making a new one first removes those of the same
prefix whose owner is gone. A directory whose marker is missing or unreadable, or whose owner
lives on another host or in another pid namespace (a shared /tmp), is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from typing import List, Optional

import psutil

MARKER = ".owner"


def _pid_namespace() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _me() -> dict:
    pid = os.getpid()
    return {"pid": pid, "started": psutil.Process(pid).create_time(),
            "host": socket.gethostname(), "pidns": _pid_namespace()}


def _owner_gone(owner: dict) -> bool:
    """True only when the owner is known to be dead: same host and pid namespace as us, and its
    pid is free or taken by a process started at another time."""
    if owner.get("host") != socket.gethostname() or owner.get("pidns") != _pid_namespace():
        return False
    try:
        return psutil.Process(int(owner["pid"])).create_time() != owner["started"]
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def remove_stale(prefix: str, parent: Optional[str] = None) -> List[str]:
    """Remove the directories `<parent>/<prefix>*` whose owner process is gone; return them."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with open(os.path.join(entry.path, MARKER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and _owner_gone(owner):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def make_scratch(prefix: str) -> str:
    """A new directory `<tmp>/<prefix>XXXXXX` owned by this process (stale ones removed first).
    The caller removes it when done; if it dies first, the next call with the prefix does."""
    remove_stale(prefix)
    path = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(_me(), f)
    return path
