"""The training script of benchmarks/rescale.py, and the reader of the lines it prints.

As a script: DDP on CPU (gloo), a small MLP on a synthetic regression set made from fixed seeds,
written with the in-place worker API so that the one file runs unchanged under all three launchers
of the benchmark:

- `elastic.run --rescale-mode auto`: survivors switch to the new world in place, at a step
  boundary (`world.step_boundary`), and `train` is re-entered in the same process;
- `elastic.run --rescale-mode restart` and torchrun: no agent channel, so `run()` calls `train`
  once; a change of world restarts the process, which resumes from the checkpoint.

ElasticSampler hands out a global batch of --global-batch samples per step (split evenly over the
world; no batch policy is needed) and ElasticState is committed every --commit-every steps, when
each node's local rank 0 also writes --checkpoint. Rank 0 prints, flushed:

    ENTER <unix time> step=<state.step> world=<W> pid=<pid>   on every (re)entry into train
    STEP <unix time> step=<state.step> world=<W>              after every optimizer step

`state.step` counts optimizer steps of the job, so STEP step=N is the N-th step, and an ENTER
says how many steps the world it enters starts from.

    python -m elastic.run --nproc-per-node 2 benchmarks/rescale_train.py --checkpoint /tmp/b.ckpt

As a module (imported by rescale.py; importing it does not import torch): what the benchmark makes
of those lines (`find_change`), one repetition's figures (`Outcome`) and the printed report.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NUM_SAMPLES, NUM_FEATURES = 4096, 16
BASE = "ours-inplace"  # the launcher the ratios are taken against
TARGET_UP_FRACTION = 5  # scale-up from registration at most a fifth of horovodrun's, same run
TARGET_KILL_S = 1.0
TARGET_RESTART_S = 1.5  # restart mode (zygote): SIGKILL, and scale-up from registration
TARGET_RESTART_RATIO = 4.0  # in place at most a quarter of restart mode's time
TARGET_CONTROL_S = 0.3  # resize up from a hot spare, and release: call -> first step
SCENARIOS = {
    "scale-up": "(a) scale-up 1 -> 2 agents: B started -> first step at world=2",
    "scale-down": "(b) SIGKILL scale-down 2 -> 1 agents: B killed -> first step at world=1",
    "resize-up": "(c) resize up 1 -> 2 onto a hot spare C: resize called -> first step at world=2",
    "release": "(d) release C, 2 -> 1: release called -> first step at world=1",
}
CONTROL = ("resize-up", "release")  # torchrun has no control API: not measured for it
LINE = re.compile(r"\b(ENTER|STEP) (\d+(?:\.\d+)?) step=(\d+) world=(\d+)(?: pid=(\d+))?")


# -- reading what the script printed ------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Line:
    time: float
    kind: str  # ENTER or STEP
    step: int
    world: int
    pid: Optional[int] = None


def read_lines(files: list[Path]) -> list[Line]:
    """Every ENTER/STEP line in `files`, once each (a launcher may write a line to two files),
    in time order."""
    found = set()
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:  # a launcher's temp file that went away
            continue
        for kind, ts, step, world, pid in LINE.findall(text):
            found.add(Line(float(ts), kind, int(step), int(world), int(pid) if pid else None))
    return sorted(found)


@dataclass(frozen=True)
class Change:
    """What the lines say about one change of world (from `old` to `new` ranks)."""

    first: Line             # the first STEP in the new world
    last_old: Optional[Line]  # the last STEP printed in the old world before it
    enter_old: Optional[Line]  # rank 0's last entry into the old world
    enter_new: Optional[Line]  # rank 0's first entry into the new world

    @property
    def recomputed(self) -> Optional[int]:
        """Steps trained twice: the last step printed before the change minus the step the new
        world started from (its first STEP's number minus one). 0 when nothing was lost; a
        restart from a checkpoint at step C after step L was printed loses L - C."""
        return None if self.last_old is None else self.last_old.step - (self.first.step - 1)

    @property
    def same_pid(self) -> Optional[bool]:
        """Whether rank 0 entered the new world in the process it ran the old one in."""
        if self.enter_old is None or self.enter_new is None:
            return None
        return self.enter_old.pid == self.enter_new.pid


def find_change(lines: list[Line], old: int, new: int, after: float) -> Optional[Change]:
    """The change from world `old` to world `new` whose first new STEP is at or after `after`."""
    first = next((x for x in lines if x.kind == "STEP" and x.world == new and x.time >= after), None)
    if first is None:
        return None
    before = [x for x in lines if x.time < first.time and x.world == old]
    steps_old = [x for x in before if x.kind == "STEP"]
    enters_old = [x for x in before if x.kind == "ENTER"]
    # The entry that trained the first new step: the last one into the new world before it.
    enters_new = [x for x in lines if x.kind == "ENTER" and x.world == new and x.time <= first.time
                  and (not enters_old or x.time > enters_old[-1].time)]
    return Change(first=first, last_old=steps_old[-1] if steps_old else None,
                  enter_old=enters_old[-1] if enters_old else None,
                  enter_new=enters_new[-1] if enters_new else None)


# -- one repetition's figures, medians and the report --------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One scenario of one repetition: a time (and what came with it), or a hang / failure and why."""

    seconds: Optional[float] = None
    kind: str = "time"  # time, hang, failed, or n/a (the launcher cannot do it)
    detail: str = ""
    waited: float = 0.0  # for a hang or failure: how long the new world was waited for
    from_joined: Optional[float] = None  # scale-up, ours: B's `joined` event -> first new step
    paused: Optional[float] = None  # rank 0: its last step in the old world -> first in the new
    recomputed: Optional[int] = None
    same_pid: Optional[bool] = None
    launcher_says: str = ""  # the surviving agent's `rescale` event: duration_s, in place or not

    def value(self, figure: str) -> float:
        """A figure for medians; a hang or failure (the user never saw a step) sorts after any time."""
        got = getattr(self, figure) if self.seconds is not None else None
        return math.inf if got is None else float(got)

    def cells(self) -> list[str]:
        if self.seconds is None:
            return [self.kind.upper(), "", "", "", "", ""]
        pid = {None: "?", True: "same", False: "new"}[self.same_pid]
        joined = f"{self.from_joined:.2f} s" if self.from_joined is not None else "-"
        paused = "?" if self.paused is None else f"{self.paused:.2f} s"
        recomputed = "?" if self.recomputed is None else str(self.recomputed)
        return [f"{self.seconds:.2f} s", joined, paused, recomputed, pid, self.launcher_says or "-"]


@dataclass(frozen=True)
class Median:
    """The median of one launcher's repetitions. When it falls on a hang or failure there is no figure,
    only, if some runs hung, a lower bound: the shortest of those waits."""

    seconds: Optional[float]
    lower_bound: Optional[float] = None

    @classmethod
    def of(cls, outcomes: list[Outcome], figure: str = "seconds") -> "Median":
        values = [o.value(figure) for o in outcomes]
        value = statistics.median(values) if values else math.inf
        if not math.isinf(value):
            return cls(value)
        hangs = [o.waited for o in outcomes if o.kind == "hang"] if figure == "seconds" else []
        return cls(None, min(hangs) if hangs else None)

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:.2f} s"
        return f"no result (hang, >= {self.lower_bound:.0f} s)" if self.lower_bound else "no result"


