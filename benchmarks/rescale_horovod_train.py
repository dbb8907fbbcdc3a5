"""The training script of benchmarks/rescale_horovod.py: a stock elastic Horovod script.

hvd.elastic.run with hvd.elastic.TorchState and DistributedOptimizer, nothing from this project,
so it runs the same under `python -m elastic.run --backend horovod` and under horovodrun's
elastic mode. The model and data are those of rescale_train.py (an MLP on a synthetic
regression set, 0.05 s of made-up compute per step); the state is committed every
--commit-every steps. Rank 0 prints, flushed, in rescale_train.py's format (so the benchmark
reads both with `rescale_train.read_lines`):

    ENTER <unix time> step=<state.step> world=<W> pid=<pid>   on every (re)entry into train
    STEP <unix time> step=<state.step> world=<W>              after every optimizer step

It never ends by itself.
"""
import argparse
import os
import time

import torch
import horovod.torch as hvd

NUM_SAMPLES, NUM_FEATURES = 4096, 16

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--commit-every", type=int, default=5)
parser.add_argument("--step-sleep", type=float, default=0.05)
parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
args = parser.parse_args()

hvd.init()
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(1234)
inputs = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
targets = inputs @ torch.randn(NUM_FEATURES, 1, generator=generator)
torch.manual_seed(1234)
model = torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 1))
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                     named_parameters=model.named_parameters())


@hvd.elastic.run
def train(state):
    if hvd.rank() == 0:
        print(f"ENTER {time.time():.6f} step={state.step} world={hvd.size()} pid={os.getpid()}",
              flush=True)
    while True:
        start = (state.step * hvd.size() + hvd.rank()) * args.batch % NUM_SAMPLES
        x = inputs[start:start + args.batch]
        y = targets[start:start + args.batch]
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        time.sleep(args.step_sleep)
        optimizer.step()
        state.step += 1
        if hvd.rank() == 0:
            print(f"STEP {time.time():.6f} step={state.step} world={hvd.size()}", flush=True)
        if state.step % args.commit_every == 0:
            state.commit()


train(hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0))
