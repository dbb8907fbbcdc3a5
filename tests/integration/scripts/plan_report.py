"""Prints the batch plan and learning-rate warm-up this worker was started with, then all-reduces
until --stop-file exists (all ranks stop at the same step):

    PLAN rank=<R> world=<W> policy=<name> global=<G> accum=<A> factor=<f> scale=<s> warmup=<N>
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

from elastic import current_plan, lr_schedule

parser = argparse.ArgumentParser()
parser.add_argument("--stop-file", required=True)
args = parser.parse_args()

plan = current_plan()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"PLAN rank={rank} world={world} policy={plan.policy} global={plan.global_batch} "
      f"accum={plan.accum_steps} factor={plan.lr_factor!r} scale={plan.scale!r} "
      f"warmup={lr_schedule().warmup_steps}", flush=True)
dist.init_process_group("gloo")
while True:
    flag = torch.tensor([1.0 if os.path.exists(args.stop_file) else 0.0])
    dist.all_reduce(flag)
    if flag.item() > 0:
        break
    time.sleep(0.05)
dist.destroy_process_group()
