"""A torchrun-style worker for the launcher tests: allreduce steps until told to stop.

Prints `STEP <time> step=<n> world=<WORLD_SIZE> rank=<RANK>` on every step. All ranks stop at the
same step once the file named by --stop-file exists (the decision is allreduced, so no rank is left
waiting in a collective). --fail-first-attempt makes rank 0 exit with code 3 while
TORCHELASTIC_RESTART_COUNT is 0; --fail-if-env NAME makes every rank whose environment has NAME
exit with code 3 at start (a node whose workers always fail). At start each rank prints
`START rank=<RANK> world=<WORLD_SIZE> master=<MASTER_ADDR> pid=<pid>`.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--stop-file", required=True)
parser.add_argument("--step-sleep", type=float, default=0.05)
parser.add_argument("--fail-first-attempt", action="store_true")
parser.add_argument("--fail-if-env", default=None)
args = parser.parse_args()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"START rank={rank} world={world} master={os.environ['MASTER_ADDR']} pid={os.getpid()}",
      flush=True)
if args.fail_if_env and os.environ.get(args.fail_if_env):
    raise SystemExit(3)
if args.fail_first_attempt and rank == 0 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    raise SystemExit(3)
dist.init_process_group("gloo")
step = 0
while True:
    flag = torch.tensor([1.0 if os.path.exists(args.stop_file) else 0.0])
    dist.all_reduce(flag)
    if flag.item() > 0:
        break
    step += 1
    print(f"STEP {time.time():.3f} step={step} world={world} rank={rank}", flush=True)
    time.sleep(args.step_sleep)
dist.destroy_process_group()
print(f"DONE world={world} rank={rank}", flush=True)
