"""`python -m integrations.horovod.prewarm [-m] SCRIPT [ARGS]`: how an agent starts Horovod workers.

Started for a round, it runs the script at once. Started in standby (ELASTIC_STANDBY=1: a node
that is joining pre-warms its workers before it registers) it first imports what every Horovod
training script imports (torch, horovod.torch, and torch._dynamo, which torch imports at the
first optimizer and which alone takes seconds), then asks its agent for its world:
`GET /elastic_start/<local rank>` on its rendezvous endpoint (ELASTIC_HOROVOD_ENDPOINTS, one per
local rank) answers once a round names this node, with the variables a worker spawned for that
round would have had. They go into the environment, where `hvd.init()` reads them. A 404 means
the worker is not needed (its node left): it exits 0.

Either way the script then runs as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would run
it: as `__main__`, with the same sys.argv and sys.path[0].
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence, Tuple

from elastic.contract import HOROVOD_ENDPOINTS as ENV_ENDPOINTS, STANDBY as ENV_STANDBY

START_SCOPE = "elastic_start"
MODULE = "integrations.horovod.prewarm"
WARM_IMPORTS = ("torch", "horovod.torch", "torch._dynamo")


def runner_argv(argv: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """The worker command through this runner, or None when the command is not `python -u ...`
    (`--no-python`: nothing to pre-warm)."""
    if len(argv) < 3 or argv[0] != sys.executable or argv[1] != "-u":
        return None
    return (argv[0], "-u", "-m", MODULE, *argv[2:])


def _warm() -> None:
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # the script will meet the same error, with its own traceback
            pass


def _world(local_rank: int) -> Optional[Dict[str, str]]:
    """Block until the agent gives this worker its world; None if it no longer wants it."""
    endpoints = os.environ[ENV_ENDPOINTS].split(",")
    url = f"http://{endpoints[local_rank]}/{START_SCOPE}/{local_rank}"
    try:
        with urllib.request.urlopen(url) as response:  # no timeout: it waits for a round
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _run(target: List[str]) -> None:
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        path = target[0]
        sys.argv = list(target)
        sys.path[0] = os.path.dirname(os.path.abspath(path))
        runpy.run_path(path, run_name="__main__")


def main() -> None:
    target = sys.argv[1:]
    if not target or target == ["-m"]:
        sys.exit(f"usage: python -m {MODULE} [-m] SCRIPT [ARGS]")
    if os.environ.get(ENV_STANDBY) == "1":
        _warm()
        world = _world(int(os.environ["LOCAL_RANK"]))
        if world is None:
            sys.exit(0)
        os.environ.pop(ENV_STANDBY)
        os.environ.update(world)
    _run(target)


if __name__ == "__main__":
    main()
