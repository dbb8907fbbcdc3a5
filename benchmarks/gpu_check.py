"""A check on real GPUs: what this launcher does with them, and what the in-place path costs on
them. It looks at what the machine has and skips, saying why, whatever it lacks.

    python benchmarks/gpu_check.py [--reps 3] [--backend nccl] [--timeout 120]

  nvml inventory      always tried: NVML's devices, use, health and topology
                      (integrations.nvml), and the devices the launcher would give 1-2 workers
  workers' devices    1+ GPU: `elastic.run --nproc-per-node N` (N = GPUs, at most 2): each
                      rank's own device is the one chosen (UUIDs compared), ranks distinct
  memory share        1+ GPU: two workers at --gpu-memory-fraction 0.5 share one GPU; an
                      allocation past the share is refused
  nccl re-init        1+ GPU: destroy + init + first all-reduce of an NCCL group (N ranks)
  state on gpu        1+ GPU: ElasticState commit/restore of ~50 M parameters on the GPU, and
                      sync() over the group (under --backend; when that fails, the error and
                      the time under cpu:gloo,cuda:nccl)
  boundary overhead   1+ GPU: benchmarks/overhead.py's loop on the GPU over NCCL, plain DDP
                      (torchrun) against run() + step_boundary() (elastic.run), N ranks
  grow 1 -> 2         2+ GPUs: benchmarks/rescale.py's scale-up, in place, one GPU per agent
  sigkill 2 -> 1      2+ GPUs: its SIGKILL of the second agent
Needs torch with CUDA for everything after the inventory. Each part reports its figures or why it
failed; a failure does not stop the others. About 3 minutes on a machine with 2 GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(1, str(REPO))

import overhead  # noqa: E402
import rescale  # noqa: E402

from integrations.nvml.__main__ import show  # noqa: E402
from integrations.nvml.choose import open_probe  # noqa: E402
from integrations.nvml.probe import NoGpus, ProbeError, node_gpus  # noqa: E402
from launcher.devices import GpuRequest, assign  # noqa: E402

WORKER = REPO / "benchmarks" / "gpu_check_worker.py"
RESULTS: List[tuple] = []  # (check, status, detail)


def record(check: str, status: str, detail: str) -> None:
    RESULTS.append((check, status, detail))
    print(f"-- {check}: {status}: {detail}", flush=True)


def machine():
    """(torch version, CUDA usable, GPU count, NCCL version or a reason)."""
    try:
        import torch
    except ImportError as exc:
        return None, False, 0, f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device")
        return torch.__version__, False, 0, why
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() \
        else "not available"
    return torch.__version__, True, torch.cuda.device_count(), f"NCCL {nccl}"


def inventory(ranks: int) -> Optional[dict]:
    """The NVML probe's view, printed; {index: uuid} of the devices, or None."""
    try:
        probe = open_probe("nvml")
    except NoGpus as exc:
        record("nvml inventory", "skipped", str(exc))
        return None
    try:
        print(show(probe), flush=True)
        node = node_gpus(probe)
        chosen = assign(node, min(ranks, len(node.gpus)) or 1, GpuRequest())
        record("nvml inventory", "ok", f"{len(node.gpus)} GPUs; for {ranks} workers: "
                                       f"{chosen.note}")
        return {g.index: g.uuid for g in node.gpus}
    except (ProbeError, ValueError) as exc:
        record("nvml inventory", "failed", str(exc))
        return None
    finally:
        probe.close()


def launch(nproc: int, worker_args: List[str], extra: List[str], timeout: float) -> List[dict]:
    """`python -m elastic.run` on the check's worker; its GPUCHECK records."""
    cmd = [sys.executable, "-m", "elastic.run", "--standalone", "--nproc-per-node", str(nproc),
           "--rescale-mode", "restart", *extra, str(WORKER), *worker_args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    records = [json.loads(line.split("GPUCHECK ", 1)[1]) for line in out.splitlines()
               if "GPUCHECK " in line]
    if done.returncode != 0:
        tail = [line for line in out.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)[-400:]}")
    return records


