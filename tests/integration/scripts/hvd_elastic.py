"""A stock elastic Horovod script: hvd.elastic.run with hvd.elastic.TorchState, nothing from the
launcher. Trains until --stop-file exists (the ranks agree with an allreduce, so all stop at the
same step), commits every --commit-every steps. Rank 0 prints, flushed:

    ENTER <time> step=<state.step> size=<S> rank=0 pid=<pid>   on every (re)entry into train
    STEP <time> step=<n> size=<S> rank=0 pid=<pid>              after every step
and every rank prints `RESET <time> size=<S> rank=<R> pid=<pid>` after a reset and
`DONE step=<n> size=<S> rank=<R>` at the end.
"""
import argparse
import os
import time

import torch
import horovod.torch as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--stop-file", required=True)
parser.add_argument("--commit-every", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.05)
args = parser.parse_args()

hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                     named_parameters=model.named_parameters())


def log(kind, state):
    print(f"{kind} {time.time():.3f} step={state.step} size={hvd.size()} rank={hvd.rank()} "
          f"pid={os.getpid()}", flush=True)


@hvd.elastic.run
def train(state):
    if hvd.rank() == 0:
        log("ENTER", state)
    while True:
        stop = torch.tensor([1.0 if os.path.exists(args.stop_file) else 0.0])
        if hvd.allreduce(stop, op=hvd.Max, name="stop").item() > 0:
            return
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        state.step += 1
        if hvd.rank() == 0:
            log("STEP", state)
        if state.step % args.commit_every == 0:
            state.commit()
        time.sleep(args.step_sleep)


state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0)
state.register_reset_callbacks([lambda: log("RESET", state)])
train(state)
print(f"DONE step={state.step} size={hvd.size()} rank={hvd.rank()}", flush=True)
