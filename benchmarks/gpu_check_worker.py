"""The worker of benchmarks/gpu_check.py, started by `python -m elastic.run`. One line per
result, `GPUCHECK <json>`, so the check reads them from the agent's output.

    --mode devices  each rank: what it sees (CUDA_VISIBLE_DEVICES, count), the UUID of its own
                    device (elastic.gpu.device()), its memory limit; with a limit, whether an
                    allocation past it is refused.
    --mode nccl     rank 0 reports: destroy + init + first all-reduce of an NCCL process group,
                    --reps times (a fresh store prefix each time, as an in-place rescale builds a
                    new group); ElasticState commit(), restore() and sync() of a model of
                    --params parameters on the GPU, under --backend and, when that fails, under
                    cpu:gloo,cuda:nccl.
"""
import argparse
import json
import os
import statistics
import time
import traceback

import torch
import torch.distributed as dist

from elastic import ElasticState, gpu

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=("devices", "nccl"), required=True)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--params", type=int, default=50_000_000)
p.add_argument("--backend", default="nccl")
args = p.parse_args()
rank = int(os.environ.get("RANK", "0"))


def say(**fields):
    print("GPUCHECK " + json.dumps({"rank": rank, **fields}), flush=True)


def devices() -> None:
    fraction = gpu.setup()
    device = gpu.device()
    props = torch.cuda.get_device_properties(device)
    limit = "none"
    if fraction is not None:
        total = props.total_memory
        try:
            torch.empty(int(total * min(1.0, fraction + 0.1)), dtype=torch.uint8, device=device)
            limit = "not enforced"
        except torch.OutOfMemoryError:
            limit = "enforced"
        torch.cuda.empty_cache()
    say(visible=os.environ.get("CUDA_VISIBLE_DEVICES"), count=torch.cuda.device_count(),
        device=str(device), uuid=f"GPU-{props.uuid}", name=props.name, fraction=fraction,
        limit=limit)


def timed(fn) -> float:
    cuda = torch.cuda.is_available()  # without one (a dry run with --backend gloo): CPU times
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def nccl() -> None:
    gpu.setup()
    device = gpu.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0)
    one = torch.ones(1, device=device)

    def enter(prefix: str, backend: str) -> None:
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                                world_size=world)
        dist.all_reduce(one)  # NCCL makes its communicator at the first collective

    enter("first", args.backend)
    destroy, init = [], []
    for i in range(args.reps):
        destroy.append(timed(dist.destroy_process_group))
        init.append(timed(lambda: enter(f"round{i}", args.backend)))
    say(check="pg", destroy_ms=statistics.median(destroy) * 1e3,
        init_ms=statistics.median(init) * 1e3, reps=args.reps, world=world)

    width = 4096
    layers = max(1, round(args.params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(8, width, device=device)).sum().backward()
    optimizer.step()  # momentum buffers exist: the state has the optimizer's half too
    state = ElasticState(model, optimizer, step=0)
    params = sum(t.numel() for t in model.parameters())
    commit = [timed(state.commit) for _ in range(args.reps)]
    restore = [timed(state.restore) for _ in range(args.reps)]
    say(check="state", params=params, commit_ms=statistics.median(commit) * 1e3,
        restore_ms=statistics.median(restore) * 1e3)
    for backend in dict.fromkeys([args.backend, "cpu:gloo,cuda:nccl"]):
        if backend != args.backend:
            dist.destroy_process_group()
            enter(f"sync-{backend}", backend)
        try:
            took = [timed(lambda: state.sync(0)) for _ in range(max(1, args.reps // 2))]
        except Exception as exc:  # noqa: BLE001 (what fails is the finding)
            say(check="sync", backend=backend, error=f"{type(exc).__name__}: {exc}"[:300],
                where=traceback.format_exc().splitlines()[-3:])
            continue
        say(check="sync", backend=backend, sync_ms=statistics.median(took) * 1e3, world=world)
        break
    dist.destroy_process_group()


devices() if args.mode == "devices" else nccl()