def check_devices(count: int, uuids: Optional[dict], timeout: float) -> None:
    nproc = min(count, 2)
    try:
        seen = launch(nproc, ["--mode", "devices"], [], timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        record("workers' devices", "failed", str(exc))
        return
    own = [r["uuid"] for r in sorted(seen, key=lambda r: r["rank"])]
    distinct = len(set(own)) == len(own) == nproc
    expected = None
    if uuids:  # the choice the agent made, made again
        probe = open_probe("nvml")
        try:
            chosen = assign(node_gpus(probe), nproc, GpuRequest())
        finally:
            probe.close()
        expected = [uuids[o[0]] for o in chosen.own]
    ok = distinct and (expected is None or own == expected)
    record("workers' devices", "ok" if ok else "failed",
           "; ".join(f"rank {r['rank']}: {r['device']} of {r['count']} "
                     f"(CUDA_VISIBLE_DEVICES={r['visible']}) = {r['uuid']}" for r in seen)
           + ("" if expected is None else f"; expected {expected}"))


def check_share(timeout: float) -> None:
    try:
        seen = launch(2, ["--mode", "devices"], ["--gpu-memory-fraction", "0.5"], timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        record("memory share", "failed", str(exc))
        return
    same = len({r["uuid"] for r in seen}) == 1 and len(seen) == 2
    enforced = all(r["limit"] == "enforced" for r in seen)
    record("memory share", "ok" if same and enforced else "failed",
           "; ".join(f"rank {r['rank']} on {r['uuid']} at {r['fraction']}: past it "
                     f"{r['limit']}" for r in seen))


def check_nccl(count: int, backend: str, timeout: float) -> None:
    try:
        seen = launch(min(count, 2), ["--mode", "nccl", "--backend", backend], [], timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        record("nccl re-init", "failed", str(exc))
        return
    by = {r.get("check") + (r.get("backend") or ""): r for r in seen if r["rank"] == 0}
    pg = by.get("pg")
    if pg:
        record("nccl re-init", "ok", f"{pg['world']} ranks: destroy {pg['destroy_ms']:.1f} ms, "
                                     f"init + first all-reduce {pg['init_ms']:.1f} ms "
                                     f"(median of {pg['reps']})")
    st = by.get("state")
    if st:
        syncs = [r for r in seen if r.get("check") == "sync" and r["rank"] == 0]
        said = "; ".join(f"sync under {r['backend']}: " + (f"{r['sync_ms']:.1f} ms" if "sync_ms"
                                                            in r else f"FAILED {r['error']}")
                         for r in syncs)
        record("state on gpu", "ok" if any("sync_ms" in r for r in syncs) else "failed",
               f"{st['params'] / 1e6:.0f} M parameters: commit {st['commit_ms']:.1f} ms, "
               f"restore {st['restore_ms']:.1f} ms; {said}")


def check_overhead(count: int, backend: str, reps: int, steps: int, width: int,
                   device: str = "cuda") -> None:
    nproc = min(count, 2)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-overhead-"))
    extra = ["--device", device, "--backend", backend]
    try:
        plain, elastic, inside = [], [], []
        for rep in range(reps):
            plain.append(overhead.one("plain", width, steps, tmp / f"p{rep}.json", nproc,
                                      extra)[0])
            step, boundary = overhead.one("elastic", width, steps, tmp / f"e{rep}.json", nproc,
                                          extra)
            elastic.append(step)
            inside.append(boundary)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        record("boundary overhead", "failed", str(exc)[-400:])
        return
    med = sorted(plain)[len(plain) // 2], sorted(elastic)[len(elastic) // 2]
    b = sorted(inside)[len(inside) // 2]
    record("boundary overhead", "ok",
           f"{nproc} ranks, width {width}: plain step {med[0] * 1e3:.2f} ms, elastic "
           f"{med[1] * 1e3:.2f} ms, inside step_boundary() {b * 1e6:.0f} us "
           f"({b / med[0] * 100:.2f}% of a plain step; medians of {reps})")


def check_rescale(backend: str, timeout: float, device: str = "cuda") -> None:
    root = Path(tempfile.mkdtemp(prefix="gpu-rescale-"))
    with rescale.Run("ours-inplace", root / "run", timeout) as run:
        run.train_args += ["--device", device, "--backend", backend]
        run.agent_env = {"A": {"CUDA_VISIBLE_DEVICES": "0"}, "B": {"CUDA_VISIBLE_DEVICES": "1"}}
        try:
            started = run.scale_up()
            grown = run.outcome(1, 2, started)
            record("grow 1 -> 2", "ok", f"{grown.seconds:.2f} s from B's start, "
                   f"{grown.from_joined:.2f} s from its registration; recomputed "
                   f"{grown.recomputed}, rank 0 kept its process: {grown.same_pid}"
                   if grown.from_joined is not None else f"{grown.seconds:.2f} s")
        except rescale.NoResult as exc:
            record("grow 1 -> 2", "failed", f"{exc} (logs in {root})")
            record("sigkill 2 -> 1", "skipped", "no world of 2 to kill from")
            return
        try:
            killed = run.scale_down()
            time.sleep(rescale.EVENT_GRACE_S)
            shrunk = run.outcome(2, 1, killed)
            record("sigkill 2 -> 1", "ok", f"{shrunk.seconds:.2f} s from the kill; recomputed "
                   f"{shrunk.recomputed}, rank 0 kept its process: {shrunk.same_pid}")
        except rescale.NoResult as exc:
            record("sigkill 2 -> 1", "failed", f"{exc} (logs in {root})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of the overhead loop")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=4096, help="of the overhead loop's layers")
    parser.add_argument("--backend", default="nccl",
                        help="the workers' process group (e.g. cpu:gloo,cuda:nccl)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    began = time.time()
    version, cuda, count, about = machine()
    print(f"machine: {platform.node()}, python {platform.python_version()}, torch {version}, "
          f"{f'{count} CUDA GPUs, {about}' if cuda else about}", flush=True)
    uuids = inventory(max(count, 1))
    needs_cuda = ["workers' devices", "memory share", "nccl re-init", "state on gpu",
                  "boundary overhead"]
    if not cuda:
        for check in needs_cuda + ["grow 1 -> 2", "sigkill 2 -> 1"]:
            record(check, "skipped", about)
    else:
        check_devices(count, uuids, args.timeout)
        check_share(args.timeout)
        check_nccl(count, args.backend, args.timeout)
        check_overhead(count, args.backend, args.reps, args.steps, args.width)
        if count >= 2:
            check_rescale(args.backend, args.timeout)
        else:
            for check in ("grow 1 -> 2", "sigkill 2 -> 1"):
                record(check, "skipped", f"needs 2 GPUs, this machine has {count}")
    print(f"\nGPU check ({time.time() - began:.0f} s):")
    width = max(len(c) for c, _, _ in RESULTS)
    for check, status, detail in RESULTS:
        print(f"  {check:<{width}}  {status:<8} {detail}")
    return 1 if any(status == "failed" for _, status, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
