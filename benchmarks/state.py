"""Cost of ElasticState.commit(), save() and load() next to plain PyTorch, side by side.

A model of about 100 M parameters (--layers nn.Linear(--width, --width), 24 x 2048 by default)
with SGD momentum (or --optimizer adam) state, on CPU. Per repetition, in alternating order:

    commit()                      vs  copy.deepcopy(model.state_dict())
                                  vs  copy.deepcopy of model + optimizer state dicts (same content)
    save(path)                    vs  torch.save(state.state_dict(), path2), same directory
                                  vs  the same torch.save, then fsync of the file and directory
    save(path, checksum="sha256") vs  torch.save + fsync
    save(path, asynchronous=True) vs  torch.save: time the training thread is blocked, and total
    load(path)                    vs  torch.load(path2)
                                  vs  torch.load(path2) + model/optimizer.load_state_dict
    load(path) + snapshot copied  vs  torch.load(path2) + model/optimizer.load_state_dict
    load_checkpoint(path, mmap=True) + load_state_dict
                                  vs  torch.load(path2, mmap=True) + load_state_dict

save() checksums, fsyncs and renames; torch.save does none of that. Dirty pages are flushed (os.sync)
before every timed save or load, untimed, so one side's write-back does not land on the other's
clock. load() returns while the committed snapshot's copy of the optimizer state is still being
made on a thread (the optimizer's first step waits for it); the "load()" rows wait for that copy,
untimed, before the baseline runs, and "snapshot copied" includes it. Stops starting repetitions
after --budget seconds; removes its files.

    python benchmarks/state.py [--reps 3] [--optimizer sgd|adam] [--dir DIR] [--budget 600]
"""

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic.checkpoint import load_checkpoint  # noqa: E402
from elastic.sampler import ElasticSampler  # noqa: E402
from elastic.state import ElasticState  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temp dir)")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="start no repetition after this many seconds")
    return parser.parse_args()


def build(args: argparse.Namespace) -> ElasticState:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step with made-up gradients creates the optimizer state
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    sampler = ElasticSampler(1_000_000, 256, rank=0, world_size=1)
    return ElasticState(model, optimizer, sampler=sampler, step=1, epoch=0)