def ratio(base: Median, other: Median) -> tuple[Optional[float], str]:
    """other / base: the number (None when there is none) and how to print it."""
    if base.seconds and other.seconds is not None:
        return other.seconds / base.seconds, f"{other.seconds / base.seconds:.2f}x"
    if base.seconds and other.lower_bound:
        return other.lower_bound / base.seconds, f"> {other.lower_bound / base.seconds:.1f}x (it hung)"
    return None, "n/a"


def machine() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        model = "unknown CPU"
    return (f"{os.cpu_count()} cores ({model}), CPU only, loopback; Python {sys.version.split()[0]}, "
            f"torch {importlib.metadata.version('torch')}")


def verdict(ok: Optional[bool]) -> str:
    return {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[ok]


def report(results: dict[str, list[dict[str, Outcome]]], reps: int, timeout: float,
           horovodrun_up: Optional[Median] = None) -> None:
    """Print the tables and the summary; horovodrun_up is horovodrun's scale-up median (a node
    appears -> first step at world=2) when the same run measured it (--horovod)."""
    launchers = list(results)
    print(f"\nMachine: {machine()}.\n{reps} repetition(s), launchers alternated in each, "
          f"each wait bounded at {timeout:g} s.")
    medians: dict[tuple[str, str, str], Median] = {}
    for scenario, title in SCENARIOS.items():
        outcomes = {name: [rep[scenario] for rep in results[name]] for name in launchers}
        print(f"\n{title}")
        header = ["rep", "launcher", "to first step", "from joined", "paused", "recomputed",
                  "rank-0 pid", "launcher's duration_s"]
        widths = [7, 20, 15, 13, 10, 12, 12, 24]
        row = lambda cells: " ".join(f"{c:<{w - 1}}" for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        print(row(header))
        for rep in range(reps):
            for name in launchers:
                o = outcomes[name][rep]
                print(row([str(rep + 1), name, *o.cells()]) + (f"  ({o.detail})" if o.detail else ""))
        for name in launchers:
            for figure in ("seconds", "from_joined", "paused", "recomputed"):
                medians[scenario, name, figure] = Median.of(outcomes[name], figure)
            rec = medians[scenario, name, "recomputed"].seconds
            print(row(["median", name, str(medians[scenario, name, "seconds"]),
                       str(medians[scenario, name, "from_joined"]) if name != "torchrun" and scenario == "scale-up"
                       else "-", str(medians[scenario, name, "paused"]),
                       "n/a" if rec is None else f"{rec:g}"]))
        if BASE in launchers:
            for name in (n for n in launchers if n != BASE):
                line = f"ratio {name}/{BASE}: {ratio(medians[scenario, BASE, 'seconds'], medians[scenario, name, 'seconds'])[1]}"
                if scenario == "scale-up" and name != "torchrun":
                    line += (" (from joined: " + ratio(medians[scenario, BASE, "from_joined"],
                                                       medians[scenario, name, "from_joined"])[1] + ")")
                print(line)
    print_summary(launchers, medians, reps, horovodrun_up)


def print_summary(launchers: list[str], medians: dict, reps: int,
                  horovodrun_up: Optional[Median]) -> None:
    def med(scenario: str, figure: str = "seconds", name: str = BASE) -> Optional[float]:
        return medians[scenario, name, figure].seconds if name in launchers else None

    def versus_restart(scenario: str, figure: str) -> str:
        if BASE not in launchers or "ours-restart" not in launchers:
            return verdict(None)
        r, shown = ratio(medians[scenario, BASE, figure], medians[scenario, "ours-restart", figure])
        return f"{verdict(None if r is None else r >= TARGET_RESTART_RATIO)} (restart/inplace {shown})"

    def count(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:g}"

    parts = [f"{label}: " + ", ".join(f"{n} {medians[scenario, n, 'seconds']}" for n in launchers)
             for scenario, label in (("scale-up", "scale-up B start->step@2"), ("scale-down", "SIGKILL->step@1"))]
    parts.append("scale-up joined->step@2: " + ", ".join(
        f"{n} {medians['scale-up', n, 'from_joined']}" for n in launchers if n != "torchrun"))
    parts += [f"rank 0 paused {label}: " + ", ".join(f"{n} {medians[scenario, n, 'paused']}"
                                                      for n in launchers)
              for scenario, label in (("scale-up", "up"), ("scale-down", "down"))]
    if horovodrun_up is not None:
        parts.append(f"horovodrun scale-up (a host appears->step@2) in this run {horovodrun_up}")
    parts.append("steps recomputed up/down: " + ", ".join(
        f"{n} {count(medians['scale-up', n, 'recomputed'].seconds)}/"
        f"{count(medians['scale-down', n, 'recomputed'].seconds)}" for n in launchers))
    parts += [f"{label}: " + ", ".join(f"{n} {medians[scenario, n, 'seconds']}"
                                       for n in launchers if n != "torchrun")
              for scenario, label in (("resize-up", "resize up from a hot spare->step@2"),
                                      ("release", "release->step@1"))]
    up_join, kill = med("scale-up", "from_joined"), med("scale-down")
    spare, release = med("resize-up"), med("release")
    anchor = horovodrun_up.seconds if horovodrun_up is not None else None
    restart_up = med("scale-up", "from_joined", "ours-restart")
    restart_kill = med("scale-down", "seconds", "ours-restart")
    targets = [
        (f"scale-up from registration <= 1/{TARGET_UP_FRACTION} of horovodrun's "
         + (f"{anchor / TARGET_UP_FRACTION:.3f} s "
            f"{verdict(None if up_join is None else up_join <= anchor / TARGET_UP_FRACTION)}"
            if anchor is not None else "NOT MEASURED (run with --horovod)")),
        f"SIGKILL <= {TARGET_KILL_S:g} s {verdict(None if kill is None else kill <= TARGET_KILL_S)}",
        f"restart mode: SIGKILL <= {TARGET_RESTART_S:g} s "
        f"{verdict(None if restart_kill is None else restart_kill <= TARGET_RESTART_S)}, "
        f"scale-up from registration <= {TARGET_RESTART_S:g} s "
        f"{verdict(None if restart_up is None else restart_up <= TARGET_RESTART_S)}",
        f"in-place <= 1/4 of restart: scale-up from registration {versus_restart('scale-up', 'from_joined')}, "
        f"scale-up from B's start {versus_restart('scale-up', 'seconds')}, "
        f"SIGKILL {versus_restart('scale-down', 'seconds')}",
        f"resize up from a hot spare <= {TARGET_CONTROL_S:g} s "
        f"{verdict(None if spare is None else spare <= TARGET_CONTROL_S)}",
        f"release <= {TARGET_CONTROL_S:g} s "
        f"{verdict(None if release is None else release <= TARGET_CONTROL_S)}",
    ]
    print(f"\nSUMMARY ({os.cpu_count()} cores, CPU only, median of {reps} reps) " + "; ".join(parts)
          + ". TARGETS: " + "; ".join(targets))


# -- the training script --------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="written by each node's local rank 0")
    parser.add_argument("--commit-every", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.05, help="seconds of made-up compute per step")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=100000, help="default: never ends by itself")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the model on the worker's GPU (elastic.gpu.device())")
    parser.add_argument("--backend", default=None,
                        help="process group backend (default gloo on cpu, nccl on cuda)")
    return parser.parse_args()


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from elastic import ElasticSampler, ElasticState, gpu
    from integrations.torch.run import run
    from integrations.torch.world import ElasticWorld

    args = parse_args()
    torch.set_num_threads(1)  # two cores shared by every worker and agent of the benchmark
    device = torch.device("cpu")
    if args.device == "cuda":
        gpu.setup()
        device = gpu.device()
        torch.cuda.set_device(device)
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator).to(device)
    targets = (inputs.cpu() @ torch.randn(NUM_FEATURES, 1, generator=generator)).to(device)
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = ElasticSampler(NUM_SAMPLES, args.global_batch, seed=7)
    state = ElasticState(model, optimizer, sampler=sampler, step=0, epoch=0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def commit() -> None:
        state.commit()
        if local_rank == 0:
            state.save(args.checkpoint)

    def train(world) -> None:
        rank, size = dist.get_rank(), dist.get_world_size()
        sampler.set_world(rank, size)  # no batch plan: the global batch stays, split evenly
        # Rebuilt on every entry, for the process group of this world.
        ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        if rank == 0:
            print(f"ENTER {time.time():.6f} step={state.step} world={size} pid={os.getpid()}", flush=True)
        while state.epoch < args.epochs:
            sampler.set_epoch(state.epoch)  # the same epoch keeps its cursor
            for indices in sampler:
                x, y = inputs[indices], targets[indices]
                # Summed and weighted so that DDP's average is the mean over the global batch.
                loss = ((ddp(x) - y) ** 2).sum() * size / sampler.step_global_batch()
                loss.backward()
                time.sleep(args.step_sleep)
                optimizer.step()
                optimizer.zero_grad()
                sampler.advance()
                state.step += 1
                if state.step % args.commit_every == 0:
                    commit()
                if rank == 0:
                    print(f"STEP {time.time():.6f} step={state.step} world={size}", flush=True)
                world.step_boundary(state)
            state.epoch += 1
            commit()

    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    run(train, state, checkpoint=args.checkpoint, world=ElasticWorld(backend))


if __name__ == "__main__":
    main()
