"""Deterministic DDP training with the worker API, for the equivalence and exactly-once tests.

float64 throughout, so a run whose world changes differs from a one-process run only by the order
of floating-point sums. Each optimizer step takes the global batch from ElasticSampler, splits
this rank's share into the plan's micro-batches, and weights the summed loss so that DDP's average
is the mean gradient over the global batch. Every --commit-every steps the state is committed and
each node's local rank 0 writes the checkpoint (a restarted world resumes from it).

Audit trail: every trained step appends {"round", "step", "epoch", "rank", "world", "indices",
"global"} to <record-dir>/round<R>-rank<K>.jsonl: this rank's share and the whole global batch of
the step (every rank's share, from the sampler's committed state). A rank SIGKILLed right after
a step's all-reduce never writes its record, yet the survivors may commit that step: the global
batch in their records says what the committed state trained. The test reconstructs which steps
survived.
Pacing: the ranks train step s only once the integer in --allowance-file is >= s; while they
wait they keep passing step boundaries, so an in-place world change can happen meanwhile.
Works in both rescale modes: `integrations.torch.run` re-enters `train` after an in-place change,
and simply runs it once when the launcher restarts workers instead.
Hung ranks: with --hang-at S (repeatable), rank 1 of the first round allowed to train step S
prints `HANG <unix time> step=S rank=1` and stops making progress (no step, no step boundary), once
per job: it first creates <--hang-marker>.S exclusively, and a step whose marker exists never
hangs again, so the step is trained normally after the job re-forms.
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

from elastic import ElasticSampler, ElasticState
from integrations.torch.run import run

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--record-dir", required=True)
parser.add_argument("--allowance-file", required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--dataset", type=int, default=200)
parser.add_argument("--commit-every", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.02)
parser.add_argument("--hang-at", type=int, action="append", default=[],
                    help="rank 1 stops making progress at this step, once per job (repeatable)")
parser.add_argument("--hang-marker", help="prefix of the files recording the steps that hung")
args = parser.parse_args()
if args.hang_at and not args.hang_marker:
    parser.error("--hang-at needs --hang-marker")

torch.set_default_dtype(torch.float64)
data_gen = torch.Generator().manual_seed(0)
inputs = torch.randn(args.dataset, 8, generator=data_gen)
targets = torch.sin(inputs.sum(dim=1, keepdim=True))
torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sampler = ElasticSampler(args.dataset, 10, seed=3)
state = ElasticState(model, optimizer, sampler=sampler, step=0, epoch=0)
local_rank = int(os.environ["LOCAL_RANK"])


def allowance():
    try:
        return int(Path(args.allowance_file).read_text() or 0)
    except (OSError, ValueError):
        return 0


def wait_allowed(world, step):
    while True:
        ok = torch.tensor([1.0 if allowance() >= step else 0.0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank waits the same number of rounds
        if ok.item() > 0:
            return
        world.step_boundary(state)
        time.sleep(0.02)


def claim_hang(step):
    """True for the one rank that hangs at `step` in this job (the marker makes it once only)."""
    if step not in args.hang_at or dist.get_rank() != 1:
        return False
    try:
        os.close(os.open(f"{args.hang_marker}.{step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def hang_forever(step):
    print(f"HANG {time.time():.3f} step={step} rank=1", flush=True)
    while True:
        time.sleep(1)


def micro_batches(indices, accum_steps):
    """This rank's share in accum_steps chunks (some may be empty)."""
    k, n = accum_steps, len(indices)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [indices[s:s + z] for s, z in zip(starts, sizes)]


def commit():
    state.commit()
    if int(os.environ["LOCAL_RANK"]) == 0:
        state.save(args.checkpoint)


def train(world):
    rank, size = dist.get_rank(), dist.get_world_size()
    ddp = DDP(model)
    print(f"RESUMED step={state.step} epoch={state.epoch} cursor={sampler.cursor} world={size} "
          f"rank={rank} pid={os.getpid()}", flush=True)
    record = open(Path(args.record_dir) / f"round{world.round}-rank{rank}.jsonl", "a")
    while state.epoch < args.epochs:
        sampler.set_epoch(state.epoch)
        for indices in sampler:
            wait_allowed(world, state.step + 1)
            if claim_hang(state.step + 1):
                hang_forever(state.step + 1)
            step_batch = sampler.step_global_batch()
            global_batch = sampler.global_indices()
            chunks = micro_batches(indices, world.plan.accum_steps)
            for k, chunk in enumerate(chunks):
                with ddp.no_sync() if k < len(chunks) - 1 else nullcontext():
                    x, y = inputs[chunk], targets[chunk]
                    loss = ((ddp(x) - y) ** 2).sum() * size / step_batch
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sampler.advance()
            state.step += 1
            record.write(json.dumps({"round": world.round, "step": state.step,
                                     "epoch": state.epoch, "rank": rank, "world": size,
                                     "indices": indices, "global": global_batch}) + "\n")
            record.flush()
            if state.step % args.commit_every == 0:
                commit()
            if rank == 0:
                print(f"STEP {time.time():.3f} step={state.step} world={size} rank=0", flush=True)
            time.sleep(args.step_sleep)
            world.step_boundary(state)
        state.epoch += 1
        commit()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, args.out)
    print(f"DONE step={state.step} world={size} rank={rank}", flush=True)


state.on_plan_change(lambda old, new: print(
    f"PLAN world {old.world_size if old else None} -> {new.world_size} "
    f"accum={new.accum_steps} rank={dist.get_rank()}", flush=True))
run(train, state, checkpoint=args.checkpoint)
