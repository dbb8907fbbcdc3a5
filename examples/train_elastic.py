"""Elastic DDP training with the worker API: batch plans, exactly-once data, commit and resume,
and in-place rescale (`integrations.torch.run`: survivors keep training in the new world
without restarting; joining nodes pre-warm).

Run it under a batch policy (the plan of each world reaches the workers from the launcher):

    python -m elastic.run --nproc-per-node 2 --global-batch-size 32 --max-micro-batch 8 \
        examples/train_elastic.py --epochs 1

Every --commit-every steps the state (model, optimizer, LR ramp, sampler cursor, step, epoch) is
committed and each node's local rank 0 writes it to --checkpoint in the background; workers
restarted in a new world, or a new job given the same file, resume from it. The default file is
./checkpoints/train_elastic.ckpt (relative to the working directory); delete it to start afresh.
Rank 0 prints `STEP <unix_time> step=<n> world=<W> loss=<x>` per optimizer step and `DONE`.
"""
import argparse
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from elastic import ElasticSampler, ElasticState, collate_or_none, lr_schedule
from integrations.torch.run import run

NUM_SAMPLES, NUM_FEATURES, SEED = 2048, 16, 1234
BASE_LR = 0.05       # tuned for the reference world; the plan's lr_factor scales it

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--checkpoint", default=os.path.join("checkpoints", "train_elastic.ckpt"))
parser.add_argument("--commit-every", type=int, default=10, help="optimizer steps per commit")
parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (slow job)")
args = parser.parse_args()

# Same seed everywhere: the sampler, not the data, decides who trains on what.
generator = torch.Generator().manual_seed(SEED)
features = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
weights = torch.randn(NUM_FEATURES, 1, generator=generator)
targets = features @ weights + 0.1 * torch.randn(NUM_SAMPLES, 1, generator=generator)
dataset = TensorDataset(features, targets)
torch.manual_seed(SEED)
model = nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))

local_rank = int(os.environ["LOCAL_RANK"])
optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
lr_ramp = lr_schedule()  # ramps the plan's LR factor over --lr-warmup-steps after a change
sampler = ElasticSampler(len(dataset), 1, rank=0, world_size=1, seed=SEED)  # run() sets the plan
loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_or_none)

# The raw model, not the DDP wrapper: the checkpoint then loads without DDP too.
state = ElasticState(model, optimizer, sampler=sampler, scheduler=lr_ramp, step=0, epoch=0)


def report_plan_change(old, new):  # called when this world's plan differs from the last one
    if dist.get_rank() == 0:
        print(f"PLAN world {old.world_size if old else '-'} -> {new.world_size}: global batch "
              f"{new.global_batch}, accum {new.accum_steps}, lr factor {new.lr_factor:g}",
              flush=True)


def micro_batches(batch, accum_steps):
    """This rank's share in accum_steps chunks. A share may be short or empty at the end of an
    epoch; empty chunks still run, so every rank joins every all-reduce."""
    x, y = batch if batch is not None else (features[:0], targets[:0])
    return zip(x.tensor_split(accum_steps), y.tensor_split(accum_steps))


def commit_and_checkpoint():
    state.commit()
    if local_rank == 0:  # each node keeps its own copy, so a survivor always has one
        state.save(args.checkpoint, asynchronous=True)


def train(world):
    """Entered once per world: after the start, and after every in-place change."""
    rank, size, plan = dist.get_rank(), dist.get_world_size(), world.plan
    ddp = DistributedDataParallel(model)
    lr_ramp.on_plan(plan, state.step)  # ramps only when this world's factor differs
    if rank == 0 and state.step > 0:
        print(f"RESUMED at step {state.step} epoch {state.epoch} world={size}", flush=True)
    while state.epoch < args.epochs:
        sampler.set_epoch(state.epoch)  # a resumed epoch keeps its cursor
        for batch in loader:  # one item: this rank's whole share of one optimizer step
            step_batch = sampler.step_global_batch()  # G, or fewer on the epoch's last step
            for g in optimizer.param_groups:
                g["lr"] = BASE_LR * lr_ramp.factor(state.step)
            step_loss = 0.0
            chunks = list(micro_batches(batch, plan.accum_steps))
            for k, (x, y) in enumerate(chunks):
                # Gradients are all-reduced once per step, on the last micro-batch.
                with ddp.no_sync() if k < len(chunks) - 1 else nullcontext():
                    # A sum (0 for no samples, where a mean is NaN) weighted so that DDP's
                    # average over the ranks is the mean over the step's global batch.
                    loss = ((ddp(x) - y) ** 2).sum() * size / step_batch
                    loss.backward()
                step_loss += loss.item()  # rank 0's estimate of the step's mean loss
            optimizer.step()
            optimizer.zero_grad()
            sampler.advance()  # this step's samples are trained; commit() makes it stick
            state.step += 1
            if state.step % args.commit_every == 0:
                commit_and_checkpoint()
            if rank == 0:
                print(f"STEP {time.time():.6f} step={state.step} world={size} "
                      f"loss={step_loss:.6f}", flush=True)
            time.sleep(args.step_sleep)
            world.step_boundary(state)  # a pending new world: commit here and switch
        state.epoch += 1
        commit_and_checkpoint()
    state.wait_for_save()  # raises if the last background write failed
    if rank == 0:
        print(f"DONE step={state.step} world={size}", flush=True)


state.on_plan_change(report_plan_change)
run(train, state, checkpoint=args.checkpoint)
