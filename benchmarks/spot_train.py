"""The training script of benchmarks/spot.py: benchmarks/rescale_train.py unchanged (rank 0 prints
ENTER and STEP lines), plus one line from every rank each time it enters a world:

    MEMBER <unix time> node=<SPOT_NODE> rank=<R> world=<W>

SPOT_NODE is the name the benchmark gives the agent (A, B, B2, ...); workers inherit it from their
agent under both launchers. These lines say exactly which nodes each world held, so the benchmark
knows when a replacement node first trained and whether a preempted node was in the world at all.

    SPOT_NODE=A python -m elastic.run benchmarks/spot_train.py --checkpoint /tmp/s.ckpt
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch.distributed as dist

    import integrations.torch.run as run_module
    import rescale_train

    inner = run_module.run  # rescale_train.main imports it from the module when it runs

    def run(train, state, **kwargs):
        def entered(world):
            print(f"MEMBER {time.time():.6f} node={os.environ.get('SPOT_NODE', '?')} "
                  f"rank={dist.get_rank()} world={dist.get_world_size()}", flush=True)
            return train(world)

        return inner(entered, state, **kwargs)

    run_module.run = run
    rescale_train.main()


if __name__ == "__main__":
    main()
