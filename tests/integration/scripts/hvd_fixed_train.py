"""Deterministic elastic Horovod training under the `fixed` batch policy, for the equivalence test.

The Horovod twin of fixed_train.py: the same data, model and optimizer (float64), the global batch
from ElasticSampler, each rank's share split into the plan's micro-batches, the loss weighted so
that DistributedOptimizer's average is the mean gradient over the global batch. Elastic the
Horovod way: hvd.elastic.run with a TorchState that also holds the sampler's committed cursor;
the new world's plan comes from integrations.horovod.current_plan() in a reset callback.

Audit trail: every trained step appends {"attempt", "step", "epoch", "rank", "indices"} to
<record-dir>/<pid>.jsonl, where attempt is rank 0's time of entry into the world that trained it
(the test keeps, per step, the records of the last attempt). Pacing: step s is trained once the
integer in --allowance-file is >= s; while waiting the ranks commit, so a new world can come.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import horovod.torch as hvd

from elastic import ElasticSampler
from integrations.horovod.worker import current_plan

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--record-dir", required=True)
parser.add_argument("--allowance-file", required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--dataset", type=int, default=200)
parser.add_argument("--commit-every", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.02)
args = parser.parse_args()

hvd.init()
torch.set_default_dtype(torch.float64)
data_gen = torch.Generator().manual_seed(0)
inputs = torch.randn(args.dataset, 8, generator=data_gen)
targets = torch.sin(inputs.sum(dim=1, keepdim=True))
torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=model.named_parameters())
sampler = ElasticSampler(args.dataset, 10, seed=3)
state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0, epoch=0,
                               cursor=sampler.state_dict(), plan_world=None)
plan = current_plan()


def on_reset():
    global plan
    plan = current_plan()


state.register_reset_callbacks([on_reset])


def allowance():
    try:
        return int(Path(args.allowance_file).read_text() or 0)
    except (OSError, ValueError):
        return 0


def commit():
    sampler.commit()
    state.cursor = sampler.state_dict()
    state.commit()  # a new world is noticed here (HostsUpdatedInterrupt)


def wait_allowed(step):
    while True:
        ok = torch.tensor([1.0 if allowance() >= step else 0.0])
        if hvd.allreduce(ok, op=hvd.Min, name="allowed").item() > 0:  # all ranks agree
            return
        commit()
        time.sleep(0.02)


def micro_batches(indices, accum_steps):
    k, n = accum_steps, len(indices)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [indices[s:s + z] for s, z in zip(starts, sizes)]


@hvd.elastic.run
def train(state):
    rank, size = hvd.rank(), hvd.size()
    sampler.load_state_dict(state.cursor)
    sampler.set_plan(plan, rank)
    if state.plan_world != plan.world_size:
        print(f"PLAN world {state.plan_world} -> {plan.world_size} accum={plan.accum_steps} "
              f"rank={rank}", flush=True)
        state.plan_world = plan.world_size
    attempt = hvd.broadcast_object(time.time(), root_rank=0, name="attempt")
    print(f"RESUMED step={state.step} epoch={state.epoch} cursor={sampler.cursor} world={size} "
          f"rank={rank} pid={os.getpid()}", flush=True)
    record = open(Path(args.record_dir) / f"{os.getpid()}.jsonl", "a")
    while state.epoch < args.epochs:
        sampler.set_epoch(state.epoch)
        for indices in sampler:
            wait_allowed(state.step + 1)
            step_batch = sampler.step_global_batch()
            optimizer.zero_grad()
            # One backward over the micro-batches' summed losses: one allreduce per step.
            loss = sum(p.sum() for p in model.parameters()) * 0.0  # a zero gradient if empty
            for chunk in micro_batches(indices, plan.accum_steps):
                if chunk:
                    loss = loss + ((model(inputs[chunk]) - targets[chunk]) ** 2).sum()
            (loss * size / step_batch).backward()
            optimizer.step()
            sampler.advance()
            state.step += 1
            record.write(json.dumps({"attempt": attempt, "step": state.step,
                                     "epoch": state.epoch, "rank": rank,
                                     "indices": indices}) + "\n")
            record.flush()
            if rank == 0:
                print(f"STEP {time.time():.3f} step={state.step} world={size} rank=0", flush=True)
            if state.step % args.commit_every == 0:
                commit()
            time.sleep(args.step_sleep)
        state.epoch += 1
        commit()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, args.out)
    print(f"DONE step={state.step} world={size} rank={rank}", flush=True)


train(state)
