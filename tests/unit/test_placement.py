"""Placement policies (integrations/ray/scheduler/placement*.py, pool.py, fragmentation.py): no
policy overcommits anything or ignores a GPU model pin, None means nothing fits, FGD picks what a
hand computation of fragmentation says, and seeded runs repeat. Pure and fast."""

import numpy as np
import pytest

from integrations.ray.scheduler.fragmentation import WorkloadMix, node_fragmentation
from integrations.ray.scheduler.model import Binding, Gpu, ModelError, Node, Shape, allocate, \
    gpu_choice
from integrations.ray.scheduler.placement import STRATEGIES, Placer, place
from integrations.ray.scheduler.placement_fgd import Fgd, Ours
from integrations.ray.scheduler.pool import PoolIndex


def gpus(model, n, memory=16384):
    return tuple(Gpu(model, memory) for _ in range(n))


def pool_nodes():
    """A small mixed pool: models, GPU counts, memories and CPU/GPU ratios all differ."""
    kinds = [("A", 8, 96000, 393216, 16384), ("B", 2, 104000, 524288, 15360),
             ("C", 2, 16000, 122880, 32768), ("A", 4, 32000, 131072, 16384)]
    nodes = [Node(f"n{i}", cpu, mem, gpus(model, count, gmem))
             for i, (model, count, cpu, mem, gmem) in enumerate(kinds * 3)]
    return nodes + [Node("cpu-only", 64000, 262144)]


def random_shapes(rng, n):
    shapes = []
    for _ in range(n):
        kind = rng.integers(4)
        cpu, mem = int(rng.integers(1, 24)) * 1000, int(rng.integers(1, 64)) * 1024
        model = [None, None, "A", "B", "C", "Z"][rng.integers(6)]
        gmem = int(rng.choice([0, 0, 4096, 12000, 20000]))
        if kind == 0:
            shapes.append(Shape(cpu, mem))
        elif kind == 1:
            shapes.append(Shape(cpu, mem, gpus=int(rng.choice([1, 1, 2, 4, 8])),
                                gpu_memory_mib=gmem, gpu_model=model))
        else:
            shapes.append(Shape(cpu, mem, gpu_milli=int(rng.integers(1, 100)) * 10,
                                gpu_memory_mib=gmem, gpu_model=model))
    return shapes


def mix_of(shapes):
    return WorkloadMix.from_shapes(shapes, coverage=0.95)


def check_node(node: Node):
    assert 0 <= node.used_cpu_milli <= node.cpu_milli
    assert 0 <= node.used_memory_mib <= node.memory_mib
    for g in node.gpus:
        assert 0 <= g.used_milli <= 1000
        assert 0 <= g.used_memory_mib <= g.memory_mib


def nothing_fits(nodes, shape):
    return all(gpu_choice(n, shape) is None for n in nodes)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_overcommit_model_pins_and_none_only_when_nothing_fits(strategy):
    rng = np.random.default_rng(7)
    shapes = random_shapes(rng, 400)
    placer = Placer(pool_nodes(), strategy, seed=3, mix=mix_of(shapes))
    placed = 0
    for shape in shapes:
        before = {n.name: n for n in placer.pool.nodes}
        binding = placer.place(shape)
        if binding is None:
            assert nothing_fits(before.values(), shape), shape
            continue
        node = before[binding.node]
        chosen = [node.gpus[j] for j in binding.gpu_indices]
        assert len(chosen) == (shape.gpus or (1 if shape.gpu_milli else 0))
        for g in chosen:
            assert shape.gpu_model in (None, g.model)
            assert g.free_memory_mib >= shape.gpu_memory_mib
            assert (g.used_milli == 0) if shape.gpus else (g.free_milli >= shape.gpu_milli)
        placer.bind(binding, shape)
        placed += 1
        check_node(placer.pool.node(binding.node))
    assert placed > 50
    for node in placer.pool.nodes:  # the arrays agree with the model
        i = placer.pool.pos[node.name]
        assert placer.pool.cpu_free[i] == node.free_cpu_milli
        assert placer.pool.mem_free[i] == node.free_memory_mib
        assert [placer.pool.gpu_free[i, j] for j in range(len(node.gpus))] == \
            [g.free_milli for g in node.gpus]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_none_when_nothing_fits(strategy):
    nodes = [Node("a", 8000, 32768, gpus("A", 2)), Node("b", 4000, 16384)]
    mix = WorkloadMix.of([(Shape(1000, 1024, gpu_milli=500), 1.0)])
    for shape in (Shape(9000, 1024), Shape(1000, 65536), Shape(1000, 1024, gpus=3),
                  Shape(1000, 1024, gpus=1, gpu_model="Z"), Shape(1000, 1024, gpu_milli=100,
                                                                  gpu_memory_mib=20000)):
        assert place(nodes, shape, strategy, seed=1, mix=mix) is None, shape
    used = Node("a", 8000, 32768, (Gpu("A", 16384, used_milli=700), Gpu("A", 16384, 1000)))
    assert place([used], Shape(0, 0, gpu_milli=400), strategy, seed=1, mix=mix) is None
    assert place([used], Shape(0, 0, gpus=1), strategy, seed=1, mix=mix) is None
    assert place([used], Shape(0, 0, gpu_milli=300), strategy, seed=1, mix=mix) \
        == Binding("a", (0,))


