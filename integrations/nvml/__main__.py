"""`python -m integrations.nvml [--gpu-probe nvml|fake:PATH] [show|record|ray-args]`

show      the GPUs: model, memory, use, health, and the topology matrix (default)
record    the devices, states and topology as JSON, for `--gpu-probe fake:PATH` elsewhere
ray-args  `ray start` flags giving Ray this machine's healthy GPUs, model and memory
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import List, Optional

from .inventory import ray_start_args
from .choose import open_probe
from .probe import NVML, NoGpus, ProbeError, link_name, node_gpus, record


def show(probe) -> str:
    node = node_gpus(probe)
    states = {s.index: s for s in probe.states()}
    lines = [f"GPUs ({node.source}):",
             f"{'GPU':>4}  {'model':<28} {'memory MiB':>10} {'used MiB':>9} {'util %':>6}  health"]
    for g in node.gpus:
        s = states[g.index]
        used = "?" if s.memory_used_mib is None else s.memory_used_mib
        util = "?" if s.utilization_pct is None else s.utilization_pct
        health = "ok" if g.healthy else "; ".join(g.problems)
        lines.append(f"{g.index:>4}  {g.name[:28]:<28} {g.memory_mib:>10} {used:>9} {util:>6}  "
                     f"{health}")
    lines.append("topology:")
    lines.append("      " + " ".join(f"{'GPU' + str(g.index):>6}" for g in node.gpus))
    for g, row in zip(node.gpus, node.links):
        lines.append(f"{'GPU' + str(g.index):>6}" + " ".join(f"{link_name(x):>6}" for x in row))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integrations.nvml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-probe", default=NVML, help="nvml (default) or fake:PATH")
    parser.add_argument("command", nargs="?", default="show",
                        choices=["show", "record", "ray-args"])
    args = parser.parse_args(argv)
    try:
        probe = open_probe(args.gpu_probe)
    except NoGpus as exc:
        if args.command == "ray-args":
            print("--num-gpus 0")
            return 0
        print(f"no GPU to show: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "record":
            print(json.dumps(record(probe), indent=1))
        elif args.command == "ray-args":
            print(shlex.join(ray_start_args(probe)))
        else:
            print(show(probe))
    except ProbeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        probe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
