"""Layers point one way: no two fmnist modules import each other (lazy imports inside
functions included), and the inference path (predict, serve, export) loads no training code."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fmnist"


def imports_of(path: Path) -> set[str]:
    """The fmnist modules a file imports anywhere in it: `from . import x`, `from .x import y`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmnist."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycles():
    graph = {p.stem: imports_of(p) for p in SRC.glob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != "__init__"} for m, deps in graph.items()}

    def cycle_from(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_inference_path_loads_no_training_code_nor_search_engines():
    """Also: faiss and usearch are optional (pip install 'fmnist[search]'): predicting, and
    serving without --index, never import them, so neither needs them installed."""
    code = ("import sys, fmnist.predict, fmnist.serve, fmnist.export, fmnist.onnx_backend; "
            "from fmnist.serve import create_app; create_app(); "
            "print(sorted(m for m in sys.modules if m in "
            "('fmnist.train', 'fmnist.augment', 'fmnist.distributed', 'fmnist.config', 'fmnist.bench') "
            "or m.split('.')[0] in ('faiss', 'usearch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing the inference path loaded {r.stdout.strip()}"