def two_nodes():
    """n1: GPU 0 has 800 milli free, GPU 1 is taken; n2: GPU 0 has 550 free, GPU 1 taken."""
    n1 = Node("n1", 8000, 65536, (Gpu("A", 16384, used_milli=200), Gpu("A", 16384, 1000)))
    n2 = Node("n2", 8000, 65536, (Gpu("A", 16384, used_milli=450), Gpu("A", 16384, 1000)))
    mix = WorkloadMix.of([(Shape(1000, 0, gpu_milli=500), 3.0), (Shape(2000, 0), 1.0)])
    return [n1, n2], mix


def test_fgd_matches_hand_computed_fragmentation():
    nodes, mix = two_nodes()
    pod = Shape(1000, 1024, gpu_milli=300)
    # Hand computation, mix = 3/4 "share of 500 milli, 1 core" + 1/4 "CPU-only, 2 cores":
    #   n1 before: the share fits (800 >= 500) so none of its 800 idle is fragment for it; for the
    #     CPU-only type all idle GPU is fragment: F = 0.25 * 800 = 200.
    #   n1 after 300 on GPU 0: 500 left, the share still fits: F = 0.25 * 500 = 125; delta +75.
    #   n2 before: 550 >= 500 fits: F = 0.25 * 550 = 137.5.
    #   n2 after: 250 left, the share no longer fits: F = 0.75 * 250 + 0.25 * 250 = 250; -112.5.
    n1, n2 = nodes
    assert node_fragmentation(n1, mix) == pytest.approx(200.0)
    assert node_fragmentation(allocate(n1, pod, (0,)), mix) == pytest.approx(125.0)
    assert node_fragmentation(n2, mix) == pytest.approx(137.5)
    assert node_fragmentation(allocate(n2, pod, (0,)), mix) == pytest.approx(250.0)
    for quantize in (True, False):  # FGD goes where fragmentation grows least: n1
        assert place(nodes, pod, Fgd(mix, quantize=quantize), mix=mix) == Binding("n1", (0,))
    assert place(nodes, pod, "best_fit") == Binding("n2", (0,))  # tightest: n2


def test_ours_counts_gpu_the_cpu_cannot_feed():
    node = Node("x", 2000, 8192, gpus("A", 1))
    mix = WorkloadMix.of([(Shape(2000, 0, gpu_milli=500), 1.0)])
    # 1000 idle, CPU feeds 2000 * 500 / 2000 = 500 of it: fragment 0.25 * 500 = 125.
    assert node_fragmentation(node, mix, cpu_feed=0.25) == pytest.approx(125.0)
    assert node_fragmentation(node, mix) == 0.0
    # A CPU-only pod: FGD sees no difference (ties go to the first node, gpu-rich), ours keeps the
    # CPU of the GPU-rich node and takes the node whose GPU is already used.
    rich = Node("rich", 4000, 8192, gpus("A", 1))
    done = Node("done", 4000, 8192, (Gpu("A", 16384, used_milli=1000),))
    pod = Shape(2000, 1024)
    assert place([rich, done], pod, "fgd", mix=mix) == Binding("rich", ())
    assert place([rich, done], pod, "ours", mix=mix) == Binding("done", ())


def test_vectorised_scores_match_the_definition():
    rng = np.random.default_rng(11)
    shapes = [s for s in random_shapes(rng, 300) if s.gpu_model != "Z"]
    mix = mix_of(shapes)
    placer = Placer(pool_nodes(), "random", seed=5)
    for shape in shapes[:120]:
        placer.place_and_bind(shape)
    pool = placer.pool
    for policy in (Fgd(mix, quantize=False), Ours(mix, quantize=False)):
        policy._bind_pool(pool)
        for shape in shapes[120:160]:
            ok, fits = pool.feasible(shape)
            rows = np.flatnonzero(ok)
            if not rows.size:
                continue
            delta = policy.delta(pool, shape, rows, fits)
            for r, i in enumerate(rows):
                node = pool.nodes[i]
                f0 = node_fragmentation(node, mix, policy.cpu_feed)
                if fits is None or shape.gpus:
                    slots = [() if fits is None else
                             tuple(np.flatnonzero(fits[i])[:shape.gpus])]
                else:
                    slots = [(j,) for j in np.flatnonzero(fits[i])]
                for s in slots:
                    f1 = node_fragmentation(allocate(node, shape, s), mix, policy.cpu_feed)
                    got = delta[r] if delta.ndim == 1 else delta[r, s[0]]
                    assert got == pytest.approx(f0 - f1, abs=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeded_runs_repeat(strategy):
    shapes = random_shapes(np.random.default_rng(2), 150)
    mix = mix_of(shapes)

    def run(seed):
        placer = Placer(pool_nodes(), strategy, seed=seed, mix=mix)
        return [placer.place_and_bind(s) for s in shapes]

    assert run(4) == run(4)
    if strategy == "random":
        assert run(4) != run(5)


def test_bind_refuses_overcommit_and_unbind_restores():
    pool = PoolIndex([Node("a", 4000, 8192, gpus("A", 2, memory=8000))])
    share = Shape(1000, 1024, gpu_milli=600, gpu_memory_mib=5000)
    pool.bind(Binding("a", (0,)), share)
    for bad in (Binding("a", (0,)), Binding("a", (0, 1)), Binding("a", ()), Binding("b", (1,))):
        with pytest.raises(ModelError):
            pool.bind(bad, share)
    with pytest.raises(ModelError):
        pool.bind(Binding("a", (0,)), Shape(0, 0, gpus=1))
    with pytest.raises(ModelError):
        pool.bind(Binding("a", (1,)), Shape(5000, 0, gpu_milli=100))
    pool.unbind(Binding("a", (0,)), share)
    assert pool.node("a") == Node("a", 4000, 8192, gpus("A", 2, memory=8000))
    with pytest.raises(ModelError):
        pool.unbind(Binding("a", (0,)), share)
