"""The import graph runs one way: rendezvous <- launcher <- integrations, with elastic's worker
library below the launcher and elastic's command line (`python -m elastic.run`) on top of it all.
Read from the code's own import statements, so a new arrow that runs back up fails here."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("rendezvous", "launcher", "elastic", "integrations", "serving")
COMMAND_LINE = {"elastic.run", "elastic.cli", "elastic.flags", "elastic.torchrun_compat",
                "elastic.job", "elastic.dashboard", "elastic.dashboard.__main__",
                "elastic.dashboard.views", "elastic.dashboard.sources",
                "elastic.dashboard.server", "elastic.dashboard.page"}


def layer(module: str) -> str:
    if module in COMMAND_LINE:
        return "command line"
    top = module.split(".")[0]
    return "worker library" if top == "elastic" else top


# What each layer may import (besides itself).
ALLOWED = {
    "rendezvous": set(),
    "worker library": set(),
    "launcher": {"rendezvous", "worker library"},
    "integrations": {"rendezvous", "worker library", "launcher"},
    "command line": {"rendezvous", "worker library", "launcher", "integrations"},
    # endpoints take capacity only through the autoscaler (integrations.ray)
    "serving": {"rendezvous", "worker library", "launcher", "integrations"},
}


def imports():
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = module.split(".")[:len(module.split(".")) - node.level + (
                        1 if path.name == "__init__.py" else 0)] if node.level else []
                    names = [".".join(base + [node.module] if node.module else base)]
                    if node.module is None:  # from . import x
                        names = [".".join(base + [a.name]) for a in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in PACKAGES:
                        yield module, name


def test_every_import_runs_down_the_layers():
    wrong = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in imports()
                   if layer(b) != layer(a) and layer(b) not in ALLOWED[layer(a)])
    assert wrong == []


def test_the_check_sees_the_imports_it_judges():
    found = set(imports())
    assert ("launcher.agent", "launcher.decision") in found  # relative: from . import decision
    assert ("integrations.horovod.agent", "launcher.backend") in found
    assert ("elastic.run", "launcher.agent") in found


def test_the_scheduler_core_imports_nothing_of_its_ray_binding_and_ray_is_imported_lazily():
    core = [(a, b) for a, b in imports() if a.startswith("integrations.ray.scheduler")]
    assert core and all(b.startswith("integrations.ray.scheduler") or b == "rendezvous.victims"
                        or b == "rendezvous" for a, b in core), core
    for path in (REPO / "integrations" / "ray").rglob("*.py"):
        top_level = [n for n in ast.parse(path.read_text()).body
                     if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top_level if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(x == "ray" or x.startswith("ray.") for x in names), path
