"""The worker of benchmarks/overhead.py: the same DDP loop, plain (under torchrun) or with the
in-place API (`run()` + `world.step_boundary()` under `elastic.run`; `elastic-sync`: with the
boundary's all-reduce made blocking again, as it was before it overlapped the next step). Rank 0 writes the time of
every step after the warm-up to --out (JSON). On CPU with gloo, or with --device cuda on the
worker's GPU with NCCL (benchmarks/gpu_check.py)."""
import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=("plain", "elastic", "elastic-sync"), required=True)
p.add_argument("--width", type=int, required=True)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--steps", type=int, required=True)
p.add_argument("--warmup", type=int, default=20)
p.add_argument("--out", required=True)
p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
               help="cuda: the model on the worker's GPU (elastic.gpu.device()), NCCL")
p.add_argument("--backend", default=None,
               help="process group backend (default gloo on cpu, nccl on cuda; e.g. "
                    "cpu:gloo,cuda:nccl)")
args = p.parse_args()
backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
torch.set_num_threads(1)
torch.manual_seed(0)
if args.device == "cuda":
    from elastic import gpu
    gpu.setup()
    device = gpu.device()
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
model = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(),
                      nn.Linear(args.width, args.width), nn.ReLU(),
                      nn.Linear(args.width, args.width)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(args.batch, args.width).to(device)
y = torch.randn(args.batch, args.width).to(device)


def ddp_of(m):
    return DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


boundary = []  # seconds inside step_boundary(), per step


def loop(ddp, world=None, state=None):
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()  # a step is done when the GPU is done
        if world is not None:
            state.step += 1
            b0 = time.perf_counter()
            world.step_boundary(state)
            boundary.append(time.perf_counter() - b0)
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


if args.mode == "plain":
    dist.init_process_group(backend)
    times = loop(ddp_of(model))
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
else:
    from elastic import ElasticState
    from integrations.torch.run import run
    from integrations.torch.world import ElasticWorld
    if args.mode == "elastic-sync":  # the boundary as it was: a blocking all-reduce every step

        def blocking(self):
            if self.channel is None:
                return False
            mine = 1.0 if (self.channel.latest_round > self.round or self.channel.leaving) else 0.0
            flag = torch.tensor([mine], device=self._device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0
        ElasticWorld.change_pending = blocking
    state = ElasticState(model, opt, step=0)
    result = {}

    def train(world):
        result["times"] = loop(ddp_of(model), world, state)
        result["rank"] = world.rank
        dist.barrier()

    run(train, state, world=ElasticWorld(backend))
    times, rank = result["times"], result["rank"]
if rank == 0:
    with open(args.out, "w") as f:
        json.dump(times, f)
    if boundary:
        with open(args.out + ".boundary", "w") as f:
            json.dump(boundary[args.warmup:], f)
