"""A small model to serve: a hand-written torch network with random weights, on CPU.

    python -m serving deploy examples.serve_model:Model --name mlp --min 0 --max 4 \
        --target-concurrency 4
    curl -s -X POST http://127.0.0.1:8000/mlp -d '{"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}'

A request is a batch: {"inputs": [[8 floats], ...]}; the answer {"outputs": [[2 floats], ...]}.
"work_s" (optional) holds the request that long, as a bigger model would.
"""
import time

import torch
from torch import nn


class Model:
    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).eval()

    def __call__(self, body):
        x = torch.tensor(body["inputs"], dtype=torch.float32)
        with torch.no_grad():
            y = self.net(x)
        time.sleep(float(body.get("work_s", 0)))
        return {"outputs": y.tolist()}
