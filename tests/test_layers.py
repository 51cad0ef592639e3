"""The structure: layers that only point down. vit_jax imports neither parity nor torch, anywhere, and
has no import circle, not even through imports inside functions; training runs where torch is absent."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vit_jax", "parity")


def _module(path: str) -> str:
    return os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """{module: the modules it imports, at any depth of its source}, from the source of both packages.

    Every `import` and `from ... import` counts, wherever it stands (module level, inside a function,
    under `if`). `from vit_jax import data` is an import of vit_jax.data; third-party modules appear
    by their top-level name (torch, jax, ...).
    """
    graph = {}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(ROOT, package, name)
            module = _module(path)
            targets = set()
            for node in ast.walk(ast.parse(pathlib.Path(path).read_text(), path)):
                if isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: from . import x
                        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
                    for a in node.names:
                        full = f"{base}.{a.name}"
                        is_module = os.path.exists(os.path.join(ROOT, *full.split(".")) + ".py")
                        targets.add(full if is_module else base)
            graph[module] = {t if t.split(".")[0] in PACKAGES else t.split(".")[0] for t in targets} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle among the project's modules (as one path each), by depth-first search."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "vit_jax.tfds_data" in graph["vit_jax.data"]  # imported inside load_split only
    assert "vit_jax.prepare" in graph["vit_jax.data"]  # inside main only
    assert "torch" in graph["parity.port"] and "vit_jax.weights" in graph["parity.port"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the search finds a circle


def test_no_import_circles_and_vit_jax_never_imports_parity_or_torch():
    graph = import_graph()
    assert not _cycles(graph), _cycles(graph)
    upward = {m: sorted(t for t in targets if t.split(".")[0] in ("parity", "torch"))
              for m, targets in graph.items() if m.startswith("vit_jax")}
    assert not any(upward.values()), {m: t for m, t in upward.items() if t}


BLOCKED = ("torch", "parity", "tensorflow", "tensorflow_datasets")


def _not_installed(blocked) -> str:
    """Python code that makes this process's imports of `blocked` fail, as on a machine that lacks them."""
    return f"""
import sys

class NotInstalled:
    # Wraps each finder: the blocked packages are not found.
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {tuple(blocked)!r}:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [NotInstalled(f) for f in sys.meta_path]
"""


def test_training_runs_where_neither_torch_nor_tensorflow_can_be_imported(tmp_path, cifar_archive):
    """A short epoch of the test recipe from an archive (--archive), in a process whose import of
    torch, parity, tensorflow or tensorflow_datasets fails: a GPU box with JAX alone."""
    code = _not_installed(BLOCKED) + f"""
try:
    import torch
    raise SystemExit("torch was found")
except ModuleNotFoundError:
    pass
from vit_jax import train
train.main(["--recipe", "test", "--epochs", "1", "--batch_size", "16", "--train_limit", "32", "--test_limit", "16",
            "--archive", {cifar_archive!r}, "--workdir", {str(tmp_path / "run")!r}])
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Epoch 1: Train Loss" in run.stdout and os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_parity_without_pytorch_says_what_to_install_in_one_line():
    code = _not_installed(["torch"]) + """
import runpy
sys.argv = ["parity.compare"]
runpy.run_module("parity.compare", run_name="__main__", alter_sys=True)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr == "error: parity needs PyTorch, which is not installed here: pip install -e '.[parity]' " \
                         "(training and the vit_jax commands need neither)\n", run.stderr
