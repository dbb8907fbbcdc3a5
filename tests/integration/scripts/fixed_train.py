"""Deterministic DDP training with the worker API, for the equivalence and exactly-once tests.

float64 throughout, so a run whose world changes differs from a one-process run only by the order
of floating-point sums. Each optimizer step takes the global batch from ElasticSampler, splits
this rank's share into the plan's micro-batches, and weights the summed loss so that DDP's average
is the mean gradient over the global batch. Every --commit-every steps the state is committed and
each node's local rank 0 writes the checkpoint (a restarted world resumes from it).

Audit trail: every trained step appends {"round", "step", "epoch", "rank", "indices"} to
<record-dir>/round<R>-rank<K>.jsonl. The test reconstructs which steps survived.
Pacing: a rank trains step s only once the integer in --allowance-file is >= s.
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from elastic import ElasticSampler, ElasticState, current_plan

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--record-dir", required=True)
parser.add_argument("--allowance-file", required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--dataset", type=int, default=200)
parser.add_argument("--commit-every", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.02)
args = parser.parse_args()

torch.set_default_dtype(torch.float64)
data_gen = torch.Generator().manual_seed(0)
inputs = torch.randn(args.dataset, 8, generator=data_gen)
targets = torch.sin(inputs.sum(dim=1, keepdim=True))
torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
plan = current_plan()
ddp = DDP(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sampler = ElasticSampler(args.dataset, plan.global_batch, seed=3)
state = ElasticState(model, optimizer, sampler=sampler, plan=plan, step=0, epoch=0)
state.on_plan_change(lambda old, new: print(
    f"PLAN world {old.world_size if old else None} -> {new.world_size} "
    f"accum={new.accum_steps} rank={rank}", flush=True))
state.resume(args.checkpoint)
print(f"RESUMED step={state.step} epoch={state.epoch} cursor={sampler.cursor} world={world} "
      f"rank={rank}", flush=True)

round_number = os.environ["ELASTIC_ROUND"]
record = open(Path(args.record_dir) / f"round{round_number}-rank{rank}.jsonl", "a")
local_rank = int(os.environ["LOCAL_RANK"])


def allowed(step):
    while True:
        try:
            if int(Path(args.allowance_file).read_text() or 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


def micro_batches(indices):
    """This rank's share in plan.accum_steps chunks (some may be empty)."""
    k, n = plan.accum_steps, len(indices)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [indices[s:s + z] for s, z in zip(starts, sizes)]


while state.epoch < args.epochs:
    sampler.set_epoch(state.epoch)
    for indices in sampler:
        allowed(state.step + 1)
        step_batch = sampler.step_global_batch()
        chunks = micro_batches(indices)
        for k, chunk in enumerate(chunks):
            with ddp.no_sync() if k < len(chunks) - 1 else nullcontext():
                x, y = inputs[chunk], targets[chunk]
                loss = ((ddp(x) - y) ** 2).sum() * world / step_batch
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sampler.advance()
        state.step += 1
        record.write(json.dumps({"round": int(round_number), "step": state.step,
                                 "epoch": state.epoch, "rank": rank, "indices": indices}) + "\n")
        record.flush()
        if state.step % args.commit_every == 0:
            state.commit()
            if local_rank == 0:
                state.save(args.checkpoint)
        if rank == 0:
            print(f"STEP {time.time():.3f} step={state.step} world={world} rank=0", flush=True)
        time.sleep(args.step_sleep)
    state.epoch += 1
    state.commit()
    if local_rank == 0:
        state.save(args.checkpoint)

if rank == 0:
    torch.save([p.detach().clone() for p in model.parameters()], args.out)
dist.destroy_process_group()
print(f"DONE step={state.step} world={world} rank={rank}", flush=True)
