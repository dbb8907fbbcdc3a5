"""A gang needs nodes an elastic training job holds, on a local Ray cluster: ours against what a
Ray user does today, side by side, alternating, in one run.

    python benchmarks/ray_pool.py [--reps 3] [--step-s 0.05]

The cluster: `ray.cluster_utils.Cluster` on 127.0.0.1, a head with no CPUs and 3 nodes of 1 CPU.
The training job: examples/train_elastic.py, one worker per node, its step pinned at --step-s
(50 ms), committing and checkpointing every 10 steps; the gang comes after 12 + 3 x rep steps at
full size, so it lands at another point of the commit cycle each repetition. The gang: 2 members of 1 CPU, each a
process that notes its start, joins a gloo process group with torchrun's variables, all-reduces
once, and ends after 2 s.

  ours      the training job runs 1:3 through the pool's controller (`integrations.ray`); at full
            size a higher-priority gang is submitted: the controller releases two members
            through the job client (they leave at a step boundary), the freed bundles take the
            gang, the job trains on at 1.
  baseline  the same job as a fixed 3-node job of Ray actors in placement groups, as a user runs
            it on plain Ray; the gang arrives: the user's script ends the job's actors (what
            `ray job stop` does), places the gang, and starts the job again at 1 node from its
            last checkpoint.

Measured per repetition, on the clock of this process and the timestamps the processes print:
  gang running    submission -> the last gang member's process started (its own start-up after)
  gang ready      submission -> the last member through init_process_group and the all-reduce
  steps lost      the job's last step before the change minus the step it resumed from: steps
                  trained again (the baseline: those since its last checkpoint)
  training gap    the last training step before the change -> the first after it

Results (`python benchmarks/ray_pool.py --reps 3`: 2 cores, CPU only, Ray 2.60, medians of 3
alternating repetitions):

              gang running s  gang ready s  steps lost  training gap s
    ours                4.29          6.49           0            0.31
    baseline            1.23          3.88           5            5.46

The training job loses nothing and stands still 0.31 s instead of 5.5 s (17x); the gang starts
3 s later than when the job is simply killed. Target (gang running <= 2 s after submission plus
its members' start-up, 0 steps lost): 0 steps met, the time missed. Where the time goes (the
workloads' histories, --verbose): the release is decided in the tick after the submission; the
released agents exit 1.7-2.4 s later (their workers leave at the next 50 ms step boundary, then
the worker processes tear down: torch, gloo, the DataLoader's workers, on 2 loaded cores); the
gang's bundles are placed and its actors start ~1 s after that (a Ray worker process per member,
which the baseline pays too).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

TRAIN = REPO / "examples" / "train_elastic.py"
GANG = '''
import os, sys, time
print(f"START {time.time():.6f}", flush=True)
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(f"READY {time.time():.6f} sum={t.item()}", flush=True)
time.sleep(2)
dist.barrier()
dist.destroy_process_group()
os._exit(0)
'''
VERBOSE = "--verbose" in sys.argv
STEP = re.compile(r"STEP (\d+\.\d+) step=(\d+) world=(\d+)")


def steps_in(paths):
    """(time, step, world) of every rank-0 STEP line in these logs, by time."""
    out = []
    for p in paths:
        if Path(p).exists():
            out += [(float(t), int(s), int(w)) for t, s, w in STEP.findall(Path(p).read_text())]
    return sorted(out)


def stamps(paths, word):
    found = []
    for p in paths:
        m = re.search(rf"{word} (\d+\.\d+)", Path(p).read_text()) if Path(p).exists() else None
        found.append(float(m.group(1)) if m else None)
    return found


def wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout} s for {what}")


def at_world(steps, world):
    return sum(1 for _, _, w in steps if w == world)


def settle(rep):
    """Steps at full size before the gang comes: some, and a different number each repetition,
    so the change lands at another point of the job's commit cycle (every 10 steps)."""
    return 12 + 3 * rep


