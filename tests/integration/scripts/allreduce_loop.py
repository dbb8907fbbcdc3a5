"""Back-to-back large all-reduces, so that a peer killed at any moment dies inside one.

Prints `ITER <n> world=<W> rank=<R> pid=<pid>` every 10 iterations; stops (all ranks at the same
iteration) once --stop-file exists. With --hang-at N, rank 1 hangs at iteration N (first attempt). --start-delay S stands for a slow start (big imports, a model to
build) before the script reaches the in-place API.
"""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from elastic import ElasticState
from integrations.torch.run import run

parser = argparse.ArgumentParser()
parser.add_argument("--stop-file", required=True)
parser.add_argument("--hang-at", type=int, default=0,
                    help="rank 1 of the first attempt stops making progress at this iteration")
parser.add_argument("--start-delay", type=float, default=0.0)
args = parser.parse_args()
time.sleep(args.start_delay)

model = torch.nn.Linear(2, 2)
state = ElasticState(model, iteration=0)
payload = torch.ones(2_000_000)


def stuck_forever():
    while True:
        time.sleep(1)


def train(world):
    while True:
        stop = torch.tensor([1.0 if Path(args.stop_file).exists() else 0.0])
        dist.all_reduce(stop)
        if stop.item() > 0:
            return
        if (args.hang_at and state.iteration == args.hang_at and dist.get_rank() == 1
                and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
            stuck_forever()
        dist.all_reduce(payload)
        payload.fill_(1.0)
        state.iteration += 1
        if state.iteration % 10 == 0:
            state.commit()
            print(f"ITER {state.iteration} world={dist.get_world_size()} rank={dist.get_rank()} "
                  f"pid={os.getpid()}", flush=True)
        world.step_boundary(state)


run(train, state)
print(f"DONE rank={dist.get_rank() if dist.is_initialized() else '-'}", flush=True)
