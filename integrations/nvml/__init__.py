"""NVIDIA GPUs through NVML (`nvidia-ml-py`, the [gpu] extra; imported as `pynvml`, lazily).

    probe.py      the `GpuProbe` contract, device records, the health rule
    choose.py     `open_probe`: the probe `--gpu-probe` names
    nvml.py       `NvmlProbe`: the real devices (inventory, topology, utilisation, health)
    fake.py       `FakeProbe`: recorded states replayed from a JSON file (--gpu-probe fake:PATH)
    health.py     `GpuHealthSource`: an unhealthy GPU is a notice that makes the node leave
    inventory.py  this machine as a node of the cluster scheduler; `ray start` flags
    __main__.py   `python -m integrations.nvml [show|record|ray-args]`

Which devices a node's workers get is decided by `launcher.devices` (pure), from the view
`probe.node_gpus` gives it; elastic/cli.py wires the two for `python -m elastic.run`.
"""