def gap_and_lost(steps, t0, old_world, new_world):
    """The training gap: the last step in the old world -> the first in the new one after t0;
    steps lost: the old world's steps the new one trains again (its first step's number is at
    or below the old world's last)."""
    first = next((s for s in steps if s[0] >= t0 and s[2] == new_world), None)
    last = [s for s in steps if s[2] == old_world and (first is None or s[0] < first[0])]
    if first is None or not last:
        return None, None
    return first[0] - last[-1][0], max(0, last[-1][1] - first[1] + 1)


def agent_args(step_s, ckpt):
    return (TRAIN, "--epochs", "1000", "--step-sleep", str(step_s), "--checkpoint", ckpt)


AGENT_FLAGS = ("--global-batch-size", "32", "--max-micro-batch", "8", "--rdzv-conf",
               "last_call_timeout=0.5,join_settle=0.3,lease_ttl=60")


def run_ours(rep, tmp, endpoint, step_s):
    from integrations.ray.client import PoolClient
    from integrations.ray.spec import GANG as GANG_KIND
    from integrations.ray.spec import TRAIN as TRAIN_KIND
    from integrations.ray.spec import Submission
    logs = tmp / "members"
    name, gang = f"ours{rep}", f"gang{rep}"
    with PoolClient(endpoint) as pool:
        pool.submit(Submission(name, TRAIN_KIND, agent_args(step_s, str(tmp / f"{name}.ckpt")),
                               min_members=1, max_members=3, cwd=str(REPO),
                               agent_args=AGENT_FLAGS))
        train_logs = lambda: list((logs / name).glob("*.log"))  # noqa: E731
        wait(lambda: at_world(steps_in(train_logs()), 3) >= settle(rep), 180, "world 3")
        t0 = time.time()
        pool.submit(Submission(gang, GANG_KIND, (str(tmp / "gang.py"),), min_members=2,
                               max_members=2, priority="high", cwd=str(tmp)))
        gang_logs = [logs / gang / f"{gang}.{i}.0.log" for i in range(2)]
        wait(lambda: all(stamps(gang_logs, "READY")), 120, "the gang")
        wait(lambda: any(w == 1 and t > t0 for t, _, w in steps_in(train_logs())), 60,
             "training at 1")
        starts, readies = stamps(gang_logs, "START"), stamps(gang_logs, "READY")
        gap, lost = gap_and_lost(steps_in(train_logs()), t0, 3, 1)
        if VERBOSE:
            for w in (name, gang):
                print("\n".join(f"  {w}: {h}" for h in pool.status(w)["history"]), flush=True)
        pool.stop(name)
        wait(lambda: pool.status(name)["state"] in ("stopped", "finished", "failed"), 120,
             "the job to stop")
        wait(lambda: pool.status(gang)["state"] == "finished", 60, "the gang to end")
    return max(starts) - t0, max(readies) - t0, lost, gap


