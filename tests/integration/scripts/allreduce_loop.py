"""Back-to-back large all-reduces, so that a peer killed at any moment dies inside one.

Prints `ITER <n> world=<W> rank=<R> pid=<pid>` every 10 iterations; stops (all ranks at the same
iteration) once --stop-file exists.
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from elastic import ElasticState
from integrations.torch.run import run

parser = argparse.ArgumentParser()
parser.add_argument("--stop-file", required=True)
args = parser.parse_args()

model = torch.nn.Linear(2, 2)
state = ElasticState(model, iteration=0)
payload = torch.ones(2_000_000)


def train(world):
    while True:
        stop = torch.tensor([1.0 if Path(args.stop_file).exists() else 0.0])
        dist.all_reduce(stop)
        if stop.item() > 0:
            return
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