def timed(fn, flush: bool = False) -> float:
    if flush:
        os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    began = time.monotonic()
    state = build(args)
    model, optimizer = state.model, state.optimizer
    params = sum(p.numel() for p in model.parameters())
    workdir = Path(tempfile.mkdtemp(prefix="elastic-state-bench-", dir=args.dir))
    ours, theirs = workdir / "elastic.pt", workdir / "torch.pt"

    def async_save() -> tuple[float, float]:
        """(seconds the caller was blocked, seconds until the file was written)."""
        os.sync()
        start = time.perf_counter()
        state.save(ours, asynchronous=True)
        blocked = time.perf_counter() - start
        state.wait_for_save()
        return blocked, time.perf_counter() - start

    def durable_torch_save() -> None:
        """torch.save made as durable as save(): the file and its directory fsynced."""
        with open(theirs, "wb") as f:
            torch.save(state.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(workdir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_into_model(mmap: bool = False) -> None:
        loaded = torch.load(theirs, mmap=mmap)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    def load() -> float:
        """Seconds until load() returned; the background snapshot copy is then waited for."""
        seconds = timed(lambda: state.load(ours), flush=True)
        state.state_dict()
        return seconds

    def load_checkpoint_into_model() -> None:
        """What a user of load_checkpoint does to start from a checkpoint: verify, map, copy in."""
        loaded = load_checkpoint(ours, fingerprint=state.fingerprint, mmap=True)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    # (row, ours, baseline name, baseline): each a thunk returning seconds.
    rows = [
        ("commit()", lambda: timed(state.commit),
         "deepcopy(model.state_dict())", lambda: timed(lambda: copy.deepcopy(model.state_dict()))),
        ("commit()", lambda: timed(state.commit), "deepcopy(model + optimizer state)",
         lambda: timed(lambda: copy.deepcopy({"m": model.state_dict(),
                                              "o": optimizer.state_dict()}))),
        ("save()", lambda: timed(lambda: state.save(ours), flush=True),
         "torch.save", lambda: timed(lambda: torch.save(state.state_dict(), theirs), flush=True)),
        ("save()", lambda: timed(lambda: state.save(ours), flush=True),
         "torch.save + fsync", lambda: timed(durable_torch_save, flush=True)),
        ("save(checksum=sha256)", lambda: timed(lambda: state.save(ours, checksum="sha256"),
                                                flush=True),
         "torch.save + fsync", lambda: timed(durable_torch_save, flush=True)),
        ("save(asynchronous) blocked", lambda: async_save()[0],
         "torch.save", lambda: timed(lambda: torch.save(state.state_dict(), theirs), flush=True)),
        ("save(asynchronous) written", lambda: async_save()[1],
         "torch.save", lambda: timed(lambda: torch.save(state.state_dict(), theirs), flush=True)),
        ("load()", load,
         "torch.load", lambda: timed(lambda: torch.load(theirs), flush=True)),
        ("load()", load,
         "torch.load + load_state_dict", lambda: timed(load_into_model, flush=True)),
        ("load() + snapshot copied",
         lambda: timed(lambda: (state.load(ours), state.state_dict()), flush=True),
         "torch.load + load_state_dict", lambda: timed(load_into_model, flush=True)),
        ("load_checkpoint(mmap) + lsd", lambda: timed(load_checkpoint_into_model, flush=True),
         "torch.load(mmap) + load_state_dict",
         lambda: timed(lambda: load_into_model(mmap=True), flush=True)),
    ]
    samples = {i: ([], []) for i in range(len(rows))}
    reps_done = 0
    try:
        state.save(ours)  # files exist before the first timed load
        torch.save(state.state_dict(), theirs)
        for rep in range(args.reps):
            if time.monotonic() - began > args.budget:
                print(f"budget of {args.budget:.0f} s spent; stopping after {rep} repetitions")
                break
            for i, (_, a, _, b) in enumerate(rows):
                # A B on even repetitions, B A on odd ones: neither always runs on a warm cache.
                first, second = (a, b) if rep % 2 == 0 else (b, a)
                x, y = first(), second()
                samples[i][0].append(x if rep % 2 == 0 else y)
                samples[i][1].append(y if rep % 2 == 0 else x)
            reps_done += 1
            print(f"rep {rep + 1}/{args.reps} done at {time.monotonic() - began:.0f} s", flush=True)
        state_mb = sum(t.numel() * t.element_size() for t in _tensors(state.state_dict())) / 2**20
        file_mb = ours.stat().st_size / 2**20
    finally:
        state.wait_for_save()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"CPU only, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"files in {workdir.parent}")
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) = {params / 1e6:.1f} M "
          f"parameters, {args.optimizer} state; committed state {state_mb:.0f} MiB, "
          f"checkpoint file {file_mb:.0f} MiB; medians of {reps_done} repetitions")
    print()
    print(f"{'elastic':<28} {'median s':>9}   {'baseline':<32} {'median s':>9} {'ratio':>6}")
    ratios = {}
    for i, (name, _, base, _) in enumerate(rows):
        a, b = (statistics.median(s) for s in samples[i])
        ratios[(name, base)] = a / b
        print(f"{name:<28} {a:>9.3f}   {base:<32} {b:>9.3f} {a / b:>5.2f}x")
    print()
    print("summary: commit() {:.2f}x deepcopy of the same model+optimizer state; save() {:.2f}x "
          "torch.save + fsync (+XXH3, rename; {:.2f}x with SHA-256); save(asynchronous) blocks "
          "{:.3f} s; load() {:.2f}x torch.load + load_state_dict (+verify; {:.2f}x until the "
          "snapshot's background copy is made); "
          "load_checkpoint(mmap) + load_state_dict {:.2f}x the same with torch.load(mmap)"
          .format(ratios[("commit()", "deepcopy(model + optimizer state)")],
                  ratios[("save()", "torch.save + fsync")],
                  ratios[("save(checksum=sha256)", "torch.save + fsync")],
                  statistics.median(samples[[r[0] for r in rows].index(
                      "save(asynchronous) blocked")][0]),
                  ratios[("load()", "torch.load + load_state_dict")],
                  ratios[("load() + snapshot copied", "torch.load + load_state_dict")],
                  ratios[("load_checkpoint(mmap) + lsd", "torch.load(mmap) + load_state_dict")]))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


if __name__ == "__main__":
    main()
