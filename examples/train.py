"""A small DDP training script, written the way a user writes one for torchrun.

It knows nothing about the launcher: it reads LOCAL_RANK / RANK / WORLD_SIZE from the
environment, joins the gloo process group through env://, and trains a small MLP on a
synthetic regression set made from a fixed seed, so every run sees the same data.

Rank 0 prints one machine-readable line per optimizer step, which benchmarks and
integration tests read to see when training runs and in which world size:

    STEP <unix_time> step=<global step> world=<WORLD_SIZE> loss=<float>
    DONE world=<WORLD_SIZE>

Run it with:  torchrun --standalone --nproc-per-node 2 examples/train.py
"""

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

NUM_SAMPLES = 4096
NUM_FEATURES = 16
DATA_SEED = 1234


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per worker per step")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="stop each epoch after this many steps (default: the whole epoch)")
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds to sleep per step, to make a long-running job")
    parser.add_argument("--lr", type=float, default=0.01)
    return parser.parse_args()


def make_dataset() -> TensorDataset:
    # Same seed on every worker and every run: the sampler, not the data, splits the work.
    generator = torch.Generator().manual_seed(DATA_SEED)
    features = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
    true_weights = torch.randn(NUM_FEATURES, 1, generator=generator)
    noise = 0.1 * torch.randn(NUM_SAMPLES, 1, generator=generator)
    return TensorDataset(features, features @ true_weights + noise)


def make_model() -> nn.Module:
    torch.manual_seed(DATA_SEED)  # DDP broadcasts rank 0's weights anyway; this keeps runs repeatable
    return nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))


@record  # an uncaught exception goes to the launcher's error file: the job's failure names it
def main() -> None:
    args = parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    # To stderr, so logs show which worker started in which world without disturbing the STEP lines.
    print(f"worker start rank={rank} local_rank={local_rank} world={world_size} pid={os.getpid()}",
          file=sys.stderr, flush=True)

    dist.init_process_group("gloo")
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()

    dataset = make_dataset()
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=DATA_SEED)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

    global_step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for step_in_epoch, (features, targets) in enumerate(loader):
            if args.steps_per_epoch is not None and step_in_epoch >= args.steps_per_epoch:
                break
            optimizer.zero_grad()
            loss = loss_fn(model(features), targets)
            loss.backward()
            optimizer.step()
            global_step += 1
            if args.step_sleep > 0:
                time.sleep(args.step_sleep)
            if rank == 0:
                print(f"STEP {time.time():.6f} step={global_step} world={world_size} loss={loss.item():.6f}",
                      flush=True)

    if rank == 0:
        print(f"DONE world={world_size}", flush=True)
    # DDP's reducer holds the process group and sits in reference cycles; collected only at
    # interpreter exit, torch 2.13's gloo can abort there ("terminate called without an active
    # exception"). Freeing it here, while the interpreter is whole, keeps the exit clean.
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