def run_baseline(rep, tmp, endpoint, step_s):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from integrations.ray.members import MemberProcess
    from integrations.ray.spec import gang_env
    Member = ray.remote(MemberProcess)
    logs = tmp / "baseline"
    ckpt = str(tmp / f"base{rep}.ckpt")

    def start_job(job, n):
        pgs, actors = [], []
        for i in range(n):
            pg = placement_group([{"CPU": 1}], strategy="PACK")
            ray.get(pg.ready(), timeout=60)
            a = Member.options(num_cpus=1, max_concurrency=4, scheduling_strategy=
                               PlacementGroupSchedulingStrategy(pg, 0)).remote(
                f"{job}.{i}", str(logs))
            ray.get(a.start.remote([sys.executable, "-m", "elastic.run", "--nnodes", str(n),
                                    "--rdzv-endpoint", endpoint, "--rdzv-id", job,
                                    *AGENT_FLAGS, *map(str, agent_args(step_s, ckpt))], {},
                                   str(REPO)))
            pgs.append(pg)
            actors.append(a)
        return pgs, actors, [logs / f"{job}.{i}.log" for i in range(n)]

    def end(pgs, actors):
        for a in actors:
            ray.kill(a)
        for pg in pgs:
            remove_placement_group(pg)

    pgs, actors, full_logs = start_job(f"base{rep}-full", 3)
    wait(lambda: at_world(steps_in(full_logs), 3) >= settle(rep), 180, "world 3")
    t0 = time.time()
    end(pgs, actors)  # the user stops the job to make room
    gpg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(gpg.ready(), timeout=60)
    members = [Member.options(num_cpus=1, max_concurrency=4, scheduling_strategy=
                              PlacementGroupSchedulingStrategy(gpg, i)).remote(
        f"bgang{rep}.{i}", str(logs)) for i in range(2)]
    host, port = ray.get(members[0].address.remote())
    for i, m in enumerate(members):
        m.start.remote([sys.executable, str(tmp / "gang.py")],
                       gang_env(i, 2, host, port, f"bgang{rep}"), str(tmp))
    gang_logs = [logs / f"bgang{rep}.{i}.log" for i in range(2)]
    # ... and resubmits the job smaller, from its last checkpoint
    pgs, actors, small_logs = start_job(f"base{rep}-small", 1)
    wait(lambda: all(stamps(gang_logs, "READY")), 120, "the gang")
    wait(lambda: steps_in(small_logs), 120, "training at 1")
    starts, readies = stamps(gang_logs, "START"), stamps(gang_logs, "READY")
    gap, lost = gap_and_lost(steps_in(full_logs + small_logs), t0, 3, 1)
    ray.get([m.wait.remote() for m in members], timeout=60)
    end(pgs, actors)
    end([gpg], members)
    return max(starts) - t0, max(readies) - t0, lost, gap


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--verbose", action="store_true", help="print the workloads' histories")
    args = p.parse_args()
    import logging

    import ray
    from ray.cluster_utils import Cluster

    from integrations.ray.controller import NAMESPACE, Controller
    from rendezvous.embedded import EmbeddedEtcd
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ray-pool-bench-"))
    (tmp / "gang.py").write_text(GANG)
    results = {"ours": [], "baseline": []}
    with EmbeddedEtcd() as etcd:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False})
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=False)
        ctl = Controller(etcd.endpoint, "priorityClasses:\n  - {name: high, value: 1000}\n"
                         "  - {name: training, value: 200}\n  - {name: batch, value: 100}\n",
                         log_dir=str(tmp / "members"), tick_s=0.2).start()
        stop = threading.Event()
        loop = threading.Thread(target=ctl.serve, args=(stop,), daemon=True)
        loop.start()
        try:
            for rep in range(args.reps):
                for kind, fn in (("ours", run_ours), ("baseline", run_baseline)):
                    try:
                        r = fn(rep, tmp, etcd.endpoint, args.step_s)
                    except TimeoutError as exc:
                        r = None
                        print(f"{kind} rep {rep}: {exc}", flush=True)
                    results[kind].append(r)
                    if r:
                        print(f"{kind:<9} rep {rep}: gang running {r[0]:.2f} s, ready {r[1]:.2f} s, "
                              f"steps lost {r[2]}, training gap {r[3]:.2f} s", flush=True)
        finally:
            stop.set()
            loop.join(30)
            ctl.close()
            ray.shutdown()
            cluster.shutdown()
    print(f"\n{'':<10}{'gang running s':>15}{'gang ready s':>14}{'steps lost':>12}"
          f"{'training gap s':>16}   (medians of {args.reps}; 2 cores, CPU only)")
    med = {}
    for kind, rows in results.items():
        ok = [r for r in rows if r]
        if not ok:
            print(f"{kind:<10}{'no run finished':>15}")
            continue
        med[kind] = [statistics.median(r[i] for r in ok) for i in range(4)]
        m = med[kind]
        print(f"{kind:<10}{m[0]:>15.2f}{m[1]:>14.2f}{m[2]:>12.0f}{m[3]:>16.2f}"
              + (f"   ({len(rows) - len(ok)} failed)" if len(ok) < len(rows) else ""))
    if "ours" in med and "baseline" in med:
        o, b = med["ours"], med["baseline"]
        print(f"\nsummary: gang running {o[0]:.2f} s after submission (baseline {b[0]:.2f} s), "
              f"{o[2]:.0f} steps lost (baseline {b[2]:.0f}), training gap {o[3]:.2f} s "
              f"(baseline {b[3]:.2f} s); target: running <= 2 s + start-up, 0 steps lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
