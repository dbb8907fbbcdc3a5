"""Where `python -m elastic.job` finds the jobs of this machine without --rdzv-endpoint: while an
agent runs, it keeps a small file naming its run id and etcd endpoint (an embedded etcd's
endpoint is known nowhere else).

The files live in $ELASTIC_JOBS_DIR, by default ~/.cache/elastic-run/jobs; one per agent
(<run_id>.<pid>.json), removed when the agent ends, and ignored (then removed) once its process
is gone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import psutil

ENV_DIR = "ELASTIC_JOBS_DIR"
ENV_ENDPOINT = "ELASTIC_RDZV_ENDPOINT"


@dataclass(frozen=True)
class RecordedJob:
    run_id: str
    endpoint: str
    pid: int


def jobs_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "elastic-run", "jobs")


def record(run_id: str, endpoint: str) -> Optional[str]:
    """Say that this process runs an agent of `run_id` on `endpoint`; the file's path, or None
    when it cannot be written (the job runs anyway; only the lookup is lost)."""
    directory = jobs_dir()
    path = os.path.join(directory, f"{run_id}.{os.getpid()}.json")
    me = psutil.Process()
    data = {"run_id": run_id, "endpoint": endpoint, "pid": me.pid, "started": me.create_time()}
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def forget(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def recorded() -> List[RecordedJob]:
    """The jobs whose agents on this machine are alive, newest first."""
    directory = jobs_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                data = json.load(f)
            alive = psutil.Process(int(data["pid"])).create_time() == data["started"]
        except psutil.NoSuchProcess:
            alive = False
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            continue
        if not alive:
            forget(path)
            continue
        found.append((data["started"], RecordedJob(data["run_id"], data["endpoint"],
                                                   int(data["pid"]))))
    return [job for _, job in sorted(found, key=lambda x: -x[0])]
