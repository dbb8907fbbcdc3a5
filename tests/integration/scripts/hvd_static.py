"""A Horovod script written for horovodrun (no launcher API): hvd.init, DistributedOptimizer,
broadcast_parameters, a few steps. Prints `HVD rank=R size=S local_rank=L local_size=LS
cross_rank=C cross_size=CS` after init and `DONE rank=R size=S checksum=X` at the end, where X
is the sum of the final parameters (equal on every rank when the gradients were averaged)."""
import argparse

import torch
import horovod.torch as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

hvd.init()
print(f"HVD rank={hvd.rank()} size={hvd.size()} local_rank={hvd.local_rank()} "
      f"local_size={hvd.local_size()} cross_rank={hvd.cross_rank()} "
      f"cross_size={hvd.cross_size()}", flush=True)
torch.manual_seed(100 + hvd.rank())  # different on each rank: broadcast_parameters must fix it
model = torch.nn.Linear(4, 1)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
data = torch.Generator().manual_seed(hvd.rank())
for _ in range(args.steps):
    x = torch.randn(8, 4, generator=data)
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
checksum = sum(p.detach().sum().item() for p in model.parameters())
sums = hvd.allgather_object(checksum)
assert max(sums) - min(sums) < 1e-9, f"ranks diverged: {sums}"
print(f"DONE rank={hvd.rank()} size={hvd.size()} checksum={checksum:.9f}", flush=True)
